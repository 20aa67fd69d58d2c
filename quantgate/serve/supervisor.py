"""The gateway's engine supervisor: starts the engine processes its deployments name (vLLM,
llama.cpp), keeps them running, and stops them when no runtime uses them any more.

I/O around the pure decisions of `serve/supervision.py` (identity, command line, life, backoff); the
cores an engine is pinned to are planned by `serve/cores.py`, and what a gateway that is gone left
running is stopped by `serve/reaper.py`:
- before every spawn, first start and restart alike, the artifact's files are checked against the
  manifest's checksums (quantgate.integrity); a mismatch is refused and nothing is spawned;
- an engine runs in its own process group on a free loopback port (quantgate.procs, the one
  launcher), its output in `<manifest folder>/logs/engines/`; it counts as ready when its health
  path answers AND a one-token chat completion (the probe) comes back; a vLLM CPU engine is pinned
  to cores no other running engine holds (cores.plan), so a blue/green switch does not warm the new
  engine up on the old one's core;
- nobody else can use or stand in for an engine: each is started with a secret of its own in its
  environment (the kind's `secret_env`), which the health check, the probe and the provider send,
  and whoever answers on its port must be the spawned session (`procs.port_owned_by`, before the
  probe and at every liveness check): a local squatter that took the port is never sent a prompt;
- `acquire(d, wait=True)` (a manifest reload: blue/green) returns only once the engine is ready,
  or raises (EngineStartError, ChecksumMismatch) so the gateway keeps its old plan;
  `acquire(d, wait=False)` (the gateway's start) spawns in the background: requests meanwhile go
  to a ready fallback, or get a 503 naming the trace id;
- a ready engine that exits is restarted with exponential backoff (capped), counted in
  `quantgate_engine_restarts_total`; until it is ready again the request path skips it;
- so is one that is alive but hung: its health path is asked every `engine.health.every_s`, and
  `misses` unanswered in a row get its group SIGKILLed (a stopped process never handles SIGTERM);
- `release` stops an engine after its last user; `close` stops every engine; quantgate.procs
  kills any group still alive at interpreter exit;
- a gateway that dies without running any of that (SIGKILL, the OOM killer) leaves its engines
  running: every spawn is recorded by the reaper, and the next gateway on the same manifest folder
  kills what a gateway that is gone left before it starts its own (serve/reaper.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..integrity import deployment_problems, problems_line
from ..procs import (LOOPBACK, TOKEN_ENV, Command, EngineStartError, ServerProcess, free_port, http_ok, port_owned_by,
                     session_pids, tail_of)
from . import cores
from .manifest import Deployment, ManifestError
from .reaper import Reaper
from .supervision import Life, Refs, engine_identity, launch_command

log = logging.getLogger("quantgate.serve")
HEALTH_PATH = "/v1/models"  # a kind that names none in engine_spec.KINDS: the OpenAI servers' models list
TAIL = 12


class ChecksumMismatch(ManifestError):
    """The engine's artifact differs from the manifest's checksums: refused, never started."""


class Engine:
    """One supervised engine process (it may be restarted under the same port and log)."""

    def __init__(self, key: str, d: Deployment, log_dir: Path):
        self.key, self.deployment = key, d
        self.port: int | None = None  # taken when it is first started (Supervisor.acquire), kept across restarts
        self.life = Life()
        self.proc: ServerProcess | None = None
        self.log_path = log_dir / f"{d.name}-{key}.log"
        self.abort = threading.Event()
        self.task: asyncio.Task | None = None  # a background start or restart
        self.pids: list[int] = []  # every process-group leader spawned for it
        self.cores: list[int] = []  # the CPU cores the supervisor pinned it to (vLLM on CPU), else empty
        self.next_check = 0.0  # when its liveness is asked next (while ready)
        self.check: asyncio.Task | None = None  # the liveness check in flight
        # made when it is acquired, kept across restarts (the provider's connections keep working):
        # the API key the engine demands (kind.secret_env; None for a kind that takes none) and the
        # token its processes carry, which the reaper checks before it kills anything
        self.secret: str | None = None
        self.token: str | None = None

    @property
    def auth(self) -> dict[str, str]:
        """The header every request to this engine carries (its per-engine secret)."""
        return {"authorization": f"Bearer {self.secret}"} if self.secret else {}

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.life.state == "ready"

    def status(self) -> dict:
        """For /readyz (admin details): state, restarts, pid, port, error, the log's last lines."""
        out = {"deployment": self.deployment.key, "engine": self.deployment.engine.kind, "state": self.life.state,
               "restarts": self.life.restarts, "port": self.port, "pid": self.pids[-1] if self.pids else None,
               "log": str(self.log_path), "log_tail": tail_of(self.log_path, TAIL)}
        if self.cores:
            out["cores"] = self.cores
        if self.life.error:
            out["error"] = self.life.error
        if self.life.misses:
            out["health_misses"] = self.life.misses
        return out


def probe(base_url: str, model: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    """One-token chat completion; raises OSError/ValueError when the engine does not answer it."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1,
                       "stream": False}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        obj = json.loads(r.read())
    if not obj.get("choices"):
        raise ValueError(f"probe answer has no choices: {str(obj)[:200]}")


class Supervisor:
    def __init__(self, log_dir: Path, metrics=None, *, poll_s: float = 0.2, backoff_base_s: float = 0.5,
                 backoff_cap_s: float = 30.0, grace_s: float = 10.0, clock=time.monotonic):
        self.log_dir, self.metrics = Path(log_dir), metrics
        self.poll_s, self.backoff_base_s, self.backoff_cap_s, self.grace_s = poll_s, backoff_base_s, backoff_cap_s, grace_s
        self.clock = clock
        self.engines: dict[str, Engine] = {}
        self.refs = Refs()
        self.reaper = Reaper(self.log_dir)  # records every group spawned; stops what gone gateways left
        self._pending: set[asyncio.Future] = set()  # start threads, awaited on close even if their caller left
        self._watch: asyncio.Task | None = None
        self._closed = False

    # ------------------------------------------------------------------ users
    async def acquire(self, d: Deployment, wait: bool) -> Engine:
        """The engine for `d`, started if it is the first user (see the module docstring)."""
        key = engine_identity(d)
        if not self.refs.acquire(key):
            return self.engines[key]
        e = self.engines[key] = Engine(key, d, self.log_dir)
        try:
            e.port = free_port()  # now, not at its spawn: a background start's provider points at it at once
            e.token = secrets.token_hex(16)  # likewise its secret: the provider sends it from the start
            e.secret = secrets.token_urlsafe(32) if d.engine.info.secret_env else None
            await self.reaper.swept()
            await self._verify(e)
            self._ensure_watch()
            if wait:
                await self._start_once(e)
            else:
                e.task = asyncio.get_running_loop().create_task(self._start_retrying(e))
        except BaseException:
            await self._drop(key)
            raise
        return e

    async def release(self, d: Deployment) -> None:
        key = engine_identity(d)
        if self.refs.release(key):
            await self._drop(key)

    async def _drop(self, key: str) -> None:
        self.refs.n.pop(key, None)
        e = self.engines.pop(key, None)
        if e is None:
            return
        e.life.stopped()
        await self._stop(e)
        log.warning("engine %s (%s) stopped: no deployment in force uses it", e.deployment.key, e.key)

    async def _stop(self, e: Engine) -> None:
        e.abort.set()
        if e.check is not None:
            e.check.cancel()
            await asyncio.gather(e.check, return_exceptions=True)
        if e.task is not None and e.task is not asyncio.current_task():
            e.task.cancel()
            await asyncio.gather(e.task, return_exceptions=True)
        if e.proc is not None:
            await asyncio.to_thread(e.proc.stop)
        self._gauge(e)

    async def close(self) -> None:
        """Stop every engine (SIGTERM to each group, SIGKILL after the grace period)."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        engines, self.engines, self.refs.n = list(self.engines.values()), {}, {}
        for e in engines:
            e.abort.set()
            e.life.stopped()
        await asyncio.gather(*(self._stop(e) for e in engines), return_exceptions=True)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self.reaper.forget()  # every group it recorded is stopped

    def status(self) -> list[dict]:
        return [e.status() for e in self.engines.values()]

    def suspect(self, e: Engine) -> None:
        """A request to `e` failed: if its process is gone, take it out of rotation now rather than at
        the next check, so the requests behind it go straight to the fallback (non-blocking)."""
        if e.life.state == "ready" and e.proc is not None and not e.proc.alive():
            self._lost(e)

    # ------------------------------------------------------------------ starting
    async def _verify(self, e: Engine) -> None:
        d = e.deployment
        problems = await asyncio.to_thread(deployment_problems, d.artifact, d.files, d.sha256, d.files_rule)
        if problems:
            shown = problems_line(problems)
            why = f"the artifact does not match the manifest's checksums: {shown}"
            e.life.refused(why)
            self._gauge(e)
            log.error("engine for %s refused, not started: %s", d.key, why)
            raise ChecksumMismatch(f"{d.key}: {why}. Re-promote it (quantgate promote) if the change is intended")
        if not d.files and not d.sha256:
            log.warning("%s has no checksums; its files are not verified (promote records them)", d.key)

    async def _start_once(self, e: Engine) -> None:
        """Spawn, wait for the health path and the probe; raises EngineStartError (the group is stopped)."""
        d, spec = e.deployment, e.deployment.engine
        cmd = launch_command(d, e.port)
        held = [o.cores for o in self.engines.values() if o is not e and o.cores and o.life.state != "stopped"]
        e.cores = cores.plan(d, held, cores.allowed_cores)
        env = {**cmd.env, **cores.bind_env(e.cores)}
        hidden = {TOKEN_ENV: e.token, **({spec.info.secret_env: e.secret} if e.secret else {})}
        cmd = Command(cmd.argv, env, cmd.health_path or HEALTH_PATH, cpus=e.cores,  # the whole tree
                      secret_env=hidden, headers=e.auth)
        proc = ServerProcess(d.key, cmd, port=e.port, log_path=e.log_path, startup_timeout_s=spec.startup_timeout_s,
                             poll_s=0.1, grace_s=self.grace_s)
        e.proc = proc

        def run():
            proc.start(e.abort, on_spawn=lambda pid: self.reaper.record(pid, d.key, e.token))
            if proc.record.pid is not None:
                e.pids.append(proc.record.pid)
            if e.abort.is_set():  # superseded or shutting down while it came up: stop it here
                proc.stop()
                raise EngineStartError(f"{d.key}: start abandoned", proc.record)
            # the port is picked, then bound seconds later: whoever answered the health path must be
            # the process spawned, or a local squatter would be sent the prompts
            if (squat := port_owned_by(e.port, session_pids(proc.record.pid))) is not None:
                proc.stop()
                proc.record.error = f"{d.key}: {squat}; not used (the engine is never sent a prompt)"
                raise EngineStartError(proc.record.error, proc.record)
            try:
                probe(proc.base_url, d.provider.model, min(60.0, spec.startup_timeout_s), e.auth)
            except (OSError, ValueError) as exc:
                proc.stop()
                proc.record.error = f"{d.key}: the engine answered its health path but not a probe request: {exc}"
                raise EngineStartError(proc.record.error, proc.record) from None

        fut = asyncio.get_running_loop().run_in_executor(None, run)
        self._pending.add(fut)
        fut.add_done_callback(self._settled)
        await asyncio.shield(fut)  # a caller that leaves does not orphan the thread: close() awaits it
        if e.abort.is_set():
            await asyncio.to_thread(proc.stop)
            raise EngineStartError(f"{d.key}: start abandoned", proc.record)
        e.life.became_ready()
        self._gauge(e)
        log.warning("engine for %s ready on %s in %.1f s (pid %s)", d.key, e.base_url, proc.record.startup_s or 0,
                    proc.record.pid)

    def _settled(self, fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a start nobody waits for any more is not an unhandled error

    async def _start_retrying(self, e: Engine) -> None:
        """A background start (the gateway's start, or a restart): on failure, schedule the next one."""
        try:
            if e.life.restarts:
                await self._verify(e)  # the files may have changed since the last start
            await self._start_once(e)
        except ChecksumMismatch:
            return
        except EngineStartError as exc:
            if e.abort.is_set():
                return
            delay = e.life.lost(str(exc).splitlines()[0], self.clock(), True, self.backoff_base_s, self.backoff_cap_s)
            self._gauge(e)
            log.error("engine for %s did not start (retry in %.1f s): %s", e.deployment.key, delay or 0, exc)

    # ------------------------------------------------------------------ watching
    def _ensure_watch(self) -> None:
        if self._watch is None and not self._closed:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)  # a supervision interval, not synchronisation
            for e in list(self.engines.values()):
                await self._check(e)

    def _lost(self, e: Engine, hung: str | None = None) -> None:
        """Its process exited while serving, or it is `hung` (why): out of rotation at once, its group
        stopped (a hung one SIGKILLed at once), restart after the backoff."""
        why = hung or f"the engine exited (code {e.proc.returncode}) while serving"
        delay = e.life.lost(why, self.clock(), True, self.backoff_base_s, self.backoff_cap_s)
        self._gauge(e)
        tail = "\n".join(f"    {x}" for x in tail_of(e.log_path, TAIL)) or "    (nothing)"
        log.error("engine for %s: %s; restart in %.1f s; its last log lines:\n%s",
                  e.deployment.key, why, delay or 0, tail)
        proc = e.proc
        # reap it, kill workers it left
        asyncio.get_running_loop().create_task(asyncio.to_thread(proc.stop, 0.0 if hung else None))

    async def _check(self, e: Engine) -> None:
        if e.life.state == "ready" and e.proc is not None and not e.proc.alive():
            self._lost(e)
        elif e.life.state == "ready" and self.clock() >= e.next_check and (e.check is None or e.check.done()):
            e.next_check = self.clock() + e.deployment.engine.liveness.every_s
            e.check = asyncio.get_running_loop().create_task(self._liveness(e))
        if e.life.due(self.clock()) and (e.task is None or e.task.done()):
            e.life.restart_begun()
            if self.metrics is not None:
                self.metrics.engine_restarts.labels(e.deployment.name, e.deployment.model_version).inc()
            e.task = asyncio.get_running_loop().create_task(self._start_retrying(e))

    async def _liveness(self, e: Engine) -> None:
        """Ask a ready engine's health path once (off the event loop); count what it did not answer."""
        h, proc = e.deployment.engine.liveness, e.proc
        path = e.deployment.engine.info.health_path or HEALTH_PATH
        ok = await asyncio.to_thread(http_ok, f"{e.base_url}{path}", h.timeout_s, e.auth)
        if e.proc is not proc or e.life.state != "ready":
            return  # restarted, lost or stopped meanwhile: this answer is about a process gone
        pid = proc.record.pid if proc is not None else None
        if ok and pid is not None and (squat := port_owned_by(e.port, session_pids(pid))) is not None:
            self._lost(e, hung=f"{squat}: taken out of rotation and restarted")
            return
        if ok:
            e.life.answered()
        elif e.life.unanswered(h.misses):
            self._lost(e, hung=f"the engine is alive but did not answer {path} within {h.timeout_s:g} s, "
                              f"{h.misses} times in a row (hung): killed")
        else:
            log.warning("engine for %s did not answer %s within %g s (%d of %d before a restart)",
                        e.deployment.key, path, h.timeout_s, e.life.misses, h.misses)

    def _gauge(self, e: Engine) -> None:
        if self.metrics is not None:
            self.metrics.engine_up.labels(e.deployment.name, e.deployment.model_version).set(1 if e.ready else 0)

"""The gateway, independent of HTTP: the guards (serve/guards: limits → input cap → tenant slot →
budget and cache → concurrency), then the attempts (serve/attempts.py: plan → attempts).

`Gateway.chat()` answers one request (or raises `GatewayError` with the status, type, message and
field a client should see); `Gateway.chat_stream()` does the same as a stream of pieces. Both APIs
(/chat and /v1/chat/completions) go through here, and both open a request the same way
(`Opened`: its runtime, the guards, and what they took given back at the end), so every guard
applies to both.

The decisions themselves live in pure modules (tenants, cache, admission, budget, ladder); this
module owns the collaborators they run with (configured from the manifest, swapped on a reload),
the degrade ladder's ticks, and the manifest reloads that swap the runtime (the blue/green switch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from ..procs import EngineStartError
from . import guards
from .admission import ConcurrencyGate, effective_limit
from .attempts import Attempts
from .budget import Estimator
from .canary_run import CanaryRun
from .cache import make_cache
from .ladder import Ladder, Level
from .limits import TenantLimiter
from .manifest import Manifest, ManifestError
from .metrics import GatewayMetrics
from .records import Answer, ChatCall, GatewayError, RequestState
from .runtime import ManifestFile, ProviderPool, Runtime
from .state import LocalState, make_state
from .streaming import stream_answer
from .supervisor import ChecksumMismatch, Supervisor
from .tenants import Ledger
from .trace import TraceWriter

log = logging.getLogger("quantgate.serve")

__all__ = ["Gateway", "ChatCall", "Answer", "GatewayError"]


class Gateway:
    def __init__(self, manifest_path: str | Path, *, reload_interval_s: float | None = None,
                 wall=time.time, clock=time.monotonic, bind_host: str = "127.0.0.1"):
        self.file = ManifestFile(manifest_path)
        self.bind_host = bind_host  # a manifest without keys is refused on a non-loopback bind
        self.reload_interval_s = reload_interval_s
        self.wall, self.clock = wall, clock
        self.metrics = GatewayMetrics()
        # engines the manifest names (vLLM, llama.cpp) run as processes beside the manifest's folder logs
        self.supervisor = Supervisor(self.file.path.parent / "logs" / "engines", self.metrics)
        self.pool = ProviderPool(self.supervisor)
        self.estimator = Estimator()
        self.rt: Runtime | None = None
        self.gate = ConcurrencyGate(1)
        self.ledger: Ledger | None = None
        self.limiter = TenantLimiter({})
        self.state: LocalState | None = None  # where budgets and rate buckets live (state.py)
        self.cache = None
        self.ladder: Ladder | None = None
        self.last_reload_error: str | None = None
        self.switch_failure: dict | None = None  # the last blue/green candidate that did not come up
        self.replica_id = f"{socket.gethostname()}/{os.getpid()}"
        self.trace: TraceWriter | None = None  # serving.trace; None (the default): nothing recorded
        self.canary = CanaryRun(self)  # a manifest's running canary: windows, probes, decisions
        self._breaker_seen: str | None = None  # the last breaker opening shared through the state
        self._tasks: list[asyncio.Task] = []
        self._reloading = asyncio.Lock()  # one reload at a time, so the newest file always wins
        self.metrics.in_flight.set_function(lambda: self.gate.in_flight)
        self.metrics.queued.set_function(lambda: self.gate.queued)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        m, digest = self.file.load()
        # engines come up in the background: /readyz says "starting" until they answer
        try:
            self.rt = await Runtime.build(m, digest, self.pool, str(self.file.path), self.bind_host, wait=False)
        except BaseException:
            await self.supervisor.close()
            raise
        self._configure(m, None)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._tick()),
                       loop.create_task(self.canary.run())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.canary.mlflow.close()
        if self.trace is not None:
            await self.trace.close()
        if self.cache is not None:
            await self.cache.close()
        if self.state is not None:
            await self.state.close()
        await self.pool.close()
        await self.supervisor.close()  # engines a retired runtime still held

    def _configure(self, m: Manifest, old: Runtime | None) -> None:
        s = m.serving
        if old is None or old.active.key != m.active.key or self.ladder is None:
            self.ladder = Ladder(s.ladder, self.clock())  # signals about another model do not carry over
        else:
            self.ladder.spec = s.ladder
        self.metrics.degrade_level.set(int(self.ladder.level))
        self._set_limit()
        if self.ledger is None:
            self.ledger = Ledger(s.budgets)
        else:
            self.ledger.configure(s.budgets)  # usage so far is kept across reloads
        self.limiter.configure(s.tenant_limits, tenants=len(s.api_keys))
        if old is None or old.serving.state != s.state:
            if self.state is not None:
                asyncio.get_running_loop().create_task(self.state.close())
            self.state = make_state(s.state, self.ledger, self.limiter, self.metrics)
        if old is None or old.serving.cache != s.cache or old.serving.state != s.state:
            if self.cache is not None:
                asyncio.get_running_loop().create_task(self.cache.close())
            self.cache = make_cache(s.cache, s.state, self.state)
        self.metrics.set_active(m.active, old.active if old is not None else None)
        self.canary.configure(self.rt)
        if old is None or old.serving.trace != s.trace:
            self._configure_trace(s.trace)

    def _configure_trace(self, spec) -> None:
        """Start (or stop, or move) the trace; a relative path is the manifest's directory's."""
        if self.trace is not None:
            asyncio.get_running_loop().create_task(self.trace.close())
            self.trace = None
        if spec is None:
            return
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = self.file.path.parent / path
        self.trace = TraceWriter(spec.model_copy(update={"path": str(path)}), self.metrics.trace_dropped.inc)
        self.trace.start()

    def _set_limit(self) -> None:
        s = self.rt.serving
        rung = self.ladder.actions()
        self.gate.configure(effective_limit(s.max_concurrency, rung.concurrency_factor if rung else 1.0),
                            s.queue.size)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s or self.rt.serving.reload_interval_s)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Swap in the manifest file's new content if it changed and is valid; True if swapped."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            new = self.file.changed()
            if new is None:
                return False
            m, digest = new
            rt = await Runtime.build(m, digest, self.pool, str(self.file.path), self.bind_host, wait=True)
        except ManifestError as exc:
            self.last_reload_error = str(exc)
            self.metrics.reloads.labels("invalid").inc()
            if isinstance(exc, ChecksumMismatch):
                self._switch_failed(str(exc), None)
            log.error("manifest reload refused, still serving %s: %s", self.rt.active.key, exc)
            return False
        except EngineStartError as exc:  # blue/green: the new engine never got ready; the old plan stays
            self.last_reload_error = str(exc).splitlines()[0]
            self.metrics.reloads.labels("failed").inc()
            self._switch_failed(self.last_reload_error, exc.record.log_tail[-12:])
            log.error("blue/green switch abandoned, still serving %s: %s", self.rt.active.key, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a provider that fails to start must not stop the server
            self.last_reload_error = f"{type(exc).__name__}: {exc}"
            self.metrics.reloads.labels("failed").inc()
            log.error("manifest reload failed, still serving %s: %s", self.rt.active.key, self.last_reload_error)
            return False
        old, self.rt = self.rt, rt
        self._configure(m, old)
        old.retire()  # closed once its in-flight requests are done
        self.last_reload_error = None
        self.switch_failure = None
        self.metrics.reloads.labels("ok").inc()
        log.warning("manifest reloaded: active %s (was %s), fallback %s", rt.active.key, old.active.key,
                    rt.fallback.key if rt.fallback else "none")
        return True

    def _switch_failed(self, why: str, log_tail: list[str] | None) -> None:
        self.metrics.engine_switch_failed.inc()
        self.switch_failure = {"when": self.wall(), "error": why, "log_tail": log_tail or []}

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.ladder.spec.eval_interval_s)
            transitions = self.ladder.evaluate(self.clock())
            self._apply(transitions)
            await self._share_breaker(transitions)

    async def _share_breaker(self, transitions) -> None:
        """Replicas share breaker openings: one that opens it says so for one cool-down; the others
        open theirs too (once per opening) and then probe and close on their own evidence."""
        key, spec = self.rt.active.key, self.ladder.spec
        if not spec.enabled:
            return
        if any(t.to == Level.BREAKER and t.frm != Level.BREAKER for t in transitions):
            self._breaker_seen = f"{self.replica_id}:{self.clock():.3f}"
            await self.state.publish_breaker(key, self._breaker_seen, spec.breaker_cooldown_s)
            return
        event = await self.state.breaker_event(key)
        if event is not None and event != self._breaker_seen:
            self._breaker_seen = event
            self._apply(self.ladder.trip(self.clock(), f"breaker opened by replica {event.split(':')[0]}"))

    def _apply(self, transitions) -> None:
        for t in transitions:
            self.metrics.transitions.labels(t.frm.label, t.to.label).inc()
            log.warning("degrade ladder %s → %s: %s", t.frm.label, t.to.label, t.reason)
        if transitions:
            self.metrics.degrade_level.set(int(self.ladder.level))
            self._set_limit()

    async def readiness(self) -> tuple[bool, dict]:
        rt = self.rt
        out: dict = {"manifest": str(self.file.path), "digest": rt.digest[:16],
                     "active": rt.active.key, "degrade_level": self.ladder.level.label}
        ok, why = await rt.providers["active"].ready()
        out["active_ready"] = why
        if rt.fallback is not None:
            out["fallback"] = rt.fallback.key
            fb_ok, out["fallback_ready"] = await rt.providers["fallback"].ready()
            if not ok and fb_ok and rt.launched("active"):
                ok = True  # the active engine is (re)starting: the fallback answers meanwhile
        engines = rt.engines()
        if engines:
            out["engines"] = engines
        if self.switch_failure:
            out["engine_switch_failed"] = self.switch_failure
        canary = self.canary.status()
        if canary is not None:
            out["canary"] = canary
        if self.last_reload_error:
            out["reload_error"] = self.last_reload_error
        await self.state.probe()
        out["shared_state"] = self.state.status()
        return ok, out

    # ------------------------------------------------------------------ requests
    async def chat(self, call: ChatCall) -> Answer:
        async with Opened(self, call, self._client_closed) as (rt, ctx, hit):
            return hit if hit is not None else await self._attempts(rt, call, ctx).answer()

    def _client_closed(self, rt: Runtime, call: ChatCall, ctx: RequestState) -> None:
        """The client left: recorded as client_closed, charged for what reached the upstream."""
        self._attempts(rt, call, ctx).client_closed()

    def _attempts(self, rt: Runtime, call: ChatCall, ctx: RequestState) -> Attempts:
        """The attempts of this request, with the collaborators in force when it started."""
        # the canary arm has a ladder of its own, off: its faults are the canary's gates' to judge, and
        # they must neither degrade the stable deployment nor be degraded away
        ladder = self.ladder if rt.arm == "stable" else self.canary.ladder
        return Attempts(rt, call, ctx, self.metrics, self.estimator, ladder, self.cache, self.clock, self.wall,
                        self._apply)

    # ------------------------------------------------------------------ streaming
    async def chat_stream(self, call: ChatCall) -> AsyncIterator[tuple[str, object]]:
        """Yields ('start', Deployment), then ('delta', str)…, then ('end', Answer).

        Errors before the first piece raise GatewayError (the HTTP layer can still send a status);
        once a piece is out, the deployment is fixed: a deadline cuts the answer short
        (finish_reason 'length'), an upstream failure ends it with ('error', message). A client
        that leaves mid-answer is charged for what it was sent (streaming.py).
        """
        async with Opened(self, call) as (rt, ctx, hit):
            if hit is not None:
                yield "start", hit.deployment
                yield "delta", hit.text
                yield "end", hit
                return
            # closed here, inside the opening: a client that leaves (the HTTP layer closes this
            # generator, even while blocked writing to it) is charged before the reservation settles
            answer = stream_answer(self._attempts(rt, call, ctx))
            try:
                async for ev in answer:
                    yield ev
            finally:
                await answer.aclose()


class Opened:
    """One request's opening, shared by chat and chat_stream (`async with Opened(gw, call) as (rt, ctx,
    hit)`): it keeps the runtime in force now until the request ends (a reload meanwhile does not
    move it), runs the guards, and gives back what they took (slots, the reservation) whatever way
    the request ends, cancellation included; `hit` is a cached Answer, or None. `on_cancel` runs
    first when the client leaves, while what was taken is still held.

    A class rather than contextlib.asynccontextmanager: it is on every request, and the generator
    version costs about 2 us more each time."""

    __slots__ = ("gw", "call", "on_cancel", "rt", "ctx", "base")

    def __init__(self, gw: Gateway, call: ChatCall,
                 on_cancel: Callable[[Runtime, ChatCall, RequestState], None] | None = None):
        self.gw, self.call, self.on_cancel = gw, call, on_cancel

    async def __aenter__(self) -> tuple[Runtime, RequestState, Answer | None]:
        base = self.base = self.gw.rt
        base.acquire()
        call = self.call
        rt = self.rt = base if base.canary_view is None else base.for_call(call.tenant, call.user_id)
        call.arm = rt.arm
        ctx = self.ctx = RequestState.empty()
        try:
            return rt, ctx, await guards.admit(self.gw, rt, self.call, ctx)
        except BaseException as exc:  # `async with` runs no __aexit__ when entering fails
            await self.__aexit__(type(exc), exc, None)
            raise

    async def __aexit__(self, typ, exc, tb) -> bool:
        try:
            if isinstance(exc, asyncio.CancelledError) and self.on_cancel is not None:
                self.on_cancel(self.rt, self.call, self.ctx)
        finally:
            guards.give_back(self.gw, self.call, self.ctx)
            self.base.release()
            if self.ctx.used_tokens:  # who uses the engine: the ladder cuts the heaviest tenants first
                self.gw.ladder.observe_usage(self.call.tenant, self.ctx.used_tokens, self.gw.clock())
        return False

"""Helpers shared by the gateway tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from quantgate.serve.server import listen_socket
from quantgate.serve.upstream_stub import Stub, make_stub_app
from quantgate.util import atomic_write_text


def mock(name: str, version: str = "1", **engine) -> dict:
    return {"name": name, "model_version": version, "provider": {"kind": "mock", "delay_ms": 0, **engine}}


def base_manifest(**serving) -> dict:
    """A quiet manifest: mock active + mock fallback, ladder effectively off unless asked."""
    s = {"default_budget_ms": 2000, "max_budget_ms": 10000, "max_concurrency": 32, "anonymous": True,
         "reload_interval_s": 0.05, "fallback": mock("fallback", reply_tokens=4)}
    s.update(serving)
    return {"schema_version": 2, "active": mock("primary", reply_tokens=8), "serving": s}


def write(path: Path, manifest: dict) -> Path:
    atomic_write_text(path, json.dumps(manifest))
    return path


class StubThread:
    """The stub upstream on its own loop in a thread (like the gateway), on a random port."""

    def __init__(self):
        self.stub = Stub()
        self._ready = threading.Event()
        self.loop = None
        self.port = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._main())

    async def _main(self):
        runner = web.AppRunner(make_stub_app(self.stub), access_log=None, handler_cancellation=True,
                               shutdown_timeout=0.5)
        await runner.setup()
        sock = listen_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self):
        self._t.start()
        assert self._ready.wait(10)
        return self

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._t.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class Counting:
    """A provider's exact token count (its tokenizer), counting how often it was asked."""

    def __init__(self, n):
        self.n, self.asked = n, 0

    def count_tokens(self, messages):
        self.asked += 1
        return self.n


# ------------------------------------------------------------------------------ HTTP
def metric(text: str, name: str, **labels) -> float:
    """A sample's value from Prometheus text (0.0 when absent), matching the given labels."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def chat_body(prompt: str = "hello", user_id: str = "u1", **more) -> dict:
    return {"user_id": user_id, "prompt": prompt, **more}


def oai_body(content: str = "hello", **more) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": content}], **more}


async def until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    """Poll a cheap predicate (a counter, a gauge) until it holds; fail loudly after timeout_s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def parse_sse(raw: bytes) -> list:
    """SSE body → list of decoded JSON events, with the final '[DONE]' kept as the string."""
    out = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if not block.startswith("data:"):
            continue
        data = block[5:].strip()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def ladder_level(srv):
    """Evaluate the gateway's ladder now (as its timer would) and return its level."""
    async def evaluate():
        gw = srv.gateway
        gw._apply(gw.ladder.evaluate(gw.clock()))
        return gw.ladder.level
    return srv.call(evaluate())


# ------------------------------------------------------------------------------ holding requests
def hold(srv, role: str = "active") -> asyncio.Event:
    """Make every request to that provider wait for the returned event (set it on the gateway's loop)."""
    async def _make():
        ev = asyncio.Event()
        srv.gateway.rt.providers[role].hold = ev
        return ev
    return srv.call(_make())


def release(srv, ev: asyncio.Event) -> None:
    srv.loop.call_soon_threadsafe(ev.set)


async def post(s: aiohttp.ClientSession, url: str, body: dict, **kw) -> tuple[int, dict, dict, float]:
    t = time.perf_counter()
    async with s.post(url, json=body, **kw) as r:
        data = await r.json(content_type=None)
        return r.status, data, dict(r.headers), time.perf_counter() - t


# ------------------------------------------------------------------------------ real processes
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(ok, proc, what: str, timeout_s: float) -> None:
    """Poll a readiness check until it passes (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not ok():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout_s} s")
        time.sleep(0.02)


def _stop(proc, timeout_s: float = 10) -> None:
    import signal
    import subprocess

    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    """A real redis-server on a loopback port, no persistence; stop() and start() keep the port."""

    def __init__(self, binary: str, workdir: Path):
        self.binary, self.workdir, self.port, self.proc = binary, workdir, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> "RedisServer":
        import subprocess

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                                      "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(self._pong, self.proc, "redis-server", 20)
        return self

    def stop(self) -> None:
        _stop(self.proc)


class GatewayProcess:
    """`quantgate serve MANIFEST` in its own process on a loopback port (a real replica)."""

    def __init__(self, manifest: Path, log_path: Path):
        self.manifest, self.log_path, self.port, self.proc = manifest, log_path, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> "GatewayProcess":
        import os
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "quantgate", "serve", str(self.manifest), "--port",
                                      str(self.port), "--log-level", "warning"], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        _poll(self._healthy, self.proc, f"gateway on port {self.port} (log: {self.log_path})", 60)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self._log.close()

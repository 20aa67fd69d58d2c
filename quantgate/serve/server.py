"""Running the gateway: the listening socket, the foreground server, and a background-thread server.

Two traps seen with Python gateways under load are handled here, at the socket:
- Nagle + delayed ACK adds ~40 ms to a keep-alive response written in two segments: the listening
  socket gets TCP_NODELAY, which accepted sockets inherit on Linux (aiohttp sets it per connection
  too; both are cheap).
- A listen backlog of 5 drops connections when hundreds of clients connect at once: the backlog is
  4096 (the kernel caps it at net.core.somaxconn).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import time
from pathlib import Path

from aiohttp import web

from .app import CONNECTIONS, make_app
from .connections import ConnectionTable
from .gateway import Gateway

log = logging.getLogger("quantgate.serve")
BACKLOG = 4096


def listen_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def limit_connections(server: web.Server, table: ConnectionTable) -> None:
    """Apply the connection table's rules (serve/connections.py) as connections open and close:
    a newcomer refused is closed at once, and one it displaces (the oldest that passed no key
    check) is closed for it. Wraps the server's connection hooks on this one instance: aiohttp has
    no setting for it."""
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler, transport) -> None:
        made(handler, transport)
        peer = transport.get_extra_info("peername")
        keep, close = table.opened(handler, str(peer[0]) if peer else "?")
        for old in close:
            old.force_close()
            if old.transport is not None:
                old.transport.close()
        if not keep:
            n = table.refused
            if n in (1, 1000) or n % 100_000 == 0:
                log.warning("connections: closing new ones (%d so far): the limit %d is reached or a client "
                            "address holds %d not yet past the key check", n, table.limit, table.per_client)
            handler.force_close()
            transport.close()

    def connection_lost(handler, exc=None) -> None:
        table.closed(handler)
        lost(handler, exc)

    server.connection_made, server.connection_lost = connection_made, connection_lost


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (bad request line, bad or oversized headers) at
    ERROR with a traceback, so any client could fill the error log. Those records become one WARNING
    line per `interval_s` with how many there were; every other record passes untouched."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        from aiohttp.http_exceptions import BadHttpMessage

        self.kind, self.interval_s, self.clock = BadHttpMessage, interval_s, clock
        self.count, self.last = 0, None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, self.kind):
            return True
        self.count += 1
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "malformed HTTP requests from clients: %d since the last report (latest: %s: %.200s)"
        what = str(getattr(exc, "message", "") or exc).strip().splitlines()
        record.args = (self.count, type(exc).__name__, what[0] if what else "")
        record.exc_info, record.exc_text = None, None
        self.count, self.last = 0, now
        return True


def quiet_malformed_requests() -> None:
    """Install MalformedRequests on aiohttp's server logger once per process."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in logger.filters):
        logger.addFilter(MalformedRequests())


async def start(gw: Gateway, host: str, port: int) -> tuple[web.AppRunner, socket.socket]:
    """Start the gateway and listen; returns the runner (to clean up) and the bound socket.

    A client that left has its handler cancelled (handler_cancellation), so an abandoned
    request frees its slot at once. Headers must arrive within header_timeout_s of the
    connection opening (or of the previous answer): aiohttp's keep-alive timer closes a
    connection whose next request has not been fully received by then, which also bounds
    idle keep-alive connections. A request refused before its body was read (408, 413) is
    closed after at most a second of reading what is left (lingering_time), not aiohttp's ten.
    """
    await gw.start()
    quiet_malformed_requests()
    http = gw.rt.serving.http
    app = make_app(gw, host)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           keepalive_timeout=http.header_timeout_s, lingering_time=1.0, shutdown_timeout=1.0)
    await runner.setup()
    limit_connections(runner.server, app[CONNECTIONS])
    sock = listen_socket(host, port)
    await web.SockSite(runner, sock, backlog=BACKLOG).start()
    return runner, sock


def tune_gc() -> None:
    """Keep the collector off the hot path of a long-running server.

    Everything loaded at start-up (libraries, the manifest, providers) is moved out of the
    collector's sight (gc.freeze), and the youngest generation is collected every 20,000
    allocations instead of 700: request-scoped objects mostly die before that, so far fewer of
    them are promoted and rescanned. Measured under bench/gateway.py load: collection time went
    from ~50 µs to ~6 µs per request.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def serve(manifest: str | Path, host: str = "127.0.0.1", port: int = 8787, *,
          reload_interval_s: float | None = None, on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM. Raises ManifestError before listening if the manifest is bad."""

    async def main():
        gw = Gateway(manifest, reload_interval_s=reload_interval_s, bind_host=host)
        runner, sock = await start(gw, host, port)
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread/unix
                pass
        if on_ready:
            on_ready(gw, sock.getsockname())
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await gw.close()

    asyncio.run(main())


class ServerThread:
    """A gateway on its own event loop in a background thread: for tests, benchmarks, notebooks.

    `start()` returns once the socket listens (or raises what start-up raised); `call(coro)` runs
    a coroutine on the gateway's loop, which is how tests reach provider hooks safely.
    """

    def __init__(self, manifest: str | Path, host: str = "127.0.0.1", port: int = 0,
                 reload_interval_s: float | None = None):
        self.manifest, self.host, self.port = manifest, host, port
        self.reload_interval_s = reload_interval_s
        self.gateway: Gateway | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="quantgate-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"gateway did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        try:
            self.gateway = Gateway(self.manifest, reload_interval_s=self.reload_interval_s, bind_host=self.host)
            runner, sock = await start(self.gateway, self.host, self.port)
            self.port = sock.getsockname()[1]
            self._stop = asyncio.Event()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self.gateway.close()

    def call(self, coro, timeout_s: float = 30):
        """Run a coroutine on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30) -> None:
        if self.loop is not None and self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

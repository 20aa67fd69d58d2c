"""Test doubles for the load generator: a real OpenAI-compatible streaming server on loopback
with known, injected delays, an in-process instant engine and a virtual clock.

The server streams like vLLM: an empty role chunk at once, then one token per chunk at
absolute deadlines measured from the handler's entry (first token at +ttft, token k at
+ttft + k·gap), so scheduler overshoot never accumulates; then a usage chunk and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

from aiohttp import web

from quantgate.evaluate.clients.base import Chunk, GenerationRequest


class FakeOpenAI:
    def __init__(self, ttft: float = 0.0, gap: float = 0.0, mode: str = "ok", usage: bool = True,
                 tokens_per_chunk: int = 1, prompt_tokens: int = 17):
        self.ttft, self.gap, self.mode, self.usage = ttft, gap, mode, usage
        self.tokens_per_chunk, self.prompt_tokens = tokens_per_chunk, prompt_tokens
        self.bodies: list[dict] = []
        self.request_ids: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._runner = None
        self._release = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "FakeOpenAI":
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._release.set()  # let stalled handlers finish
        await self._runner.cleanup()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _chat(self, request):
        loop = asyncio.get_running_loop()
        entry = loop.time()
        body = await request.json()
        self.bodies.append(body)
        self.request_ids.append(request.headers.get("X-Quantgate-Request", ""))
        uuid.UUID(request.headers["X-Request-Id"])  # llama.cpp's server accepts only UUIDs here
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom: model crashed", "code": 500}}, status=500)
        if self.mode == "json":  # a server that ignores `stream`
            n = int(body["max_tokens"])
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "tok " * n}}],
                                      "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        counted = True
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)

            async def send(obj) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj)
                await resp.write(f"data: {data}\n\n".encode())

            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if self.mode == "stall":
                await self._release.wait()
                return resp
            n = int(body["max_tokens"])
            chunks = [self.tokens_per_chunk] * (n // self.tokens_per_chunk)
            if n % self.tokens_per_chunk:
                chunks.append(n % self.tokens_per_chunk)
            for k, size in enumerate(chunks):
                delay = entry + self.ttft + k * self.gap - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send({"choices": [{"index": 0, "delta": {"content": "tok " * size}}]})
                if self.mode == "midstream_error":
                    await send({"object": "error", "message": "CUDA out of memory", "code": 500})
                    await resp.write_eof()
                    return resp
            if self.usage:
                await send({"choices": [], "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                                                     "total_tokens": self.prompt_tokens + n}})
            # leave the in-flight count before the client can see the end of the stream, so the
            # server's count never runs ahead of the client's own
            self.in_flight -= 1
            counted = False
            if self.mode != "nodone":
                await send("[DONE]")
            await resp.write_eof()
            return resp
        finally:
            if counted:
                self.in_flight -= 1


class ServerThread:
    """A FakeOpenAI on its own event loop in a thread, for code that runs asyncio.run itself."""

    def __init__(self, **kw):
        self.server = FakeOpenAI(**kw)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self.server

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class InstantEngine:
    """An in-process engine: `tokens` one-token chunks, no waiting (or a virtual-time cost)."""

    name = "instant"

    def __init__(self, clock=None, cost_s: float = 0.0):
        self.clock, self.cost_s = clock, cost_s
        self.seen: list[GenerationRequest] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, req: GenerationRequest):
        self.seen.append(req)
        if self.clock is not None and self.cost_s:
            self.clock.advance(self.cost_s)
        await asyncio.sleep(0)
        for _ in range(req.max_tokens):
            yield Chunk(text="x", tokens=1)


class VirtualClock:
    """A clock that moves only when told; its sleep jumps straight to the wake-up time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt

    async def sleep(self, dt: float) -> None:
        # let tasks that are ready run at the current time first, as a real wait would
        self.sleeps.append(dt)
        await asyncio.sleep(0)
        self.now += dt

"""A tiny OpenAI-compatible upstream with scripted faults, for tests, benchmarks and demos.

It answers POST /v1/chat/completions (plain and SSE) and GET /v1/models at once. The request's
`model` picks the behaviour, so one stub plays every role a test needs:

    ok (or anything else)   answer at once (the zero-delay upstream of the benchmark)
    slow-<ms>               wait <ms> before answering (streams: before the first chunk)
    drip-<ms>               stream one word every <ms> (plain requests: the sum, then the answer)
    hang                    never answer (until the client gives up, 120 s at most)
    error-<status>          answer with that HTTP status, e.g. error-503
    reset                   close the connection without answering
    garbage                 200 with a body that is not a chat completion

Run alone: python -m quantgate.serve.upstream_stub --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

WORDS = "the quick brown fox jumps over the lazy dog".split()
_OK = json.dumps({
    "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "ok",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "stub answer: " + " ".join(WORDS)},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 11, "total_tokens": 19},
}).encode()


class Stub:
    def __init__(self):
        self.requests = 0  # how many chat requests arrived (tests read it)
        self.last_body: dict | None = None  # the last request body, as the gateway sent it (tests read it)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = json.loads(await request.read())
        self.last_body = body
        model = str(body.get("model", "ok"))
        stream = bool(body.get("stream"))
        n = max(1, min(int(body.get("max_tokens") or 9), 64))
        kind, _, arg = model.partition("-")
        if kind == "ok" and not stream:
            return web.Response(body=_OK, content_type="application/json")  # the fast path
        if kind == "hang":
            await asyncio.sleep(120)
        if kind == "error":
            return web.Response(status=int(arg or 500), text="stub upstream error")
        if kind == "reset":
            request.transport.close()
            return web.Response(status=500)  # never sent: the connection is gone
        if kind == "garbage":
            return web.Response(body=b'{"not": "a completion"}', content_type="application/json")
        delay = float(arg) / 1000 if kind == "slow" and arg else 0.0
        gap = float(arg) / 1000 if kind == "drip" and arg else 0.0
        words = [WORDS[i % len(WORDS)] for i in range(n)]
        if delay:
            await asyncio.sleep(delay)
        if not stream:
            if gap:
                await asyncio.sleep(gap * n)
            return web.json_response({
                "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "finish_reason": "length" if n == int(body.get("max_tokens") or 0) else "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await self._drip(resp, model, words, gap, body)
        except ConnectionResetError:
            pass  # the client stopped reading (a gateway cutting an answer at its budget)
        return resp

    @staticmethod
    async def _drip(resp: web.StreamResponse, model: str, words: list[str], gap: float, body: dict) -> None:
        n = len(words)
        for i, w in enumerate(words):
            if i and gap:
                await asyncio.sleep(gap)
            chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        last = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "ok", "object": "model"}]})


STUB_KEY = web.AppKey("stub", Stub)


def make_stub_app(stub: Stub | None = None) -> web.Application:
    stub = stub or Stub()
    app = web.Application()
    app[STUB_KEY] = stub
    app.router.add_post("/v1/chat/completions", stub.chat)
    app.router.add_get("/v1/models", stub.models)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()
    # handler_cancellation: a 'hang' handler ends when its client goes away
    web.run_app(make_stub_app(), host=a.host, port=a.port, access_log=None, backlog=4096, print=None,
                handler_cancellation=True, shutdown_timeout=1)


if __name__ == "__main__":
    main()

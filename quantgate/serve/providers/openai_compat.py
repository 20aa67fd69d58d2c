"""Any OpenAI-compatible upstream (vLLM, SGLang, TensorRT-LLM, TGI, llama.cpp's server).

One pooled aiohttp session per deployment, opened at start and closed when the deployment is
retired after a reload. Non-streaming calls ask for a plain JSON answer; streaming calls read the
upstream's SSE line by line and ask for usage in the last chunk. A 5xx, a reset connection or an
unreadable answer is a ProviderError, which the gateway turns into a fallback or a clean error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import AsyncIterator

import aiohttp
from yarl import URL

from ...procs import withhold
from .base import GenRequest, GenResult, Provider, ProviderError, StreamStats, estimate_tokens, status_kind
from .tokens import counter_for

_READY_TTL_S = 5.0


class OpenAIProvider(Provider):
    kind = "openai"
    honours_timeout = True

    def __init__(self, deployment):
        super().__init__(deployment)
        self.url = URL(f"{self.spec.base_url}/chat/completions")  # parsed once, not per request
        self.headers = {"content-type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            withhold(self.spec.api_key_env)  # the upstream's key stays with the gateway
            if key:
                self.headers["authorization"] = f"Bearer {key}"
        self.session: aiohttp.ClientSession | None = None
        self._ready: tuple[float, bool, str] = (0.0, False, "not checked")
        self.counter = None  # the checkpoint's tokenizer and chat template, when it is on this machine

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return self.counter.count(messages) if self.counter is not None else None

    async def start(self) -> None:
        # once per checkpoint folder (cached), off the event loop: the input cap counts with it
        self.counter = await asyncio.get_running_loop().run_in_executor(None, counter_for, self.deployment)
        conn = aiohttp.TCPConnector(limit=self.spec.max_connections, ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s), headers=self.headers,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def ready(self) -> tuple[bool, str]:
        t, ok, why = self._ready
        if time.monotonic() - t < _READY_TTL_S:
            return ok, why
        try:
            async with self.session.get(f"{self.spec.base_url}/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                ok, why = r.status < 500, f"GET /models → {r.status}"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready, with the reason
            ok, why = False, f"{self.spec.base_url} unreachable: {type(exc).__name__}: {exc}"
        self._ready = (time.monotonic(), ok, why)
        return ok, why

    def _payload(self, req: GenRequest, stream: bool) -> bytes:
        body: dict = {"model": self.spec.model, "messages": req.messages, "max_tokens": req.max_tokens,
                      "stream": stream}
        for k in ("temperature", "top_p", "stop", "seed"):
            v = getattr(req, k)
            if v is not None:
                body[k] = v
        if req.ignore_eos:  # only when asked: an upstream that does not know it may refuse the field
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

    async def generate(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=min(req.timeout_s, self.spec.timeout_s)) if req.timeout_s else None
        try:
            async with self.session.post(self.url, data=self._payload(req, False), timeout=timeout) as r:
                t1 = time.perf_counter()
                raw = await r.read()
                t2 = time.perf_counter()
                if r.status != 200:
                    raise ProviderError(status_kind(r.status), f"upstream answered {r.status}: {raw[:200].decode(errors='replace')}")
        except asyncio.TimeoutError:
            raise  # the request's deadline (aiohttp's timeout errors are TimeoutErrors too)
        except aiohttp.ClientError as exc:
            raise ProviderError("error", f"upstream connection failed: {type(exc).__name__}: {exc}") from None
        try:
            obj = json.loads(raw)
            choice = obj["choices"][0]
            text = choice["message"].get("content") or ""
            usage = obj.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError("error", f"upstream answer is not a chat completion: {raw[:200]!r}") from None
        return GenResult(
            text=text,
            tokens_in=usage.get("prompt_tokens") or estimate_tokens(req.prompt()),
            tokens_out=usage.get("completion_tokens") or estimate_tokens(text),
            finish_reason=choice.get("finish_reason") or "stop",
            ttft_ms=(t1 - t0) * 1000, generation_ms=(t2 - t1) * 1000,
        )

    async def stream(self, req: GenRequest, stats: StreamStats) -> AsyncIterator[str]:
        text_len = 0
        try:
            async with self.session.post(self.url, data=self._payload(req, True)) as r:
                if r.status != 200:
                    raw = await r.read()
                    raise ProviderError(status_kind(r.status), f"upstream answered {r.status}: {raw[:200].decode(errors='replace')}")
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise ProviderError("error", f"upstream sent a bad SSE chunk: {data[:120]!r}") from None
                    usage = obj.get("usage")
                    if usage:
                        stats.tokens_in = usage.get("prompt_tokens") or stats.tokens_in
                        stats.tokens_out = usage.get("completion_tokens") or stats.tokens_out
                    for ch in obj.get("choices") or ():
                        if ch.get("finish_reason"):
                            stats.finish_reason = ch["finish_reason"]
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            if stats.t_first is None:
                                stats.t_first = time.perf_counter()
                            text_len += len(piece)
                            yield piece
        except aiohttp.ClientError as exc:
            raise ProviderError("error", f"upstream connection failed: {type(exc).__name__}: {exc}") from None
        if not stats.tokens_in:
            stats.tokens_in = estimate_tokens(req.prompt())
        if not stats.tokens_out:
            stats.tokens_out = max(1, (text_len + 3) // 4)

"""The mock provider: the chapter's mock mode, for trying the gateway without a model.

Deterministic: the answer is a function of the prompt, the seed and the deployment name; the
delays and failures follow a seeded random sequence, so a run is reproducible request by request.
Configurable: time to first token (`delay_ms` + `jitter_ms`), pace (`tokens_per_s`), reply length,
`error_rate`.

Two hooks make tests synchronise on events instead of sleeps: `entered` counts requests that
reached the provider, and when `hold` is set to an asyncio.Event every request waits for it
(still bounded by the gateway's deadline, which cancels the wait).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import AsyncIterator

from .base import GenRequest, GenResult, Provider, ProviderError, StreamStats, estimate_tokens

_WORDS = ("budget cache latency token model deploy rollback gate queue metric answer steady fast "
          "cheap safe trace window level tenant limit retry stream fallback probe").split()


class MockProvider(Provider):
    kind = "mock"

    def __init__(self, deployment):
        super().__init__(deployment)
        self._rng = random.Random(self.spec.seed)
        self.entered = 0
        self.hold: asyncio.Event | None = None
        self._prefix = f"[{deployment.name}]"

    def reply(self, prompt: str, n: int) -> list[str]:
        """n words chosen by a hash of (seed, prompt): same prompt, same answer."""
        h = hashlib.blake2b(f"{self.spec.seed}\0{prompt}".encode(), digest_size=8).digest()
        x = int.from_bytes(h, "little")
        out = [self._prefix]
        for _ in range(n - 1):
            x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
            out.append(_WORDS[(x >> 33) % len(_WORDS)])
        return out

    def _draw(self) -> tuple[float, bool]:
        # Both draws happen for every request, so the error sequence does not depend on delays.
        jitter = self._rng.random() * self.spec.jitter_ms
        fail = self._rng.random() < self.spec.error_rate
        return (self.spec.delay_ms + jitter) / 1000.0, fail

    async def _before_first_token(self) -> None:
        self.entered += 1
        delay, fail = self._draw()
        if self.hold is not None:
            await self.hold.wait()
        if delay > 0:
            await asyncio.sleep(delay)
        if fail:
            raise ProviderError("error", f"mock upstream error (error_rate={self.spec.error_rate})")

    def _n(self, req: GenRequest) -> int:
        return max(1, min(self.spec.reply_tokens, req.max_tokens))

    async def generate(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        await self._before_first_token()
        t1 = time.perf_counter()
        prompt = req.prompt()
        n = self._n(req)
        if self.spec.tokens_per_s > 0 and n > 1:
            await asyncio.sleep((n - 1) / self.spec.tokens_per_s)
        words = self.reply(prompt, n)
        return GenResult(
            text=" ".join(words), tokens_in=estimate_tokens(prompt), tokens_out=n,
            finish_reason="length" if n < self.spec.reply_tokens else "stop",
            ttft_ms=(t1 - t0) * 1000, generation_ms=(time.perf_counter() - t1) * 1000,
        )

    async def stream(self, req: GenRequest, stats: StreamStats) -> AsyncIterator[str]:
        await self._before_first_token()
        prompt = req.prompt()
        n = self._n(req)
        stats.tokens_in = estimate_tokens(prompt)
        stats.finish_reason = "length" if n < self.spec.reply_tokens else "stop"
        gap = 1.0 / self.spec.tokens_per_s if self.spec.tokens_per_s > 0 else 0.0
        for i, w in enumerate(self.reply(prompt, n)):
            if i and gap:
                await asyncio.sleep(gap)
            if stats.t_first is None:
                stats.t_first = time.perf_counter()
            stats.tokens_out = i + 1
            yield w if i == 0 else " " + w

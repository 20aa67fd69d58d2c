"""The narrow contract every provider meets, and the records that cross it.

A provider turns a `GenRequest` (chat messages, output-token cap, sampling) into a `GenResult`
(text, tokens in/out, timing split), or an async stream of text pieces. It knows nothing about
budgets, tenants or caching: the gateway wraps every call in the request's deadline and cancels
it when the deadline passes, so a provider only has to stop cleanly when cancelled (kill its
subprocess, stop its generation thread, drop its connection).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


class ProviderError(Exception):
    """A failed call: kind is 'error' (5xx, reset, bad output) or 'unavailable' — the upstream's
    fault — or 'rejected' (the upstream refused this request with a 4xx) or 'invalid' (the
    provider cannot take this input): the client's, which never moves the degrade ladder."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class GenRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    timeout_s: float | None = None  # set by the gateway for providers with honours_timeout
    ignore_eos: bool = False  # vLLM's extension: write max_tokens even past end-of-sequence (load tests)


    def prompt(self) -> str:
        """The conversation as one string, for providers that take a single prompt."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            return self.messages[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


@dataclass(slots=True)
class GenResult:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str = "stop"     # 'stop' or 'length'
    ttft_ms: float = 0.0            # request sent → first token (or first byte of a non-streamed answer)
    generation_ms: float = 0.0      # first token → last token


@dataclass(slots=True)
class StreamStats:
    """Filled in by a provider's stream as it goes; read by the gateway when the stream ends."""

    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str = "stop"
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


def status_kind(status: int) -> str:
    """An upstream HTTP status as a failure kind: 4xx is the request's fault, except 408/429 (overload)."""
    return "rejected" if 400 <= status < 500 and status not in (408, 429) else "error"


def estimate_tokens(text: str) -> int:
    """About four characters a token: only when the upstream does not report usage."""
    return max(1, (len(text) + 3) // 4)


class Provider:
    """Base class: override generate() and, for real streaming, stream()."""

    kind = "base"
    # True when generate() enforces req.timeout_s itself (raising TimeoutError), so the gateway
    # need not wrap the call in a second timer of its own: one timer less on the hot path.
    honours_timeout = False

    def __init__(self, deployment: Any):
        self.deployment = deployment
        self.spec = deployment.provider

    async def start(self) -> None:
        """Open connections, load weights. May be slow; the gateway awaits it before serving."""

    async def close(self) -> None:
        """Release what start() took."""

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"

    @property
    def available(self) -> bool:
        """False while the request path should skip this provider without trying it (a supervised
        engine starting or restarting); cheap, called per request."""
        return True

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """The prompt's length in this deployment's own tokens, when the provider holds its tokenizer
        (in-process engines); None: the gateway's estimate stands. Called on the event loop: keep it cheap."""
        return None

    async def generate(self, req: GenRequest) -> GenResult:
        raise NotImplementedError

    async def stream(self, req: GenRequest, stats: StreamStats) -> AsyncIterator[str]:
        """Default: one piece, the whole answer."""
        res = await self.generate(req)
        stats.tokens_in, stats.tokens_out, stats.finish_reason = res.tokens_in, res.tokens_out, res.finish_reason
        stats.t_first = time.perf_counter()
        yield res.text


if sys.version_info >= (3, 11):
    async def within(aw, seconds: float):
        """Await `aw`, cancelling it after `seconds` (TimeoutError): the request's deadline.

        asyncio.timeout cancels in place; wait_for would start a task per call on the hot path.
        """
        async with asyncio.timeout(seconds):
            return await aw
else:  # pragma: no cover - Python 3.10
    within = asyncio.wait_for


async def generate_within(prov: Provider, req: GenRequest, seconds: float) -> GenResult:
    """`prov.generate(req)` bounded by `seconds`: by the provider itself when it honours a timeout (its
    own deadline on the upstream call), else cancelled from outside."""
    if prov.honours_timeout:
        req.timeout_s = seconds
        return await prov.generate(req)
    return await within(prov.generate(req), seconds)

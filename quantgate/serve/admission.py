"""Admission: a maximum in-flight, an optional short bounded queue, and fast 429s beyond them.

Overload becomes predictable rejection instead of collapse: a request that cannot get a slot
(or a queue place that turns into a slot within `max_wait`) is answered at once with 429 and a
`Retry-After`, before any upstream work is done.

`decide` and `retry_after_s` are pure; `ConcurrencyGate` is the small asyncio wrapper the gateway
uses (FIFO hand-off, so a queued request is never overtaken by a later arrival).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import Deployment


class Admit(Enum):
    NOW = "now"
    QUEUE = "queue"
    REJECT = "reject"


def decide(in_flight: int, queued: int, limit: int, queue_size: int) -> Admit:
    if in_flight < limit and queued == 0:
        return Admit.NOW
    if queued < queue_size:
        return Admit.QUEUE
    return Admit.REJECT


def effective_limit(max_concurrency: int, concurrency_factor: float) -> int:
    """The heavy rung rate-limits by shrinking the limit; never below one slot."""
    return max(1, math.floor(max_concurrency * concurrency_factor))


def retry_after_s(in_flight: int, queued: int, limit: int, typical_latency_ms: float) -> int:
    """Whole seconds (what the header allows) until a slot is likely free; at least 1.

    Roughly: the work ahead of the caller, (in_flight + queued) requests served `limit` at a
    time, each taking the typical latency.
    """
    waves = (in_flight + queued + 1) / max(1, limit)
    return max(1, math.ceil(waves * max(0.0, typical_latency_ms) / 1000.0))


class ConcurrencyGate:
    """Slots with a FIFO waiting line; one instance per gateway, used from one event loop."""

    def __init__(self, limit: int, queue_size: int = 0):
        self.limit = limit
        self.queue_size = queue_size
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def configure(self, limit: int, queue_size: int) -> None:
        """New limits (a reload, or the ladder's heavy rung); wakes waiters that now fit."""
        self.limit, self.queue_size = limit, queue_size
        self._hand_off()

    def try_acquire(self) -> Admit:
        verdict = decide(self.in_flight, self.queued, self.limit, self.queue_size)
        if verdict is Admit.NOW:
            self.in_flight += 1
        return verdict

    async def wait(self, timeout_s: float) -> bool:
        """After try_acquire() said QUEUE: wait up to timeout_s for a slot; True when holding one."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(0.0, timeout_s))
            return True
        except asyncio.TimeoutError:
            self._abandon(fut)
            return False
        except asyncio.CancelledError:  # the client went away while queued
            self._abandon(fut)
            raise

    def _abandon(self, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled():
            self.release()  # the slot was handed over just as we gave up: pass it on
            return
        fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def release(self) -> None:
        self.in_flight -= 1
        self._hand_off()

    def _hand_off(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)


def input_cap(gateway_cap: int, dep: "Deployment") -> tuple[int, str]:
    """The prompt cap (tokens) for a request `dep` serves, and what sets it, for the client's message:
    the gateway's serving.max_input_tokens, or the deployment's engine (max model length less max_tokens)."""
    engine_cap = dep.max_input_tokens
    if engine_cap is not None and engine_cap < gateway_cap:
        return engine_cap, (f"the '{dep.name}' deployment's engine takes (max_model_len={dep.engine.max_model_len} "
                            f"less max_tokens={dep.max_tokens or 0}: {engine_cap})")
    return gateway_cap, f"this gateway accepts (max_input_tokens={gateway_cap})"

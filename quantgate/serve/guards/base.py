"""What a gateway guard is: one step a request passes before any attempt, which may refuse it
(raise GatewayError), answer it (a cache hit), or take something for it (a slot, a reservation)
that it gives back whatever way the request ends.

A guard is a `take` and a `give_back`, both functions of the gateway's collaborators (`env`: the
`Env` below; a guard reads only the few it needs, so a test passes only those) and of the
request: its runtime, its call and its `RequestState`, where `take` records what it took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from ..records import GatewayError

if TYPE_CHECKING:
    from ..admission import ConcurrencyGate
    from ..budget import Estimator
    from ..ladder import Ladder
    from ..limits import TenantLimiter
    from ..metrics import GatewayMetrics
    from ..records import Answer, ChatCall, RequestState
    from ..runtime import Runtime
    from ..state import LocalState


class Env(Protocol):
    """The gateway's collaborators in force, as the guards see them (the Gateway is one)."""

    metrics: "GatewayMetrics"
    ladder: "Ladder"
    limiter: "TenantLimiter"
    state: "LocalState"
    cache: Any
    gate: "ConcurrencyGate"
    estimator: "Estimator"
    wall: Callable[[], float]
    clock: Callable[[], float]


def nothing(env: Env, call: "ChatCall", ctx: "RequestState") -> None:
    """A guard that takes nothing gives nothing back."""


@dataclass(frozen=True, slots=True)
class Guard:
    name: str
    take: Callable[[Env, "Runtime", "ChatCall", "RequestState"], Awaitable["Answer | None"]]
    give_back: Callable[[Env, "ChatCall", "RequestState"], None] = nothing


def refuse(metrics: "GatewayMetrics", reason: str, status: int, type_: str, message: str, retry_after_s: float,
           extra: dict | None = None) -> GatewayError:
    """A refusal before any upstream work, counted by reason (and as a 429 when it is one), with the
    whole seconds a client should wait in Retry-After."""
    metrics.rejected.labels(reason).inc()
    if status == 429:
        metrics.throttled.labels(reason).inc()
    return GatewayError(status, type_, message, None, {"Retry-After": str(max(1, math.ceil(retry_after_s)))}, extra)

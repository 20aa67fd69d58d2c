"""The guards a request passes before any attempt, in order: cheapest first, and nothing taken
(a slot, a reservation) before a cheaper check could refuse it.

`admit` runs them; the first that answers (a cache hit) ends the run; one that refuses raises
GatewayError. `give_back` returns what they took, last taken first, whatever way the request ends
(answer, refusal, error, cancellation): `Gateway`'s one opening of a request calls it. A new guard
is a module here with its `GUARD` and its place in `GUARDS` (docs/architecture.md, "Where to add
things").
"""

from __future__ import annotations

from . import budget_cache, concurrency, input_size, request_limits, tenant_slot
from .base import Env, Guard, nothing, refuse

__all__ = ["GUARDS", "Env", "Guard", "admit", "give_back", "refuse"]

GUARDS: tuple[Guard, ...] = (
    request_limits.GUARD,  # 400: budget_ms, max_tokens over the gateway's limits
    input_size.GUARD,      # 413: the prompt over the input cap; fixes the deployment looked up
    tenant_slot.GUARD,     # 429: the tenant's concurrency share
    budget_cache.GUARD,    # 429/503: the budget reservation; a cache hit answers here
    concurrency.GUARD,     # 429: the gateway's slots and queue
)


async def admit(env: Env, rt, call, ctx):
    """Run the guards in order; a cached Answer, or None when the request may go to its attempts."""
    for g in GUARDS:
        hit = await g.take(env, rt, call, ctx)
        if hit is not None:
            return hit
    return None


# on every request, so worked out once: last taken first, without the guards that take nothing
_GIVE_BACKS = tuple(g.give_back for g in reversed(GUARDS) if g.give_back is not nothing)


def give_back(env: Env, call, ctx) -> None:
    """Give back what the guards took (each knows from `ctx` whether it took anything)."""
    for give in _GIVE_BACKS:
        give(env, call, ctx)

"""Guard 3: the tenant's share of the concurrency (a 429 `rate_limited` when it holds all of it).

The slot is taken before the budget so that one tenant's burst is refused without touching the
budgets (or Redis); it is given back when the request ends, whatever way.
"""

from __future__ import annotations

from .base import Guard, refuse


async def take(env, rt, call, ctx) -> None:
    limited = env.limiter.take_slot(call.tenant, rt.serving.max_concurrency, env.clock())
    if limited is not None:
        raise refuse(env.metrics, limited.limit, 429, "rate_limited", limited.message, limited.retry_after_s,
                     {"limit": limited.limit})
    ctx.tenant_slot = True


def give_back(env, call, ctx) -> None:
    if ctx.tenant_slot:
        ctx.tenant_slot = False
        env.limiter.release(call.tenant)


GUARD = Guard("tenant_slot", take, give_back)

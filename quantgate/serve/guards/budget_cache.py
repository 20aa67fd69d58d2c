"""Guard 4: the budget reservation (429 `budget_exceeded` / `rate_limited`, 503 while a shared
state that must answer does not), with the cache looked up beside it; a hit answers the request.

The cache lookup starts before the budget is asked and is awaited after it; with both on one Redis
the admit script reads the entry itself once the request is admitted (one command, one round trip).
A cached answer still needs the budget: a tenant over its budget is refused a hit too. The
reservation is settled when the request ends with what it really used (nothing, for a hit or a
refusal after it); Attempts settles it earlier on success, and a reservation settles once.
"""

from __future__ import annotations

import time

from ..cache import cache_key, cache_scope
from ..limits import Limited
from ..records import Answer
from ..state import Held, Unavailable
from ..tenants import OverBudget
from .base import Guard, refuse

perf = time.perf_counter


async def take(env, rt, call, ctx) -> Answer | None:
    s, lookup, metrics = rt.serving, ctx.lookup, env.metrics
    now = env.wall()
    pending = peek = None
    if env.cache is not None:
        scope = None if lookup.shared_cache else cache_scope(s.cache.scope, call.tenant, call.user_id, call.key_id)
        ctx.key = cache_key(lookup.key, call.messages, ctx.max_tokens, call.temperature, call.top_p, call.stop,
                            call.seed, scope, call.ignore_eos)
        peek = env.cache.peek_key(ctx.key)  # a cache on the state's Redis: read by the admit script itself
        if peek is None:
            pending = env.cache.lookup(ctx.key)
    try:
        held = await env.state.admit(call.tenant, call.user_id, ctx.reserved_tokens,
                                     (lookup.price or s.price).cost(ctx.tokens_in, ctx.max_tokens), now, env.clock(),
                                     peek)
    except BaseException:
        if pending is not None:
            pending.close()
        raise
    if not isinstance(held, Held) and pending is not None:
        pending.close()
    if isinstance(held, OverBudget):
        raise refuse(metrics, "budget", 429, "budget_exceeded", held.message(now), held.reset_at - now,
                     {"account": held.account, "reset_at": held.reset_iso})
    if isinstance(held, Limited):
        raise refuse(metrics, held.limit, 429, "rate_limited", held.message, held.retry_after_s, {"limit": held.limit})
    if isinstance(held, Unavailable):
        raise refuse(metrics, "shared_state", 503, "service_unavailable", held.message, held.retry_after_s)
    ctx.reservation = held
    if pending is not None:
        hit = await pending
    elif peek is not None:  # read by the admit script; admitted locally instead (Redis down or slow), a
        hit = env.cache.decode(held.peeked) if held.read else None  # miss, not a second round trip
    else:
        return None
    series = metrics.for_deployment(lookup)
    if hit is None:
        series.cache_miss.inc()
        return None
    series.cache_hit.inc()
    a = Answer(hit["text"], lookup, True, env.ladder.level, ["cache"], [], hit["tokens_in"], hit["tokens_out"], 0.0,
               hit["finish_reason"], ctx.budget_ms, total_ms=(perf() - call.t0) * 1000)
    series.request(call.route, "cached", perf() - call.t0)
    return a


def give_back(env, call, ctx) -> None:
    if ctx.reservation is not None:
        ctx.reservation.settle(ctx.used_tokens, ctx.used_usd, env.wall())


GUARD = Guard("budget_cache", take, give_back)

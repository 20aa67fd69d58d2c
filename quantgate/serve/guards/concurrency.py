"""Guard 5: a slot under the gateway's concurrency limit, after a short wait in its queue if
there is room there (a 429 `overloaded` with a Retry-After from the typical latency otherwise).

Last on purpose: a request holds a slot only once every cheaper check passed, and the queue wait
is bounded by what its budget leaves for an attempt. Its admission time (`ctx.t_admit`) is when
it got the slot.
"""

from __future__ import annotations

import time

from ..admission import Admit, retry_after_s
from .base import Guard, refuse

perf = time.perf_counter


async def take(env, rt, call, ctx) -> None:
    s, gate = rt.serving, env.gate
    verdict = gate.try_acquire()
    if verdict is Admit.QUEUE:
        wait = min(s.queue.max_wait_ms / 1000, ctx.deadline - perf() - s.min_attempt_ms / 1000)
        verdict = Admit.NOW if await gate.wait(wait) else Admit.REJECT
    if verdict is Admit.REJECT:
        est = env.estimator.get(rt.active.key)
        typical = est.predict_ms(ctx.max_tokens) if est else 1000.0
        raise refuse(env.metrics, "concurrency", 429, "overloaded",
                     f"too many requests in flight ({gate.in_flight}/{gate.limit}); retry after the time in "
                     "Retry-After", retry_after_s(gate.in_flight, gate.queued, gate.limit, typical))
    ctx.slot = True
    ctx.t_admit = perf()


def give_back(env, call, ctx) -> None:
    if ctx.slot:
        ctx.slot = False
        env.gate.release()


GUARD = Guard("concurrency", take, give_back)

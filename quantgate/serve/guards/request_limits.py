"""Guard 1: budget_ms and max_tokens within what this gateway allows (a 400 naming the field).

The request's budget and token limit are its own or the serving defaults; its deadline counts from
its arrival (`call.t0`).
"""

from __future__ import annotations

from ..records import GatewayError
from .base import Guard


async def take(env, rt, call, ctx) -> None:
    s = rt.serving
    budget_ms = call.budget_ms or s.default_budget_ms
    if budget_ms > s.max_budget_ms:
        raise GatewayError(400, "invalid_request_error",
                           f"budget_ms: {budget_ms} is more than this gateway allows ({s.max_budget_ms})",
                           "budget_ms")
    max_tokens = call.max_tokens or s.default_max_tokens
    if max_tokens > s.max_tokens_limit:
        raise GatewayError(400, "invalid_request_error",
                           f"max_tokens: {max_tokens} is more than this gateway allows ({s.max_tokens_limit})",
                           "max_tokens")
    ctx.budget_ms, ctx.deadline, ctx.max_tokens = budget_ms, call.t0 + budget_ms / 1000, max_tokens


GUARD = Guard("request_limits", take)

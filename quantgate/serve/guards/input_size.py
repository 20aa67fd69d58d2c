"""Guard 2: the prompt within the input cap (a 413 before any slot or budget is taken).

It also fixes which deployment the request is looked up and priced for (`ctx.lookup`: the
fallback while the breaker is open, else the active one) and what it reserves (its prompt's
tokens plus max_tokens). The cap is the gateway's or the deployment engine's, whichever is smaller
(admission.input_cap); the cheap estimate comes first and bounds the exact count's work: a prompt
already over the gateway's cap is refused without running a tokenizer on it.
"""

from __future__ import annotations

from ..admission import input_cap
from ..ladder import Level
from ..providers.base import estimate_tokens
from ..records import GatewayError
from .base import Guard


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    """The prompt's size in estimated tokens (about four characters a token), without joining it."""
    return estimate_tokens("") + sum(len(m["content"]) for m in messages) // 4


async def take(env, rt, call, ctx) -> None:
    s = rt.serving
    lookup = rt.fallback if (env.ladder.level == Level.BREAKER and rt.fallback) else rt.active
    tokens_in = prompt_tokens(call.messages)
    cap, what = input_cap(s.max_input_tokens, lookup)
    counted = None
    if tokens_in <= s.max_input_tokens and lookup.max_input_tokens is not None:
        counted = rt.providers["fallback" if lookup is rt.fallback else "active"].count_tokens(call.messages)
    if (counted if counted is not None else tokens_in) > cap:
        size = f"{counted} tokens (its tokenizer)" if counted is not None else f"about {tokens_in} tokens"
        raise GatewayError(413, "invalid_request_error",
                           f"messages: {size}, more than {what}; shorten the prompt", "messages")
    ctx.lookup, ctx.tokens_in = lookup, counted if counted is not None else tokens_in
    ctx.reserved_tokens = ctx.tokens_in + ctx.max_tokens


GUARD = Guard("input_size", take)

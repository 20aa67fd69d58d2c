"""Guard 2: the prompt within the input caps (a 413 with the numbers, before any slot or budget).

Three caps, cheapest first: the number of messages (serving.max_messages), each message's size
(serving.max_message_chars), and the prompt's tokens (serving.max_input_tokens, or the deployment
engine's context less max_tokens, whichever is smaller: admission.input_cap). The tokens are the
deployment's own whenever its provider holds its tokenizer and chat template (in process, or a
checkpoint on this machine: providers/tokens.py); otherwise a conservative estimate that counts the
template's overhead per message and, for text that is not ASCII, about a token per character (CJK,
emoji), so neither a flood of empty messages nor a flood of wide characters passes as small. The
estimate also bounds the tokenizer's work: a prompt whose estimate is over the gateway's cap is
refused without running a tokenizer on it.

It also fixes which deployment the request is looked up and priced for (`ctx.lookup`: the
fallback while the breaker is open, else the active one) and what it reserves (its prompt's
tokens plus max_tokens).
"""

from __future__ import annotations

import itertools
import logging
import re

from ..admission import input_cap
from ..ladder import Level
from ..records import GatewayError
from .base import Guard

log = logging.getLogger("quantgate.serve")

# What a chat template adds per message (role, start and end markers): 3 to 6 tokens in the common
# templates (ChatML, Llama 3, Gemma); 31,000 empty messages template to about 155,000 tokens.
PER_MESSAGE = 4


def text_tokens(text: str) -> int:
    """A text's size in estimated tokens: about four ASCII characters a token; a text that is not
    ASCII counts its UTF-8 bytes by three (about a token per CJK character, more for emoji)."""
    if text.isascii():  # O(1) in CPython: the string's own flag
        return len(text) // 4
    return len(text.encode()) // 3


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    """The prompt's size in estimated tokens, template overhead included (no tokenizer)."""
    return 1 + sum(PER_MESSAGE + text_tokens(m["content"]) for m in messages)


def shape_problem(messages: list[dict[str, str]], max_messages: int, max_chars: int) -> GatewayError | None:
    """The 413 for too many messages or one too large; None when the shape is within the caps."""
    if len(messages) > max_messages:
        return _too_large(f"messages: {len(messages)} messages, more than this gateway accepts "
                          f"(max_messages={max_messages})", "messages", len(messages), max_messages, "messages")
    for i, m in enumerate(messages):
        if len(m["content"]) > max_chars:
            return _too_large(f"messages.{i}.content: {len(m['content'])} characters, more than this gateway "
                              f"accepts in one message (max_message_chars={max_chars})", f"messages.{i}.content",
                              len(m["content"]), max_chars, "characters")
    return None


_ROLE_KEY = re.compile(rb'"role"\s*:')


def body_shape_problem(raw: bytes, max_messages: int) -> GatewayError | None:
    """The 413 for too many messages, read off the raw body before it is parsed: validating 31,000
    empty messages (1 MB) holds the event loop ~47 ms, every other request waiting; finding the
    message past the cap here takes microseconds (the scan stops there). Each message carries exactly
    one "role" key, and an unescaped quote cannot occur inside a JSON string, so the matches of
    `"role":` are the messages; a key written with escapes is not matched here and meets
    shape_problem after parsing."""
    past_cap = next(itertools.islice(_ROLE_KEY.finditer(raw), max_messages, None), None)
    if past_cap is None:
        return None
    return GatewayError(413, "invalid_request_error", f"messages: more than the {max_messages} messages this gateway "
                        f"accepts in one request (max_messages={max_messages})", "messages",
                        extra={"limit": max_messages, "unit": "messages"})


def _too_large(message: str, param: str, size: int, limit: int, unit: str) -> GatewayError:
    return GatewayError(413, "invalid_request_error", message, param, extra={"size": size, "limit": limit,
                                                                              "unit": unit})


def count(provider, messages: list[dict[str, str]]) -> int | None:
    """The provider's exact count, or None (no tokenizer, or one that cannot render these messages:
    the engine will refuse them itself, and the estimate still caps them)."""
    try:
        return provider.count_tokens(messages)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception on odd roles, say
        log.info("prompt not counted by the tokenizer (%s: %s); the estimate sizes it", type(exc).__name__, exc)
        return None


async def take(env, rt, call, ctx) -> None:
    s = rt.serving
    problem = shape_problem(call.messages, s.max_messages, s.max_message_chars)
    if problem is not None:
        raise problem
    lookup = rt.fallback if (env.ladder.level == Level.BREAKER and rt.fallback) else rt.active
    estimate = prompt_tokens(call.messages)
    cap, what = input_cap(s.max_input_tokens, lookup)
    counted = None
    if estimate <= s.max_input_tokens:
        counted = count(rt.providers["fallback" if lookup is rt.fallback else "active"], call.messages)
    tokens = counted if counted is not None else estimate
    if tokens > cap:
        size = f"{counted} tokens (its tokenizer)" if counted is not None else f"about {estimate} tokens"
        raise _too_large(f"messages: {size}, more than {what}; shorten the prompt", "messages", tokens, cap,
                         "tokens" if counted is not None else "estimated tokens")
    ctx.lookup, ctx.tokens_in = lookup, tokens
    ctx.reserved_tokens = tokens + ctx.max_tokens


GUARD = Guard("input_size", take)

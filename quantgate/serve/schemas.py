"""Request bodies the gateway accepts, and how a bad one is explained.

Both APIs forbid unknown fields, so a misspelt `budget_ms` is a 400 naming it rather than a
request silently served with the default budget. The OpenAI-compatible model declares the fields
current SDKs send; sampling knobs that no provider here honours are accepted and ignored, the way
most OpenAI-compatible servers do, while features that would change the answer's shape (tools,
n > 1) are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"
# Whole numbers only: a JSON `true` is not 1 ms or 1 token (lax mode would take it as 1).
Int = StrictInt


class Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatRequest(Req):
    """POST /chat, as in the chapter: {"user_id", "prompt", "budget_ms"} (+ max_tokens, tenant)."""

    user_id: str = Field(..., min_length=1, max_length=256)
    prompt: str = Field(..., min_length=1)
    budget_ms: Int | None = Field(None, gt=0)
    max_tokens: Int | None = Field(None, ge=1)
    tenant: str | None = Field(None, pattern=_ID, max_length=128)
    temperature: float | None = Field(None, ge=0, le=2)


class TextPart(Req):
    type: Literal["text"]
    text: str


class Message(Req):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Req):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatCompletionRequest(Req):
    """POST /v1/chat/completions; `budget_ms` and `tenant` are gateway extensions (or headers)."""

    model: str = Field(..., min_length=1)
    messages: list[Message] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Int | None = Field(None, ge=1, le=1, description="only one choice per request")
    stop: str | list[str] | None = None
    seed: Int | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extension, sent by `quantgate loadtest` (so it can drive a gateway): passed on to an
    # OpenAI-compatible upstream, so a load test through the gateway gets the output length it asked for
    ignore_eos: bool | None = None
    # accepted for compatibility, not passed on (no provider here honours them)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    # gateway extensions
    budget_ms: Int | None = Field(None, gt=0)
    tenant: str | None = Field(None, pattern=_ID, max_length=128)

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


def describe(exc: ValidationError) -> tuple[str, str]:
    """(field, message) for the first problem: what a client needs to fix its request."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return "body", f"body: malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}"
    if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
        return "body", "body: must be a JSON object"
    loc = [p for p in err["loc"] if p not in ("str", "list[TextPart]", "list[str]")]
    field = ".".join(str(p) for p in loc) or "body"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        tools = loc and loc[-1] in ("tools", "tool_choice", "functions", "parallel_tool_calls")
        msg = "unknown field" + (" (this gateway does not support tool calls)" if tools else "")
    elif err["type"] == "missing":
        msg = "required field is missing"
    return field, f"{field}: {msg}"

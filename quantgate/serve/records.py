"""The records that cross between the HTTP layer and the guard pipeline.

A `ChatCall` is what a client asked (either API), an `Answer` is what the gateway answered and
how (deployment, degrade path, tokens, cost, latency split), a `GatewayError` is an answer that
is not a completion (status, type, message naming the field). `RequestState` is the pipeline's
working record for one admitted request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _enc  # the C string escaper json.dumps uses

from .budget import Plan
from .ladder import NOTICES, Level
from .manifest import Deployment
from .tenants import Reservation


class GatewayError(Exception):
    """An answer that is not a completion: status, error type, message naming the field."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param
        self.headers, self.extra = headers or {}, extra or {}


@dataclass(slots=True)
class ChatCall:
    route: str                          # 'chat' or 'openai' (metrics label)
    trace_id: str
    tenant: str
    user_id: str | None
    messages: list[dict[str, str]]
    t0: float                           # perf_counter() at arrival: the budget counts from here
    budget_ms: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    key_id: str | None = None           # which API key (a digest's prefix; None: anonymous), for the cache scope
    arm: str = "stable"                 # the canary arm the request was routed to (gateway.Opened), for the trace


@dataclass(slots=True)
class Answer:
    text: str
    deployment: Deployment
    cached: bool
    level: Level
    path: list[str]
    reasons: list[str]
    tokens_in: int
    tokens_out: int
    cost_usd: float
    finish_reason: str
    budget_ms: int
    queue_ms: float = 0.0
    upstream_ms: float = 0.0
    generation_ms: float = 0.0
    total_ms: float = 0.0

    def info_json(self, trace_id: str) -> str:
        """The gateway's account of the answer as JSON (the /chat body; `quantgate` in OpenAI bodies).

        Written by hand rather than with json.dumps: it is on every response, and the template
        costs about a quarter of building and encoding the dict (strings still go through the
        json module's own escaping).
        """
        d, notice = self.deployment, NOTICES[self.level]
        return (
            f'{{"trace_id":{_enc(trace_id)},"cached":{"true" if self.cached else "false"},'
            f'"deployment":{_enc(d.name)},"model_version":{_enc(d.model_version)},'
            f'"degrade":{{"level":"{self.level.label}","path":[{",".join(map(_enc, self.path))}],'
            f'"reasons":[{",".join(map(_enc, self.reasons))}],"notice":{_enc(notice) if notice else "null"}}},'
            f'"tokens":{{"in":{self.tokens_in},"out":{self.tokens_out}}},"cost_usd":{self.cost_usd:.10g},'
            f'"budget_ms":{self.budget_ms},"latency_ms":{{"queue":{self.queue_ms:.3f},'
            f'"upstream":{self.upstream_ms:.3f},"generation":{self.generation_ms:.3f},"total":{self.total_ms:.3f}}}}}'
        )

    def info(self, trace_id: str) -> dict:
        return json.loads(self.info_json(trace_id))


@dataclass(slots=True)
class RequestState:
    """What the guards established for one admitted request, filled in as it goes."""

    budget_ms: int
    deadline: float
    max_tokens: int
    key: str | None
    lookup: Deployment | None
    t_admit: float = 0.0
    plan: Plan | None = None
    route: str = "active"
    path: list[str] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)   # targets an attempt was started on
    fault: bool = False     # an attempt on the active deployment failed through the upstream's fault
    unready: bool = False   # no deployment of the plan was ready (engines starting or restarting)
    # what the guards took (serve/guards), given back by guards.give_back whatever way the request ends
    slot: bool = False
    tenant_slot: bool = False
    reservation: Reservation | None = None
    tokens_in: int = 0      # the prompt's tokens as the input cap counted them
    reserved_tokens: int = 0
    used_tokens: int = 0    # what every attempt cost so far (serve/charges.py), what the reservation settles to
    used_usd: float = 0.0

    def charge(self, price, tokens_in: int, tokens_out: int) -> float:
        """Add what one attempt cost (serve/charges.py) to what the request settles to; its USD."""
        usd = price.cost(tokens_in, tokens_out)
        self.used_tokens += tokens_in + tokens_out
        self.used_usd += usd
        return usd

    @classmethod
    def empty(cls) -> "RequestState":
        return cls(0, 0.0, 0, None, None)

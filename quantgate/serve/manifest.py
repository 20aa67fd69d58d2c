"""The serving manifest: what the gateway serves, with which guards, and how it got there.

One schema-versioned JSON (or YAML) document: the `active` deployment, the `serving` settings
(budgets, concurrency, cache, tenant budgets, degrade ladder, prices, the `fallback` deployment),
the `evidence` that earned the promotion, the `previous` deployments, an append-only `history`, and
a `canary` (a challenger served beside the active deployment and stepped up by live gates).
Promote and rollback (the tracking issue) are edits of this document; the gateway re-reads it
when the file changes, so they take effect without a restart.

Every model forbids unknown keys: a typo in a manifest is an error naming the field, never a
silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..documents import Spec, omitted_while_unset, read_mapping, validate
from ..engine_spec import EngineSpec
from ..errors import QuantgateError
from ..grading import Case
from ..util import atomic_write_text

SCHEMA_VERSION = 2  # 2: deployments name their engine (`Deployment.engine`); 1 migrates


class ManifestError(QuantgateError):
    """A manifest that cannot be read or does not validate; the message names the file and field."""


# ------------------------------------------------------------------------------ providers
class MockProviderSpec(Spec):
    """The chapter's mock mode: deterministic text, configurable delay, pace and error rate."""

    kind: Literal["mock"] = "mock"
    delay_ms: float = Field(20.0, ge=0, description="time before the first token")
    jitter_ms: float = Field(0.0, ge=0, description="uniform extra delay in [0, jitter_ms), seeded")
    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of requests that fail, seeded")
    seed: int = 0
    tokens_per_s: float = Field(0.0, ge=0, description="generation pace; 0 = all tokens at once")
    reply_tokens: int = Field(32, ge=1, description="reply length before max_tokens caps it")


class OpenAIProviderSpec(Spec):
    """Any OpenAI-compatible upstream: vLLM, SGLang, TensorRT-LLM, TGI, llama.cpp's server."""

    kind: Literal["openai"]
    base_url: str = Field(..., description="e.g. http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str | None = Field(None, description="name of the env var holding the upstream key")
    timeout_s: float = Field(60.0, gt=0)
    max_connections: int = Field(512, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        return v.rstrip("/")


class LocalProviderSpec(Spec):
    """In-process transformers on the deployment's checkpoint (CPU or CUDA)."""

    kind: Literal["local"]
    model: str | None = Field(None, description="checkpoint folder; default: the deployment's artifact")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_new_tokens: int = Field(128, ge=1)


class CommandProviderSpec(Spec):
    """A CLI called as a subprocess (the chapter's gemini CLI): stdout is the answer."""

    kind: Literal["command"]
    argv: list[str] = Field(..., min_length=1, description="argv template; '{prompt}' is replaced")
    timeout_s: float = Field(60.0, gt=0)
    stdin: bool = Field(False, description="send the prompt on stdin instead of through '{prompt}'")

    @model_validator(mode="after")
    def _prompt_goes_somewhere(self) -> "CommandProviderSpec":
        if not self.stdin and not any("{prompt}" in a for a in self.argv):
            raise ValueError("argv must contain '{prompt}' somewhere, or set stdin: true")
        return self


ProviderSpec = Annotated[Union[MockProviderSpec, OpenAIProviderSpec, LocalProviderSpec, CommandProviderSpec],
                         Field(discriminator="kind")]


# -------------------------------------------------------------------------------- engines
# A deployment's engine is the one description engine_spec.EngineSpec (the card stores it, promote
# copies it here, the supervisor starts it). Schema 2's argv-based engines validate as they are:
# their `argv` is used verbatim, and `openai-url` is read as `openai`.


class PriceSpec(Spec):
    """USD per million tokens, for cost accounting (budgets, the cost-rate signal, metrics)."""

    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_1m + tokens_out * self.output_per_1m) / 1e6


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$"


class ArithmeticSpec(Spec):
    """The arithmetic a deployment's gates were measured on (its evaluation record): the dtype it was
    scored in, the quantized-matmul kernels that ran (class → count; a dense model: none) and where.
    The in-process provider loads in this dtype with the same kernel rule (quantgate.kernels) and
    says what it got in /readyz; promote refuses an engine whose dtype differs, unless forced."""

    dtype: str = Field(..., max_length=32)
    kernels: dict[str, int] = Field(default_factory=dict)
    device: Literal["cpu", "cuda"] = "cpu"


class Deployment(Spec):
    """One servable thing: a model artifact behind a provider, with how it was made."""

    name: str = Field(..., pattern=_NAME, max_length=128)
    model_version: str = Field("1", min_length=1, max_length=64)
    artifact: str | None = Field(None, description="checkpoint path or URI")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    files: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = Field(
        None, description="sha256 of every file an engine reads in the artifact folder (quantgate.integrity)")
    files_rule: Literal["v1", "every-file"] | None = Field(
        None, description="which files `files` covers (quantgate.integrity.RULES); unset: v1, which skipped "
        "hidden files, README*, *.md and *.lock")
    method: str = "baseline"
    params: dict[str, Any] = Field(default_factory=dict)
    provider: ProviderSpec = Field(default_factory=MockProviderSpec)
    engine: EngineSpec | None = Field(None, description="the engine that serves this deployment and how; "
                                      "none for mock and command providers")
    price: PriceSpec | None = Field(None, description="overrides serving.price for this deployment")
    max_tokens: int | None = Field(None, ge=1, description="cap on output tokens for this deployment")
    shared_cache: bool = Field(False, description="cached answers may be served to every tenant (public, "
                               "non-personal prompts only); by default each tenant has its own cache")
    evaluated: ArithmeticSpec | None = Field(None, description="the arithmetic the gates were measured on "
                                             "(promote writes it from the evaluation record)")

    _stable_dump = omitted_while_unset("evaluated")  # a deployment without one dumps as before

    @model_validator(mode="after")
    def _local_needs_artifact(self) -> "Deployment":
        # Only the local provider loads the artifact itself, so only there is it required;
        # remote engines, CLIs and the mock serve whatever they serve.
        if self.provider.kind == "local" and not (self.artifact or self.provider.model):
            raise ValueError("a 'local' deployment needs 'artifact' (or provider.model): the checkpoint folder")
        if self.engine is not None:
            e = self.engine
            want = e.info.provider
            if self.provider.kind != want:
                raise ValueError(f"engine '{e.kind}' is served through a '{want}' provider, "
                                 f"not '{self.provider.kind}'")
            if e.launched and not self.artifact:
                raise ValueError(f"a '{e.kind}' deployment needs 'artifact': the checkpoint it serves")
            if e.launched and not (e.python or e.argv):
                raise ValueError(f"a '{e.kind}' engine is started by the gateway: give engine.python (its "
                                 "interpreter; `quantgate promote` writes it from the engine card or --engine)")
        return self

    @property
    def max_input_tokens(self) -> int | None:
        """The longest prompt this deployment's engine takes: its context minus the output it may write."""
        if self.engine is None or self.engine.max_model_len is None:
            return None
        return max(1, self.engine.max_model_len - (self.max_tokens or 0))

    @property  # not cached: model_copy(update=...) would carry a stale cached value along
    def key(self) -> str:
        """Identity used for cache keys and metric labels: changes when the model changes."""
        return f"{self.name}@{self.model_version}" + (f"#{self.sha256[:12]}" if self.sha256 else "")


# -------------------------------------------------------------------------------- serving
class QueueSpec(Spec):
    size: int = Field(0, ge=0, description="requests allowed to wait for a slot; 0 = reject at once")
    max_wait_ms: float = Field(100.0, ge=0)


class TraceSpec(Spec):
    """A privacy-safe record of what was served (serve/trace.py), to replay as a load-test workload."""

    path: str = Field(..., min_length=1, description="the trace file (JSON lines); rotated ones get .1 … .keep")
    max_bytes: int = Field(64 << 20, ge=4096, description="rotate the file when it would grow past this")
    keep: int = Field(3, ge=0, description="rotated files kept beside the current one")
    include_text: bool = Field(False, description="also write prompt and answer text (off: counts only)")


class CacheSpec(Spec):
    enabled: bool = True
    scope: Literal["key", "user", "tenant"] = Field(
        "key", description="who shares cached answers: the callers of one API key (default), one user of a "
        "tenant, or the whole tenant (a deployment's shared_cache: every tenant)")
    ttl_s: float = Field(300.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    backend: Literal["memory", "redis"] | None = Field(
        None, description="default: redis when serving.state names one (shared by the replicas), else memory")
    url: str | None = Field(None, description="redis://host:port/db when backend is redis (default: serving.state.redis)")


class StateSpec(Spec):
    """Where replicas share budgets, rate buckets, the cache and breaker signals (none: in memory)."""

    redis: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", description="redis://host:port/db")
    on_redis_down: Literal["open", "closed"] = Field(
        "open", description="open: keep serving with this replica's own (local) budgets and rate limits; "
        "closed: refuse requests that draw on a budget until Redis answers again")
    prefix: str = Field("quantgate:", min_length=1, max_length=64)
    timeout_ms: int = Field(250, ge=1, le=10_000, description="one Redis call; longer counts as Redis down")
    retry_s: float = Field(1.0, gt=0, le=300, description="while down, how often a request tries Redis again")


class BudgetSpec(Spec):
    """A spending limit per period: tokens and/or USD; a period starts at a multiple of period_s."""

    tokens: int | None = Field(None, ge=0)
    usd: float | None = Field(None, ge=0)
    period_s: int = Field(86_400, ge=1)

    @model_validator(mode="after")
    def _something(self) -> "BudgetSpec":
        if self.tokens is None and self.usd is None:
            raise ValueError("give 'tokens', 'usd' or both")
        return self


class BudgetsSpec(Spec):
    tenants: dict[str, BudgetSpec] = Field(default_factory=dict, description="'*' applies to every other tenant")
    per_user: BudgetSpec | None = Field(None, description="applies to each user_id separately")
    global_: BudgetSpec | None = Field(None, alias="global")


class ApiKeyRef(Spec):
    """A key, never stored raw: its sha256, or the env var that holds it; optionally bound to one user."""

    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = None
    user: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$", max_length=256,
                             description="the user every request with this key is accounted to")

    @model_validator(mode="after")
    def _one(self) -> "ApiKeyRef":
        if (self.sha256 is None) == (self.env is None):
            raise ValueError("give exactly one of 'sha256' (hex digest of the key) or 'env' (variable name)")
        return self


class RateSpec(Spec):
    """One tenant's share of the gateway: concurrent slots, a request rate and a token rate."""

    concurrency_share: float | None = Field(None, gt=0, le=1, description="fraction of max_concurrency one tenant "
                                            "may hold; 1 = no cap. Unset: 0.5 where serving.api_keys names two or "
                                            "more tenants (no tenant takes every slot), else 1 (quantgate.serve.limits)")
    requests_per_s: float | None = Field(None, gt=0, description="sustained request rate (token bucket)")
    burst: int | None = Field(None, ge=1, description="requests allowed at once above the rate; default 2× the rate")
    tokens_per_min: int | None = Field(None, gt=0, description="prompt + output tokens per minute (token bucket)")


class HttpSpec(Spec):
    """The socket-level guards; read when the server starts (a reload does not change them)."""

    header_timeout_s: float = Field(15.0, gt=0, le=300, description="request line + headers must arrive within this; "
                                    "also the idle keep-alive timeout")
    body_timeout_s: float = Field(15.0, gt=0, le=300, description="the body must arrive within this")
    max_connections: int = Field(1024, ge=1, description="open connections; past it the oldest that has not "
                                 "passed the key check is closed for a newcomer (serve/connections.py)")
    max_connections_per_client: int = Field(128, ge=1, description="connections one client address may hold "
                                            "before any request on them passed the key check")
    reserved_for_keyed: float = Field(0.25, ge=0, lt=1, description="share of max_connections only connections "
                                      "that passed the key check may use")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted besides the bind "
                                     "address and localhost (the public name when exposed)")
    allowed_origins: list[str] = Field(default_factory=list, description="browser Origins allowed to call the API")


class LevelSpec(Spec):
    """One rung of the degrade ladder: when it triggers (any signal over) and what it does."""

    p95_ms: float | None = Field(None, gt=0)
    error_rate: float | None = Field(None, gt=0, le=1, description="errors + timeouts over requests")
    cost_usd_per_min: float | None = Field(None, gt=0)
    max_tokens_factor: float = Field(1.0, gt=0, le=1)
    context_chars: int | None = Field(None, ge=1, description="keep only the last N prompt characters")
    concurrency_factor: float = Field(1.0, gt=0, le=1, description="shrinks max_concurrency (rate limiting)")


class LadderSpec(Spec):
    """The degrade ladder (light → moderate → heavy → breaker) over a sliding window."""

    enabled: bool = True
    window_s: float = Field(30.0, gt=0)
    min_samples: int = Field(20, ge=1)
    eval_interval_s: float = Field(0.5, gt=0)
    light: LevelSpec = LevelSpec(p95_ms=2000, max_tokens_factor=0.75, context_chars=8000)
    moderate: LevelSpec = LevelSpec(p95_ms=4000, error_rate=0.05, max_tokens_factor=0.5, context_chars=4000)
    heavy: LevelSpec = LevelSpec(p95_ms=8000, error_rate=0.15, max_tokens_factor=0.25, context_chars=2000,
                                 concurrency_factor=0.5)
    breaker: LevelSpec = LevelSpec(error_rate=0.5)
    hysteresis: float = Field(0.8, gt=0, lt=1, description="step down only when every signal < threshold × this")
    hold_s: float = Field(10.0, ge=0, description="minimum time at a level before stepping down")
    breaker_cooldown_s: float = Field(30.0, gt=0)
    probe_successes: int = Field(3, ge=1, description="successful probes that close the breaker")
    reference_tokens: int = Field(256, ge=1, description="the answer length latency is judged at: a longer "
                                  "answer counts as its time to first token plus this many tokens at its own "
                                  "pace, so a client asking for long answers does not read as a slow engine")

    @model_validator(mode="after")
    def _ordered(self) -> "LadderSpec":
        levels = [("light", self.light), ("moderate", self.moderate), ("heavy", self.heavy), ("breaker", self.breaker)]
        for sig in ("p95_ms", "error_rate", "cost_usd_per_min"):
            prev = None
            for name, lv in levels:
                v = getattr(lv, sig)
                if v is None:
                    continue
                if prev is not None and v < prev[1]:
                    raise ValueError(f"{name}.{sig}={v} is below {prev[0]}.{sig}={prev[1]}: "
                                     "thresholds must not decrease up the ladder")
                prev = (name, v)
        return self


class ServingSpec(Spec):
    default_budget_ms: int = Field(1200, ge=1)
    max_budget_ms: int = Field(60_000, ge=1)
    min_attempt_ms: int = Field(20, ge=1, description="no attempt starts with less budget left than this")
    fallback_reserve_ms: int = Field(200, ge=0, description="budget kept for the fallback until it is measured")
    max_concurrency: int = Field(64, ge=1)
    queue: QueueSpec = QueueSpec()
    max_body_bytes: int = Field(1 << 20, ge=1024)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    cache: CacheSpec = CacheSpec()
    state: StateSpec = StateSpec()
    budgets: BudgetsSpec = BudgetsSpec()
    max_input_tokens: int = Field(8192, ge=1, description="prompt size cap in tokens, checked before admission: "
                                  "counted with the deployment's tokenizer and chat template when the gateway has "
                                  "them, else a conservative estimate")
    max_messages: int = Field(512, ge=1, description="messages one request may carry (413 beyond)")
    max_message_chars: int = Field(65_536, ge=1, description="characters one message may carry (413 beyond)")
    api_keys: dict[str, list[ApiKeyRef]] = Field(default_factory=dict, description="tenant → keys")
    admin_keys: list[ApiKeyRef] = Field(default_factory=list, description="keys for /metrics and /readyz details")
    anonymous: bool = Field(False, description="serve requests without a key (only on a loopback bind)")
    tenant_limits: dict[str, RateSpec] = Field(default_factory=dict, description="'*' applies to every other tenant")
    http: HttpSpec = HttpSpec()
    ladder: LadderSpec = LadderSpec()
    price: PriceSpec = PriceSpec()
    trace: TraceSpec | None = Field(None, description="record a replayable trace of the traffic (off by default)")
    fallback: Deployment | None = None
    reload_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _budgets(self) -> "ServingSpec":
        if self.default_budget_ms > self.max_budget_ms:
            raise ValueError(f"default_budget_ms={self.default_budget_ms} exceeds max_budget_ms={self.max_budget_ms}")
        if self.cache.backend == "redis" and not (self.cache.url or self.state.redis):
            raise ValueError("cache: backend 'redis' needs 'url' (or serving.state.redis), "
                             "e.g. redis://127.0.0.1:6379/0")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_limit="
                             f"{self.max_tokens_limit}")
        return self


class HistoryEvent(Spec):
    what: str = Field(..., min_length=1, description="promote, rollback, edit, ...")
    when: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    why: str = ""
    by: str = ""
    deployment: str | None = None
    figures: dict[str, Any] | None = Field(None, description="the live figures a canary decision rested on")


# --------------------------------------------------------------------------------- canary
class CanaryGatesSpec(Spec):
    """Live gates of the challenger *relative to the stable deployment*, over one step's windows.
    A rate gate fails when canary − stable exceeds it; a latency gate when canary P95 exceeds
    stable P95 × ratio + slack_ms (the slack keeps a fast mock's 1 ms vs 2 ms from reading as 2×)."""

    error_rate: float = Field(0.02, ge=0, le=1, description="canary error rate may exceed stable's by this much")
    p95_ttft_ratio: float = Field(1.5, ge=1, description="canary P95 TTFT ≤ stable's × this + latency_slack_ms")
    p95_e2e_ratio: float = Field(1.5, ge=1, description="canary P95 E2E ≤ stable's × this + latency_slack_ms")
    latency_slack_ms: float = Field(25.0, ge=0)
    budget_exhausted_rate: float = Field(0.02, ge=0, le=1, description="canary timeouts may exceed stable's by this")
    probe_pass_rate: float = Field(0.0, ge=0, le=1, description="canary probe pass rate may be below stable's by this")


class ProbesSpec(Spec):
    """The recipe's regression set, sent through both deployments and graded (quantgate.grading), charged
    to no tenant. One round = every case once to each deployment."""

    cases: list[Case] = Field(default_factory=list)
    every_s: float = Field(5.0, gt=0, description="seconds between probe rounds")
    max_tokens: int = Field(64, ge=1)


class CanaryEvent(Spec):
    what: Literal["start", "step", "promote", "rollback"]
    when: datetime
    step: int = Field(..., ge=0)
    weight: float = Field(..., ge=0, le=100)
    why: str = ""
    by: str = ""
    figures: dict[str, Any] | None = None


class CanarySpec(Spec):
    """A challenger served beside the active (stable) deployment, stepped up by live gates (serve/canary.py).

    The stable deployment stays `active`, so it is the rollback target throughout; the challenger
    becomes active only when the last step passes. `state` running: the gateway splits traffic by
    `steps[step]` percent; promoted / rolled_back: the block stays as the record of how it ended."""

    challenger: Deployment
    steps: list[float] = Field(..., min_length=1, description="canary weight per step, percent, e.g. [5, 25, 50, 100]")
    step: int = Field(0, ge=0)
    step_started: datetime = Field(..., description="when the current step began (min_seconds counts from here)")
    state: Literal["running", "promoted", "rolled_back"] = "running"
    min_requests: int = Field(100, ge=1, description="canary requests a step needs before it may step up")
    min_seconds: float = Field(60.0, ge=0, description="time a step lasts at least before it may step up")
    min_fail_requests: int = Field(20, ge=1, description="canary requests before a rate gate may roll back early "
                                   "(when the excess is significant, z ≥ 3)")
    ready_timeout_s: float = Field(600.0, gt=0, description="a challenger engine not ready by then is rolled back")
    eval_interval_s: float = Field(1.0, gt=0, description="how often the gateway decides")
    gates: CanaryGatesSpec = CanaryGatesSpec()
    probes: ProbesSpec = ProbesSpec()
    history: list[CanaryEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _schedule(self) -> "CanarySpec":
        s = self.steps
        if any(not 0 < w <= 100 for w in s):
            raise ValueError(f"steps {s}: each weight must be in (0, 100] percent")
        if any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"steps {s}: weights must increase step by step")
        if s[-1] != 100:
            raise ValueError(f"steps {s}: the last step must be 100 (the challenger takes all traffic before it "
                             "is promoted)")
        if self.step >= len(s):
            raise ValueError(f"step {self.step}: the schedule has only {len(s)} steps (0 … {len(s) - 1})")
        return self

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def weight(self) -> float:
        """Percent of traffic the challenger takes now (0 unless running)."""
        return self.steps[self.step] if self.running else 0.0


class Manifest(Spec):
    schema_version: Literal[2] = SCHEMA_VERSION
    active: Deployment
    serving: ServingSpec = ServingSpec()
    evidence: dict[str, Any] = Field(default_factory=dict)
    previous: list[Deployment] = Field(default_factory=list)
    history: list[HistoryEvent] = Field(default_factory=list)
    canary: CanarySpec | None = Field(None, description="a challenger stepped up by live gates (serve/canary.py)")

    @model_validator(mode="after")
    def _distinct_fallback(self) -> "Manifest":
        fb = self.serving.fallback
        if fb is not None and fb.key == self.active.key:
            raise ValueError(f"serving.fallback is the active deployment itself ({fb.key}): "
                             "name a different model or version, or remove the fallback")
        c = self.canary
        if c is not None and c.running and c.challenger.key == self.active.key:
            raise ValueError(f"canary.challenger is the active deployment itself ({self.active.key}): "
                             "a canary needs a different model or version")
        return self


# ----------------------------------------------------------------------------------- I/O
def parse_manifest(data: bytes | str, source: str | Path = "<manifest>") -> Manifest:
    """Bytes → Manifest, or ManifestError naming `source`, the line and the field."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    # JSON unless named .yaml/.yml (a manifest from the wire has no suffix)
    syntax = "yaml" if Path(str(source)).suffix.lower() in (".yaml", ".yml") else "json"
    obj, root = read_mapping(text, source, error=ManifestError, name="manifest", syntax=syntax,
                             shape="a mapping with at least 'active'")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if version in MIGRATIONS:
        raise ManifestError(f"{source}: schema_version: {version} is an older manifest format (this quantgate "
                            f"reads version {SCHEMA_VERSION}); rewrite it with `quantgate manifest migrate {source}` "
                            "(history kept)")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{source}: schema_version: {version!r} is not supported "
                            f"(this quantgate reads version {SCHEMA_VERSION})")
    return validate(Manifest, obj, source, root, error=ManifestError)


# ------------------------------------------------------------------------------ migration
def _engine_of_v1(dep: dict) -> dict | None:
    """The engine a version-1 deployment was served by, from its provider (pure)."""
    p = dep.get("provider") or {"kind": "mock"}
    if not isinstance(p, dict):
        return None
    if p.get("kind") == "local":
        return {"kind": "transformers", "dtype": p.get("dtype", "auto"),
                "device": "cuda" if p.get("device") == "cuda" else "cpu", "source": "migrated from schema 1"}
    if p.get("kind") == "openai":
        return {"kind": "openai", "source": "migrated from schema 1"}
    return None


def _migrate_1(obj: dict) -> tuple[dict, str]:
    def dep(d):
        if not isinstance(d, dict) or "engine" in d:
            return d
        eng = _engine_of_v1(d)
        return {**d, "engine": eng} if eng else d

    out = {**obj, "schema_version": 2, "active": dep(obj.get("active"))}
    if isinstance(obj.get("previous"), list):
        out["previous"] = [dep(d) for d in obj["previous"]]
    if isinstance(obj.get("serving"), dict) and obj["serving"].get("fallback") is not None:
        out["serving"] = {**obj["serving"], "fallback": dep(obj["serving"]["fallback"])}
    return out, "schema 1 → 2: each deployment names its engine (local → transformers, openai → openai)"


MIGRATIONS = {1: _migrate_1}  # version → (document → next version's document, what changed)


def migrate_document(obj: dict, *, now: datetime, by: str) -> tuple[dict, list[str]]:
    """An older manifest document (a mapping) → the current version, with a history event per step (pure)."""
    steps = []
    while obj.get("schema_version", SCHEMA_VERSION) in MIGRATIONS:
        obj, what = MIGRATIONS[obj["schema_version"]](obj)
        steps.append(what)
        event = HistoryEvent(what="migrate", when=now, why=what, by=by).model_dump(mode="json", exclude_none=True)
        obj["history"] = [*(obj.get("history") or []), event]
    return obj, steps


def migrate_manifest(path: str | Path, *, now: datetime, by: str) -> tuple[Manifest, list[str]]:
    """Rewrite an older manifest file in the current version, atomically; (the manifest, the steps taken).

    The caller holds the manifest's lock; a current manifest is left as it is (no steps).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    syntax = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "json"
    obj, _ = read_mapping(text, path, error=ManifestError, name="manifest", syntax=syntax,
                          shape="a mapping with at least 'active'")
    new, steps = migrate_document(obj, now=now, by=by)
    m = parse_manifest(json.dumps(new, default=str), path)  # JSON is YAML too
    if steps:
        write_manifest(path, m)
    return m, steps


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file "
                            "(examples/manifest.mock.json is one to start from)") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_manifest(data, path)


def dump_manifest(m: Manifest) -> str:
    return m.model_dump_json(indent=2, by_alias=True, exclude_none=True) + "\n"


def write_manifest(path: str | Path, m: Manifest) -> None:
    """Atomic: readers (the gateway's reloader included) see the old or the new file, never a torn one."""
    atomic_write_text(Path(path), dump_manifest(m))


def edit_manifest(path: str | Path, change) -> Manifest:
    """Read-modify-write under a file lock: concurrent editors (promote, rollback, `canary`, the
    gateway's canary decisions) queue, and each write is atomic. `change(current or None)` returns
    the new manifest, or None to leave the file as it is (returned unchanged then)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        current = load_manifest(path) if path.is_file() else None
        new = change(current)
        if new is None:
            return current
        write_manifest(path, new)
    return new


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

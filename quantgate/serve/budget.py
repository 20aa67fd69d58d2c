"""Per-request budget: turn `budget_ms` and what is known about the deployments into a plan.

`budget_ms` bounds the whole request, queueing included. The plan says which deployment to try
first, with how many output tokens and how much context, and how long that attempt may take
before the rest of the budget is handed to the fallback. When the active deployment cannot fit
the budget (from what it has been measured to do), the plan degrades *before* calling it: fewer
output tokens first, then the fallback deployment. When too little budget is left to try
anything, the plan says so and the gateway answers budget-exhausted instead of hanging.

Pure: `plan_request` is a function of numbers; `Estimator` keeps running averages fed by the
gateway, with no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .manifest import LevelSpec


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a deployment has been measured to do: time to first token and per output token."""

    ttft_ms: float
    ms_per_token: float

    def predict_ms(self, tokens: int) -> float:
        return self.ttft_ms + self.ms_per_token * tokens


class Estimator:
    """Exponentially weighted averages per deployment; None until `min_samples` answers."""

    def __init__(self, alpha: float = 0.1, min_samples: int = 5):
        self.alpha, self.min_samples = alpha, min_samples
        self._s: dict[str, list[float]] = {}  # key → [n, ttft, ms_per_token]

    def observe(self, key: str, ttft_ms: float, generation_ms: float, tokens_out: int) -> None:
        per_tok = generation_ms / max(1, tokens_out - 1) if tokens_out > 1 else 0.0
        s = self._s.get(key)
        if s is None:
            self._s[key] = [1, ttft_ms, per_tok]
            return
        a = self.alpha if s[0] >= self.min_samples else 1.0 / (s[0] + 1)  # plain mean while warming up
        s[0] += 1
        s[1] += a * (ttft_ms - s[1])
        s[2] += a * (per_tok - s[2])

    def get(self, key: str) -> Estimate | None:
        s = self._s.get(key)
        if s is None or s[0] < self.min_samples:
            return None
        return Estimate(s[1], s[2])


@dataclass(frozen=True, slots=True)
class Attempt:
    target: str            # 'active' or 'fallback'
    timeout_ms: float      # this attempt's share; the last attempt gets whatever is left
    max_tokens: int
    context_chars: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    attempts: tuple[Attempt, ...]
    reasons: tuple[str, ...] = field(default=())

    @property
    def exhausted(self) -> bool:
        return not self.attempts


def plan_request(
    *,
    remaining_ms: float,
    route: str,                      # from the ladder: 'active', 'probe' or 'fallback'
    max_tokens: int,
    has_fallback: bool,
    rung: LevelSpec | None = None,   # the ladder's current actions (None at normal)
    est_active: Estimate | None = None,
    est_fallback: Estimate | None = None,
    min_attempt_ms: float = 20.0,
    fallback_reserve_ms: float = 200.0,
    min_tokens: int = 1,
) -> Plan:
    if remaining_ms < min_attempt_ms:
        return Plan((), (f"budget exhausted: {remaining_ms:.0f} ms left < {min_attempt_ms:.0f} ms",))
    reasons: list[str] = []
    tokens, ctx = max_tokens, None
    if rung is not None:
        tokens = max(min_tokens, math.floor(max_tokens * rung.max_tokens_factor))
        ctx = rung.context_chars
        if tokens < max_tokens:
            reasons.append(f"ladder: max_tokens {max_tokens}→{tokens}")
    first = "fallback" if (route == "fallback" and has_fallback) else "active"
    if route == "fallback" and has_fallback:
        reasons.append("breaker: routed to fallback")
    if first == "fallback" or not has_fallback:
        if first == "active" and est_active is not None and est_active.predict_ms(tokens) > remaining_ms:
            tokens = _fit(est_active, remaining_ms, tokens, min_tokens, reasons)
        return Plan((Attempt(first, remaining_ms, tokens, ctx),), tuple(reasons))

    # Active first, with part of the budget kept back for the fallback: its measured time with
    # half again as slack (or the configured reserve until it is measured), never so little that
    # the fallback could not even start (min_attempt_ms, twice over for the time spent failing
    # over), and never more than half the budget.
    reserve = est_fallback.predict_ms(tokens) * 1.5 if est_fallback is not None else fallback_reserve_ms
    reserve = min(max(reserve, 2 * min_attempt_ms), remaining_ms / 2)
    active_share = remaining_ms - reserve
    if route != "probe" and est_active is not None and est_active.predict_ms(tokens) > active_share:
        fit = _fit(est_active, active_share, tokens, min_tokens, [])
        if est_active.predict_ms(fit) <= active_share * FIT_SAFETY:
            reasons.append(f"budget: max_tokens {tokens}→{fit} to fit {active_share:.0f} ms")
            tokens = fit
        else:
            reasons.append(f"budget: active needs ~{est_active.predict_ms(min_tokens):.0f} ms, "
                           f"{active_share:.0f} ms available: fallback")
            return Plan((Attempt("fallback", remaining_ms, tokens, ctx),), tuple(reasons))
    return Plan((Attempt("active", active_share, tokens, ctx), Attempt("fallback", reserve, tokens, ctx)),
                tuple(reasons))


FIT_SAFETY = 0.8  # aim to finish within 80% of the time available: estimates are averages, not bounds


def _fit(est: Estimate, ms: float, tokens: int, min_tokens: int, reasons: list[str]) -> int:
    """The most output tokens the estimate says fit in `ms` (at least min_tokens)."""
    if est.ms_per_token <= 0:
        return tokens
    room = (ms * FIT_SAFETY - est.ttft_ms) / est.ms_per_token
    if not math.isfinite(room):  # a per-token time so small the quotient overflows (found by Hypothesis)
        room = tokens if room > 0 else min_tokens
    fit = max(min_tokens, min(tokens, math.floor(room)))
    if fit < tokens:
        reasons.append(f"budget: max_tokens {tokens}→{fit}")
    return fit


def trim_context(text: str, context_chars: int | None) -> str:
    """Keep the end of the prompt (the question usually comes last)."""
    if context_chars is None or len(text) <= context_chars:
        return text
    return text[-context_chars:]

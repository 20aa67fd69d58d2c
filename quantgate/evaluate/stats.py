"""Per-request records and the pure aggregates a load test reports.

Everything here is a function of data: no clock, no I/O, no event loop, so the numbers a
report shows can be checked on hand-made records. Times in records are seconds; aggregates
are reported in milliseconds (`*_ms`), with `n` (how many values) and `requests` (how many
requests those values come from) beside every percentile, so a P99 resting on 12 requests is
visibly one.

Definitions (the common ones, as in vLLM's serving benchmark):
  TTFT  time from sending the request to the first non-empty streamed chunk
  TPOT  (E2E − TTFT) / (output tokens − 1), per request; undefined for one-token outputs
  ITL   gaps between consecutive non-empty streamed chunks, pooled over requests
  E2E   time from sending the request to the end of the stream
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Sequence

Outcome = Literal["ok", "error", "timeout"]
PERCENTILES = (50, 95, 99)


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds; `start_s` is the offset from the start
    of the measured phase; latency fields are None where the request never got that far."""

    id: str
    kind: str
    outcome: Outcome = "ok"
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None
    e2e_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        return cls(**d)


@dataclass
class Summary:
    """Distribution of one latency metric in milliseconds."""

    n: int  # values the percentiles rest on
    requests: int  # requests those values come from (equal to n except for ITL)
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass
class Aggregates:
    total: int
    ok: int
    errors: int
    timeouts: int
    error_rate: float
    timeout_rate: float
    wall_s: float
    request_throughput: float  # successful requests / s over the measured wall time
    output_token_throughput: float  # output tokens of successful requests / s
    goodput: float  # requests / s that met every SLO
    slo_attainment: float  # share of all measured requests that met every SLO
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    tokens_out_mean: float | None = None
    per_kind: dict[str, "Aggregates"] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, the same
    rule as numpy's default (and vLLM's benchmark), so reported P50/P95/P99 compare with other
    tools' numbers; None for no values. The gateway's live ladder uses nearest rank instead
    (serve/ladder.py says why)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values_s: Sequence[float], requests: int | None = None) -> Summary:
    """Seconds in, a millisecond Summary out."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return Summary(n=0, requests=requests or 0)
    p50, p95, p99 = (percentile(ms, q) for q in PERCENTILES)
    return Summary(n=len(ms), requests=len(ms) if requests is None else requests,
                   mean=sum(ms) / len(ms), p50=p50, p95=p95, p99=p99, max=max(ms))


def tpot_of(e2e_s: float, ttft_s: float, tokens_out: int) -> float | None:
    """TPOT for one request; None when there is no decode phase to divide by."""
    if tokens_out < 2:
        return None
    return (e2e_s - ttft_s) / (tokens_out - 1)


def meets_slo(r: RequestRecord, slo) -> bool:
    """A request is good if it succeeded and met every target the SLO gives (ms).

    A one-token output has no TPOT; it cannot miss a TPOT target.
    """
    if r.outcome != "ok":
        return False
    checks = (("ttft_ms", r.ttft_s), ("tpot_ms", r.tpot_s), ("e2e_ms", r.e2e_s))
    for name, value in checks:
        target = getattr(slo, name, None) if slo is not None else None
        if target is None:
            continue
        if value is None:
            if name == "tpot_ms" and r.tokens_out < 2:
                continue
            return False
        if value * 1000.0 > target:
            return False
    return True


def _rate(count: float, wall_s: float) -> float:
    return count / wall_s if wall_s > 0 else 0.0


def aggregate(records: Iterable[RequestRecord], wall_s: float, slo=None, *, by_kind: bool = True) -> Aggregates:
    """Reduce measured records to the report's aggregates.

    Rates are over `wall_s`, the measured phase's wall time (first send to last completion),
    shared by the per-kind breakdown so per-kind throughputs add up to the total.
    """
    rs = list(records)
    ok = [r for r in rs if r.outcome == "ok"]
    n = len(rs)
    errors = sum(r.outcome == "error" for r in rs)
    timeouts = sum(r.outcome == "timeout" for r in rs)
    good = sum(meets_slo(r, slo) for r in rs)
    tokens = sum(r.tokens_out for r in ok)
    itl = [g for r in ok for g in r.itl_s]
    agg = Aggregates(
        total=n, ok=len(ok), errors=errors, timeouts=timeouts,
        error_rate=errors / n if n else 0.0, timeout_rate=timeouts / n if n else 0.0,
        wall_s=wall_s,
        request_throughput=_rate(len(ok), wall_s),
        output_token_throughput=_rate(tokens, wall_s),
        goodput=_rate(good, wall_s),
        slo_attainment=good / n if n else 0.0,
        ttft=summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=summarize([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl=summarize(itl, requests=sum(1 for r in ok if r.itl_s)),
        e2e=summarize([r.e2e_s for r in ok if r.e2e_s is not None]),
        tokens_out_mean=tokens / len(ok) if ok else None,
    )
    if by_kind:
        kinds = sorted({r.kind for r in rs})
        agg.per_kind = {k: aggregate([r for r in rs if r.kind == k], wall_s, slo, by_kind=False) for k in kinds}
    return agg

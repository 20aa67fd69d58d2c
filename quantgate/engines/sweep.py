"""Pure: the concurrency sweep's plan, its knee, and the failure modes a pair showed.

The knee is the highest concurrency at which the share of requests meeting every SLO is still
at least `min_attainment`, counting up from the lowest level without a miss in between: a
level that passes after one that missed is noise on a shared machine, not headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SweepPoint:
    concurrency: int
    requests: int
    attainment: float | None  # share of requests that met every SLO
    goodput_rps: float | None = None
    throughput_rps: float | None = None
    output_tok_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p95_ms: float | None = None
    e2e_p95_ms: float | None = None
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    first_error: str | None = None
    meets: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def plan(levels: list[int], requests_per_level: int | None = None) -> list[tuple[int, int]]:
    """(concurrency, requests) per level: enough requests that every slot turns over a few times."""
    return [(c, requests_per_level or max(6, 3 * c)) for c in levels]


def point_of(concurrency: int, requests: int, metrics: dict, min_attainment: float,
             first_error: str | None = None) -> SweepPoint:
    """A SweepPoint from the flat metrics a load report reduces to (worker.load_metrics names)."""
    att = metrics.get("slo_attainment")
    p = SweepPoint(concurrency=concurrency, requests=requests, attainment=att,
                   goodput_rps=metrics.get("goodput_rps"), throughput_rps=metrics.get("throughput_rps"),
                   output_tok_s=metrics.get("output_tok_s"), ttft_p50_ms=metrics.get("ttft_p50_ms"),
                   ttft_p95_ms=metrics.get("ttft_p95_ms"), tpot_p50_ms=metrics.get("tpot_p50_ms"),
                   tpot_p95_ms=metrics.get("tpot_p95_ms"), e2e_p95_ms=metrics.get("e2e_p95_ms"),
                   error_rate=metrics.get("error_rate") or 0.0, timeout_rate=metrics.get("timeout_rate") or 0.0,
                   first_error=first_error)
    p.meets = att is not None and att >= min_attainment and p.error_rate == 0 and p.timeout_rate == 0
    return p


def knee(points: list[SweepPoint]) -> SweepPoint | None:
    """The highest level that met the SLOs with every lower level meeting them too."""
    best = None
    for p in sorted(points, key=lambda p: p.concurrency):
        if not p.meets:
            break
        best = p
    return best


def should_stop(point: SweepPoint, stop_after_miss: bool) -> bool:
    return stop_after_miss and not point.meets


# ------------------------------------------------------------------------------ failure modes
def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def failure_modes(points: list[SweepPoint], *, main: dict | None = None, oom: bool = False,
                  died: bool = False, start_error: str | None = None) -> list[dict]:
    """[{kind, detail}] for what went wrong or degraded: start failure, OOM, timeouts, errors,
    queueing (waiting grows, decoding does not), contention (decoding slows with load), SLO misses."""
    out: list[dict] = []
    if start_error:
        out.append({"kind": "start", "detail": start_error})
    if oom:
        out.append({"kind": "oom", "detail": "the engine's log reports running out of memory"})
    if died:
        out.append({"kind": "crash", "detail": "the server exited while it was being measured"})
    runs = ([("workload", main)] if main else []) + [(f"concurrency {p.concurrency}", p.to_dict()) for p in points]
    for label, m in runs:
        if (m.get("timeout_rate") or 0) > 0:
            out.append({"kind": "timeouts", "detail": f"{m['timeout_rate']:.0%} of requests timed out at {label}"})
        if (m.get("error_rate") or 0) > 0:
            err = m.get("first_error")
            out.append({"kind": "errors", "detail": f"{m['error_rate']:.0%} of requests failed at {label}"
                        + (f": {err}" if err else "")})
    pts = sorted((p for p in points if p.ttft_p50_ms is not None), key=lambda p: p.concurrency)
    if len(pts) >= 2:
        lo, hi = pts[0], pts[-1]
        ttft_r, tpot_r = _ratio(hi.ttft_p50_ms, lo.ttft_p50_ms), _ratio(hi.tpot_p50_ms, lo.tpot_p50_ms)
        if ttft_r is not None and ttft_r >= 2 and (tpot_r is None or ttft_r >= 2 * tpot_r):
            out.append({"kind": "queueing",
                        "detail": f"TTFT P50 grows {ttft_r:.1f}× from concurrency {lo.concurrency} to "
                                  f"{hi.concurrency} while TPOT grows {tpot_r or 1:.1f}×: requests wait for a slot"})
        if tpot_r is not None and tpot_r >= 1.5:
            out.append({"kind": "contention",
                        "detail": f"TPOT P50 grows {tpot_r:.1f}× from concurrency {lo.concurrency} to "
                                  f"{hi.concurrency}: batched requests share the same cores"})
    misses = [p for p in sorted(points, key=lambda p: p.concurrency) if not p.meets]
    if misses:
        m = misses[0]
        att = f"{m.attainment:.0%}" if m.attainment is not None else "n/a"
        out.append({"kind": "slo", "detail": f"misses the SLOs from concurrency {m.concurrency} "
                                             f"(SLO attainment {att})"})
    return out

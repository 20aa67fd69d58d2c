"""Compare candidates with the baseline and decide: recovery, gates, the recommended candidate.

Pure functions of plain metric dicts — no model, no clock, no I/O — so every decision can be
tested on hand-made reports. A candidate's metrics are a flat {name: number} mapping, e.g.
perplexity, e2e_p95_ms, usd_per_1m_output_tokens, error_rate, regression_pass_rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..recipe import DEFAULT_COST_TOLERANCE, GateSpec

# Metrics where smaller is better; everything else (accuracy, pass rates, throughput) is larger-better.
EPS = 1e-9  # ratios like 0.75/0.8333 land a hair under 0.9: a gate should not fail on rounding

LOWER_IS_BETTER_SUFFIXES = ("_ms", "_mb", "_bytes", "_rate", "perplexity", "usd_per_1m_output_tokens",
                            "usd_per_request", "nll")
HIGHER_IS_BETTER = ("regression_pass_rate", "goodput_rps", "slo_attainment")


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]  # lm_eval/<task>/<metric>: the metric's own name decides
    if leaf in HIGHER_IS_BETTER:
        return False
    return leaf.endswith(LOWER_IS_BETTER_SUFFIXES) or leaf in ("bits_per_byte", "bpb")


def recovery(metric: str, value: float, baseline: float) -> float | None:
    """How much of the baseline's quality is kept: 1.0 = equal, < 1 = worse, in either direction."""
    if value is None or baseline is None:
        return None
    if lower_is_better(metric):
        return baseline / value if value else None
    return value / baseline if baseline else None


@dataclass
class GateResult:
    metric: str
    rule: str  # e.g. "min_recovery 0.85"
    value: float | None  # what the rule compares (the metric, its recovery, or its ratio)
    threshold: float
    passed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_gate(gate: GateSpec, metrics: dict, baseline: dict) -> GateResult:
    m = gate.metric
    value, base = metrics.get(m), baseline.get(m)
    if value is None:
        return GateResult(m, gate.rule, None, gate.threshold, False, f"{m} was not measured")
    if gate.min is not None:
        ok = value >= gate.min - EPS
        return GateResult(m, gate.rule, value, gate.min, ok, f"{m} {value:.4g} {'≥' if ok else '<'} {gate.min:.4g}")
    if gate.max is not None:
        ok = value <= gate.max + EPS
        return GateResult(m, gate.rule, value, gate.max, ok, f"{m} {value:.4g} {'≤' if ok else '>'} {gate.max:.4g}")
    if base is None:
        return GateResult(m, gate.rule, None, gate.threshold, False, f"{m} has no baseline value to compare with")
    if gate.min_recovery is not None:
        r = recovery(m, value, base)
        ok = r is not None and r >= gate.min_recovery - EPS
        short = "" if ok or r is None else f", short by {gate.min_recovery - r:.3f}"
        return GateResult(m, gate.rule, r, gate.min_recovery, ok,
                          f"{m} recovery {r:.3f} ({value:.4g} vs baseline {base:.4g}) "
                          f"{'≥' if ok else '<'} {gate.min_recovery}{short}")
    ratio = value / base if base else float("inf")
    ok = ratio <= gate.max_ratio + EPS
    return GateResult(m, gate.rule, ratio, gate.max_ratio, ok,
                      f"{m} {value:.4g} is {ratio:.2f}× the baseline's {base:.4g} "
                      f"({'≤' if ok else '>'} {gate.max_ratio}×)")


@dataclass
class CandidateVerdict:
    name: str
    method: str
    metrics: dict
    recovery: dict
    gates: list[GateResult] = field(default_factory=list)
    error: str | None = None
    dtype: str | None = None  # what it was scored in (evaluation.dtype); one for every candidate of a run
    kernels: dict | None = None  # the record's quantized-matmul classes and counts ({}: dense; None: not recorded)

    @property
    def passed(self) -> bool:
        return self.error is None and all(g.passed for g in self.gates)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass
class Comparison:
    baseline: str
    candidates: list[CandidateVerdict]
    recommended: str | None
    why: str

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "recommended": self.recommended, "why": self.why,
                "candidates": [c.to_dict() for c in self.candidates]}


def compare(rows: list[dict], baseline: str, gates: list[GateSpec], cost_metric: str = "usd_per_1m_output_tokens",
            cost_tolerance: float = DEFAULT_COST_TOLERANCE) -> Comparison:
    """rows: [{"name", "method", "metrics": {...}, "error": str|None, "dtype": str|None, "kernels": dict|None}]
    → verdicts and a recommendation."""
    by_name = {r["name"]: r for r in rows}
    if baseline not in by_name:
        raise ValueError(f"baseline '{baseline}' is not among the evaluated candidates")
    base = by_name[baseline]["metrics"]
    verdicts = []
    for r in rows:
        m = r.get("metrics") or {}
        rec = {k: recovery(k, v, base.get(k)) for k, v in m.items() if isinstance(v, (int, float)) and base.get(k)}
        gate_results = [] if r.get("error") else [evaluate_gate(g, m, base) for g in gates]
        verdicts.append(CandidateVerdict(r["name"], r.get("method", ""), m, rec, gate_results, r.get("error"),
                                         r.get("dtype"), r.get("kernels")))
    return Comparison(baseline, verdicts, *select_recommended(verdicts, cost_metric, cost_tolerance))


def select_recommended(verdicts: list[CandidateVerdict], cost_metric: str,
                       tolerance: float = DEFAULT_COST_TOLERANCE) -> tuple[str | None, str]:
    """The cheapest candidate that passes every gate. Costs within `tolerance` of the cheapest are a
    tie (a short load test measures cost to a few percent: which of two equal models is "cheaper"
    changes from run to run), and a tie goes to the smaller model, then to the cheaper one."""
    passing = [v for v in verdicts if v.passed]
    if not passing:
        return None, "no candidate passes every gate"

    def cost(v: CandidateVerdict) -> float:
        return v.metrics.get(cost_metric, float("inf"))

    def size(v: CandidateVerdict) -> float:
        return v.metrics.get("weights_mb", float("inf"))

    cheapest = min(passing, key=lambda v: (cost(v), size(v), v.name))
    tied = [v for v in passing if cost(v) <= cost(cheapest) * (1 + tolerance)]
    best = min(tied, key=lambda v: (size(v), cost(v), v.name))
    others = len(passing) - 1
    also = f"; {others} other(s) also pass" if others else ""
    if best is cheapest:
        at = f" at {cost(best):.4g} {cost_metric}" if cost_metric in best.metrics else ""
        return best.name, f"cheapest of {len(passing)} candidate(s) passing every gate{at}{also}"
    return best.name, (f"smallest ({size(best):.0f} MB of weights) of the {len(tied)} passing candidates within "
                       f"{tolerance:.0%} of the cheapest {cost_metric} ({cost(best):.4g} vs {cheapest.name}'s "
                       f"{cost(cheapest):.4g}, {size(cheapest):.0f} MB){also}")

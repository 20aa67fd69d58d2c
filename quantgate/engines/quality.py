"""Pure: the recipe's quality gates applied to what each engine answered, not only to what the
in-process evaluation answered.

A checkpoint can pass its gates in transformers and still answer wrongly in the engine that serves
it (a wrong kernel, a config field the engine reads differently). So the matrix grades the recipe's
regression set on every candidate × engine pair (engines/measure.py), and here each pair's pass rate
meets the recipe's `regression_pass_rate` gates against the baseline *on the same engine* when the
matrix measured the baseline there, else against the baseline's evaluation record. A pair that
fails is excluded from the recommendation and refused by promote unless forced (engines/serving.py).
"""

from __future__ import annotations

from ..evaluate.compare import evaluate_gate

METRIC = "regression_pass_rate"


def baseline_rates(pairs: list[dict], baseline: str | None) -> dict[str, float]:
    """engine name → the baseline's pass rate on it, for the engines the matrix measured it on."""
    return {p["engine"]: p["regression"]["pass_rate"] for p in pairs
            if baseline and p["artifact"]["name"] == baseline and p.get("regression")}


def engine_quality(pair: dict, gates: list, on_engine: dict[str, float], evaluated: float | None) -> dict | None:
    """The pair's regression result against the recipe's regression gates (None: not graded)."""
    reg = pair.get("regression")
    mine = [g for g in gates if g.metric == METRIC]
    if not reg or not mine:
        return None
    base, source = on_engine.get(pair["engine"]), f"the baseline on {pair['engine']}"
    if base is None:
        base, source = evaluated, "the baseline's evaluation (in process)"
    results = [evaluate_gate(g, {METRIC: reg["pass_rate"]}, {METRIC: base} if base is not None else {})
               for g in mine]
    return {METRIC: reg["pass_rate"], "passed_cases": reg["passed"], "total": reg["total"], "baseline": base,
            "baseline_from": source, "gates": [r.to_dict() for r in results],
            "passed": all(r.passed for r in results)}


def apply(pairs: list[dict], gates: list, baseline: str | None, evaluated: float | None) -> None:
    """Each graded pair gets `engine_quality`; one that fails it has quality.passed False and says why."""
    on_engine = baseline_rates(pairs, baseline)
    for p in pairs:
        q = engine_quality(p, gates, on_engine, evaluated)
        if q is None:
            continue
        p["engine_quality"] = q
        if not q["passed"]:
            why = "; ".join(g["reason"] for g in q["gates"] if not g["passed"])
            p["quality"] = {**(p.get("quality") or {}), "passed": False, "engine_failed": why,
                            "failed_gates": [*(p.get("quality") or {}).get("failed_gates", []),
                                             f"{METRIC} on {p['engine']}"]}


def refusal(pair: dict) -> str | None:
    """Why promote refuses this pair on quality grounds (its answers on its engine), else None."""
    why = (pair.get("quality") or {}).get("engine_failed")
    return f"its answers on {pair['engine']} fail the recipe's regression gate: {why}" if why else None

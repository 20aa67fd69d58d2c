"""The highest load a pair sustains within the SLOs (#21 item 4): the pure bisection on synthetic
attainment curves, its bounds and validation, the card's ranking on it, and the real loop against
a loopback server with a capacity, checked against `quantgate loadtest` at fixed rates."""

from __future__ import annotations

import math

import pytest
import yaml

from quantgate.engines import ratesearch as rs
from quantgate.engines.spec import EngineSelectionSpec, SLORateSpec, load_selection
from quantgate.errors import QuantgateError

GRID = SLORateSpec().values  # 0.25 … 16 req/s, × 1.25


# ------------------------------------------------------------------------------ the bisection
def attainment(v: float, capacity: float) -> float:
    """A synthetic curve: every request meets the SLOs well below capacity, ever fewer past it."""
    return 1.0 / (1.0 + math.exp(8 * (v / capacity - 1)))


@pytest.mark.parametrize("capacity", [0.5, 0.77, 1.0, 2.5, 3.3, 7.0, 12.0, 20.0])
def test_the_bisection_finds_the_boundary_to_one_grid_step_within_the_probe_bound(capacity):
    need = 0.95
    out, probes = rs.search(GRID, lambda v: attainment(v, capacity) >= need, max_probes=8)
    truth = [v for v in GRID if attainment(v, capacity) >= need]
    assert out.status == "found" and out.max_value == truth[-1]
    assert out.next_value == GRID[GRID.index(truth[-1]) + 1]  # one step above: probed, and it missed
    assert (out.next_value, False) in probes and (out.max_value, True) in probes
    assert len(probes) <= rs.probes_needed(len(GRID)) == 5 <= 8


def test_all_pass_all_fail_and_determinism():
    top, probes = rs.search(GRID, lambda v: True, 8)
    assert (top.status, top.max_value, top.next_value) == ("all_pass", 16.0, None) and len(probes) <= 5
    none, probes = rs.search(GRID, lambda v: False, 8)
    assert (none.status, none.max_value, none.next_value) == ("all_fail", None, 0.25) and len(probes) <= 5
    runs = [rs.search(GRID, lambda v: attainment(v, 2.5) >= 0.95, 8) for _ in range(3)]
    assert all(r == runs[0] for r in runs)


def test_the_probe_bound_holds_and_says_what_it_left_open():
    out, probes = rs.search(GRID, lambda v: v <= 2.0, max_probes=2)
    assert len(probes) == 2 and out.status == "unresolved"
    assert out.max_value in (v for v, ok in probes if ok) and out.next_value in (v for v, ok in probes if not ok)
    assert out.max_value < 2.0 < out.next_value


def test_a_pass_above_a_miss_is_noise_not_headroom():
    values = [1.0, 2.0, 4.0, 8.0]
    # the miss at 2 rules: the pass at 4 is not taken as headroom, and nothing above 2 is probed again
    assert rs.bracket(values, [(4.0, True), (2.0, False), (1.0, True)]) == (0, 1)
    assert rs.next_probe(values, [(4.0, True), (2.0, False), (1.0, True)], 8) is None
    out = rs.outcome("rate", values, [(4.0, True), (2.0, False), (1.0, True)], 8)
    assert (out.status, out.max_value, out.next_value) == ("found", 1.0, 2.0)


def test_the_grid_rounds_to_values_people_type_and_concurrency_to_integers():
    assert SLORateSpec(low=2, high=16, growth=2).values == [2.0, 4.0, 8.0, 16.0]
    assert all(f"{v:.3g}" == f"{v:g}" for v in GRID)
    assert SLORateSpec(axis="concurrency", low=1, high=10, growth=1.5).values == [1, 2, 3, 4, 6, 8, 10]


# ------------------------------------------------------------------------------- validation
def test_a_grid_the_probe_bound_cannot_resolve_is_refused_naming_the_field(tmp_path):
    f = tmp_path / "sel.yaml"
    f.write_text("goal: throughput\nslo_rate:\n  low: 0.01\n  high: 100\n  growth: 1.01\n")
    with pytest.raises(QuantgateError) as e:
        load_selection(f)
    assert "slo_rate.max_probes" in str(e.value) and "needs 10 probes" in str(e.value) and str(f) in str(e.value)
    f.write_text("slo_rate: {low: 4, high: 2}\n")
    with pytest.raises(QuantgateError, match="slo_rate.high"):
        load_selection(f)


def test_the_search_runs_by_default_only_where_the_goal_ranks_on_it():
    assert EngineSelectionSpec(goal="latency").rate_search is None
    assert EngineSelectionSpec(goal="throughput").rate_search == SLORateSpec()
    assert EngineSelectionSpec(goal="cost").rate_search == SLORateSpec()
    assert EngineSelectionSpec(goal="throughput", slo_rate=False).rate_search is None
    assert EngineSelectionSpec(goal="latency", slo_rate={"high": 4}).rate_search.high == 4


def test_the_recipe_attainment_is_validated_and_leaves_other_recipes_hashes_alone(tmp_path):
    from quantgate.recipe import load_recipe

    base = {"name": "r", "model": {"ref": "bundled:smollm2-135m-instruct"},
            "candidates": [{"name": "base", "method": "baseline"}],
            "evaluation": {"workload": {"requests": 8, "concurrency": 2, "slo": {"ttft_ms": 2000}}}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base))
    plain = load_recipe(p).recipe_hash
    base["evaluation"]["workload"]["slo"]["attainment"] = None
    p.write_text(yaml.safe_dump(base))
    assert load_recipe(p).recipe_hash == plain
    base["evaluation"]["workload"]["slo"]["attainment"] = 0.9
    p.write_text(yaml.safe_dump(base))
    assert load_recipe(p).recipe_hash != plain  # it changes what counts as within the SLOs
    base["evaluation"]["workload"]["slo"]["attainment"] = 1.5
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(QuantgateError, match=r"evaluation\.workload\.slo\.attainment"):
        load_recipe(p)

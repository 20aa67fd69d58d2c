"""The highest load a pair sustains within the SLOs (#21 item 4): the pure bisection on synthetic
attainment curves, its bounds and validation, the card's ranking on it, and the real loop against
a loopback server with a capacity, checked against `quantgate loadtest` at fixed rates."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import typer
import yaml
from typer.testing import CliRunner

from quantgate.engines import ratesearch as rs
from quantgate.engines.card import build_card, pair_id, recommend, render_markdown
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


# ------------------------------------------------------------------------------------- card
def _pair(name, rate, nxt, goodput, usd, status="found", e2e=900.0):
    return {"engine": "vllm", "engine_kind": "vllm", "measured": True, "quality": {"passed": True},
            "artifact": {"name": name, "path": f"/w/{name}", "format": "gptq", "label": "gptq"},
            "metrics": {"e2e_p95_ms": e2e, "ttft_p95_ms": 100.0, "slo_attainment": 1.0, "error_rate": 0.0,
                        "timeout_rate": 0.0, "goodput_rps": 0.5, "output_tok_s": 10.0,
                        "usd_per_1m_output_tokens": 9.0},
            "knee": {"concurrency": 4, "goodput_rps": 9.0},  # the knee would pick otherwise
            "slo_rate": {"axis": "rate", "unit": "req/s", "status": status, "max_value": rate, "next_value": nxt,
                         "goodput_rps": goodput, "output_tok_s": goodput and goodput * 30,
                         "usd_per_1m_output_tokens": usd, "probes": 4, "max_probes": 8,
                         "probed": [{"value": v, "requests": 12, "attainment": a, "meets": a >= 0.95,
                                     "goodput_rps": goodput, "ttft_p95_ms": 100.0, "tpot_p95_ms": 10.0}
                                    for v, a in ((rate, 1.0), (nxt, 0.4)) if v is not None]},
            "launch": {}}


def test_throughput_and_cost_rank_on_the_highest_slo_rate_and_the_card_shows_it():
    slow = _pair("slow", 1.19, 1.49, 1.1, 0.8)
    fast = _pair("fast", 2.91, 3.64, 2.8, 0.3, e2e=1500.0)  # slower per request, sustains more
    never = _pair("never", None, 0.25, None, None, status="all_fail", e2e=100.0)
    rec = recommend([slow, never, fast], "throughput")
    assert rec["ranking"] == ["fast @ vllm", "slow @ vllm", "never @ vllm"]
    assert "highest load within the SLOs 2.91 req/s (3.64 missed)" in rec["why"]
    assert "2.45× the SLO load of slow @ vllm" in rec["why"] and "goodput 2.80 req/s there" in rec["why"]
    cost = recommend([slow, never, fast], "cost")
    assert cost["recommended"] == "fast @ vllm" and "0.300 $ per 1M output tokens" in cost["why"]
    assert recommend([slow, never, fast], "latency")["recommended"] == "never @ vllm"  # the workload's P95 alone
    assert "NO pair meets the SLOs at any load probed" in recommend([never], "throughput")["why"]
    ctx = {"recipe": "r", "goal": "throughput", "workload": {"slo": {"ttft_ms": 300, "attainment": 0.9}, "mix": []},
           "attainment": 0.9, "slo_rate": SLORateSpec().model_dump(), "constraints": {}}
    md = render_markdown(build_card(ctx, [], [slow, fast, never]))
    assert "max SLO load (goodput)" in md and "| 2.91 req/s (3.64 missed) (2.80) |" in md
    assert "### Highest load within the SLOs" in md and "**fast @ vllm** | **2.91 req/s (3.64 missed)**" in md
    assert "< 0.25 req/s" in md and "≥ 90% of requests" in md and "ATTAINMENT" not in md


# ------------------------------------------------------------------- the loop, and loadtest
@pytest.fixture()
def loadtest_app():
    from quantgate.evaluate.loadtest_cli import register

    a = typer.Typer()
    register(a)

    @a.callback()
    def _root():
        pass

    return a


def test_the_search_on_a_server_with_a_capacity_agrees_with_loadtest_at_fixed_rates(fake_cmd, tmp_path,
                                                                                    loadtest_app):
    """One slot, ~4 × 40 ms a request: about 5–6 req/s. The search's answer must meet the SLOs
    when `quantgate loadtest` sends the same load again, and the next step up must miss them; a
    search that stopped a step low, or claimed a step too high, fails one of the two."""
    from quantgate.engine_spec import EngineSpec
    from quantgate.engines.measure import client, probe_workload, search_rate
    from quantgate.evaluate.loadtest_cli import within_slo
    from quantgate.procs import ServerProcess, free_port
    from quantgate.workload import WorkloadSpec

    workload = WorkloadSpec.model_validate({
        "requests": 4, "arrival": "burst", "rate": 1, "burstiness": 50, "warmup_requests": 0, "timeout_s": 30,
        "mix": [{"name": "short", "prompt_tokens": 8, "output_tokens": 4}],
        "slo": {"ttft_ms": 300, "attainment": 0.9}})
    spec = SLORateSpec(low=2, high=16, growth=2, max_probes=3, requests=12)
    port = free_port()
    srv = ServerProcess("slots", fake_cmd(port, "--slots", "1", "--tpot-ms", "40"), port=port,
                        log_path=tmp_path / "slots.log", startup_timeout_s=30)
    wfile = tmp_path / "workload.yaml"
    wfile.write_text(yaml.safe_dump(workload.model_dump(mode="json")))
    with srv:
        engine = client("vllm", srv.base_url, "m", EngineSpec(kind="vllm"), 30)

        async def go():
            await engine.start()
            try:
                return await search_rate(engine, workload, spec, ["the river runs to the sea"] * 4, 0.9,
                                         log=lambda m: None)
            finally:
                await engine.close()

        found = asyncio.run(go())
        assert found["status"] == "found", found
        assert found["probes"] <= spec.max_probes and found["goodput_rps"] > 0
        judged = {}
        for rate in (found["max_value"], found["next_value"]):
            out = tmp_path / f"lt-{rate:g}.json"
            res = CliRunner().invoke(loadtest_app, [
                "loadtest", "--url", srv.base_url, "--model", "m", "--workload", str(wfile), "--arrival", "burst",
                "--rate", f"{rate:g}", "--concurrency", str(spec.in_flight_cap), "--requests", "12",
                "--json", str(out)], env={"COLUMNS": "200"})
            assert res.exit_code == 0, res.output + repr(res.exception)
            report = json.loads(out.read_text())
            # the manual run sends what the probe sent: same arrivals, mix, seed, SLOs
            assert report["workload"] == probe_workload(workload, spec, rate).model_dump(mode="json")
            a = report["aggregates"]
            judged[rate] = within_slo(a["slo_attainment"], a["error_rate"], a["timeout_rate"], 0.9)
            assert ("within the SLOs" in res.output) and (("yes" if judged[rate] else "no") in res.output)
    assert judged == {found["max_value"]: True, found["next_value"]: False}, (found, judged)


# ------------------------------------------------------------------ through `quantgate engines`
def test_quantgate_engines_searches_every_pair_ranks_on_it_and_plots_quality_against_it(tmp_path, tiny_model,
                                                                                         fake_python):
    import shutil

    from quantgate.engines.cli import register
    from quantgate.recipe import load_recipe
    from quantgate.workspace import Workspace

    recipe = {"name": "tiny-slo", "model": {"ref": str(tiny_model)},
              "candidates": [{"name": "base", "method": "baseline", "dtype": "float32"}],
              "evaluation": {"workload": {"requests": 2, "concurrency": 1, "warmup_requests": 0, "timeout_s": 30,
                                          "arrival": "burst", "rate": 1, "burstiness": 50,
                                          "mix": [{"name": "short", "prompt_tokens": 8, "output_tokens": 4}],
                                          "slo": {"ttft_ms": 300, "attainment": 0.9}}}}
    rp = tmp_path / "tiny.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    art = tmp_path / "ws" / "artifacts" / "baseline-0123"
    shutil.copytree(tiny_model, art)
    (art / "candidate.json").write_text(json.dumps({"name": "base", "method": "baseline", "format": "dense",
                                                    "params": {"method": "baseline", "dtype": "float32"},
                                                    "model": {"ref": str(tiny_model)}}))
    run = Workspace(tmp_path / "ws").run(load_recipe(rp))
    run.write_evaluation("base", {"metrics": {"perplexity": 31.5}})
    cfg = tmp_path / "sel.yaml"
    cfg.write_text(yaml.safe_dump({
        "goal": "throughput", "sweep": None,
        "engines": {"slot": {"kind": "vllm", "python": str(fake_python), "startup_timeout_s": 30,
                             "args": ["--slots", "1", "--tpot-ms", "40"]},
                    "hf": {"kind": "transformers", "threads": 1}},
        "slo_rate": {"low": 2, "high": 16, "growth": 2, "max_probes": 3, "requests": 12}}))
    a = typer.Typer()
    register(a)
    a.callback()(lambda: None)
    res = CliRunner().invoke(a, ["engines", str(rp), "--config", str(cfg), "-w", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    card = json.loads(run.engine_card.read_text())
    pairs = {p["engine"]: p for p in card["pairs"]}
    slot = pairs["slot"]["slo_rate"]
    assert (slot["status"], slot["max_value"], slot["next_value"]) == ("found", 4.0, 8.0), slot
    assert slot["attainment_required"] == 0.9 and card["attainment"] == 0.9 and slot["goodput_rps"] > 0
    hf = pairs["hf"]["slo_rate"]  # the in-process engine is searched the same way, in its child process
    assert hf["probes"] >= 1 and hf["status"] in ("found", "all_pass", "all_fail")
    first, second = (next(p for p in card["pairs"] if pair_id(p) == x) for x in card["recommendation"]["ranking"])
    assert (first["slo_rate"]["max_value"] or 0) >= (second["slo_rate"]["max_value"] or 0)  # ranked on it
    assert card["plots"] == ["pareto-slo-rate.png"] and run.engine_slo_rate_plot.stat().st_size > 1000
    md = run.engine_card_report.read_text()
    assert "### Highest load within the SLOs" in md and "4 req/s (8 missed)" in md and "pareto-slo-rate.png" in md


def test_the_slo_rate_front_keeps_pairs_no_other_beats_on_load_and_quality(tmp_path):
    from quantgate.plots import pareto_plot, slo_rate_front, slo_rate_plot

    pts = [("a @ vllm", 4.0, 31.0), ("b @ vllm", 8.0, 36.0), ("c @ hf", 2.0, 33.0), ("d @ llama", 8.0, 35.0)]
    assert slo_rate_front(pts) == ["a @ vllm", "d @ llama"]
    assert slo_rate_plot(pts, tmp_path / "p.png", recommended="d @ llama").stat().st_size > 1000
    assert slo_rate_plot([], tmp_path / "none.png") is None
    rows = [{"name": n, "metrics": {"e2e_p95_ms": x * 100, "perplexity": y}} for n, x, y in pts]
    assert pareto_plot(rows, tmp_path / "q.png").stat().st_size > 1000  # the shared labelling still draws it

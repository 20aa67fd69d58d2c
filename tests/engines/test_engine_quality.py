"""Quality on the serving engine: the recipe's regression gate applied to each pair's own answers,
the card's recommendation and promote refusing a pair that answers wrongly on its engine."""

from __future__ import annotations

import pytest

from quantgate.deploy import with_engine
from quantgate.engines import quality
from quantgate.engines.card import recommend
from quantgate.engines.serving import for_choice, from_card
from quantgate.formats import Artifact
from quantgate.recipe import GateSpec
from quantgate.serve.manifest import Deployment
from quantgate.serve.promote import PromotionRefused

GATES = [GateSpec(metric="regression_pass_rate", min_recovery=0.9), GateSpec(metric="perplexity", min_recovery=0.9)]


def pair(name, engine, passed, total=12, e2e=800.0, kind="vllm"):
    p = {"engine": engine, "engine_kind": kind, "measured": True, "threads": None,
         "artifact": {"name": name, "path": f"/w/{name}", "format": "gptq", "label": "gptq w4g64"},
         "metrics": {"e2e_p95_ms": e2e, "ttft_p95_ms": e2e / 3, "slo_attainment": 1.0, "error_rate": 0.0},
         "quality": {"passed": True},
         "regression": {"pass_rate": passed / total, "passed": passed, "total": total, "cases": []}}
    if kind == "vllm":
        p["engine_spec"] = {"kind": "vllm", "python": "/e/py", "dtype": "bfloat16", "max_model_len": 2048}
        p["serve_command"] = {"argv": ["/e/py", "-m", "vllm.entrypoints.openai.api_server"], "env": {}, "port": 8000}
    return p


def test_a_pair_is_gated_against_the_baseline_on_the_same_engine():
    pairs = [pair("base", "vllm", 9), pair("gptq", "vllm", 5, e2e=500), pair("awq", "vllm", 9, e2e=600),
             pair("gptq", "transformers", 9, kind="transformers")]
    quality.apply(pairs, GATES, "base", evaluated=10 / 12)
    base, gptq, awq, local = pairs
    assert gptq["engine_quality"]["baseline"] == 0.75 and gptq["engine_quality"]["baseline_from"] == "the baseline on vllm"
    assert gptq["quality"]["passed"] is False and "regression_pass_rate on vllm" in gptq["quality"]["failed_gates"]
    assert "recovery 0.556" in gptq["quality"]["engine_failed"]
    assert awq["quality"]["passed"] is True and base["quality"]["passed"] is True
    # no baseline measured on that engine: the baseline's evaluation record is the bar (9/12 < 0.9 × 10/12)
    assert local["engine_quality"]["baseline_from"] == "the baseline's evaluation (in process)"
    assert local["quality"]["passed"] is True
    rec = recommend(pairs, "latency")
    assert rec["recommended"] == "awq @ vllm"  # the fastest pair, gptq @ vllm, answers wrongly there
    assert any(x["pair"] == "gptq @ vllm" and "its answers on vllm fail the recipe's regression gate" in x["why"]
               for x in rec["excluded"])


def test_promote_refuses_a_pair_that_answers_wrongly_on_its_engine_unless_forced():
    pairs = [pair("base", "vllm", 9), pair("gptq", "vllm", 5)]
    quality.apply(pairs, GATES, "base", evaluated=None)
    card = {"goal": {"kind": "latency"}, "constraints": {"device": "cpu"}, "pairs": pairs,
            "recommendation": recommend(pairs, "latency")}
    choice = from_card(card, "gptq")  # its only pair fails: refused, not quietly served in process
    assert choice is not None and "fail the recipe's regression gate" in choice.refused
    dep = Deployment(name="gptq", artifact="/w/gptq")
    with pytest.raises(PromotionRefused, match="regression gate"):
        with_engine(dep, choice, force=False, reason="")
    forced, ev = with_engine(dep, choice, force=True, reason="the case set is stale")
    assert forced.engine.kind == "vllm" and ev["refused_but_forced"] == choice.refused
    art = Artifact("gptq", "/w/gptq", "gptq", bits=4, group_size=64, sym=True, act_order=False)
    assert "regression gate" in for_choice("vllm", art, card).refused  # --engine vllm too
    assert from_card(card, "base").refused is None


def test_ungraded_pairs_and_recipes_without_the_gate_are_left_as_they_were():
    p = pair("gptq", "vllm", 1)
    quality.apply([p], [GateSpec(metric="perplexity", min_recovery=0.9)], "base", evaluated=0.75)
    assert "engine_quality" not in p and p["quality"] == {"passed": True}
    q = {**pair("gptq", "vllm", 1), "regression": None}
    quality.apply([q], GATES, "base", evaluated=0.75)
    assert "engine_quality" not in q

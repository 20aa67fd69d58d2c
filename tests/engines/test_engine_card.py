"""The engine-selection card from hand-made figures: recommendation per goal, exclusions,
rendering, and the deployment a manifest takes."""

from __future__ import annotations

from quantgate.engines.card import (
    build_card,
    deployment_of,
    recommend,
    recommended_deployment,
    render_markdown,
)


def pair(name, engine, kind, e2e, ttft, goodput, knee_goodput=None, att=1.0, passed=True, measured=True, **kw):
    p = {"engine": engine, "engine_kind": kind, "measured": measured,
         "artifact": {"name": name, "path": f"/w/{name}", "format": "gptq", "label": "gptq w4g64"},
         "metrics": {"e2e_p95_ms": e2e, "ttft_p95_ms": ttft, "ttft_p50_ms": ttft / 2, "tpot_p50_ms": 20.0,
                     "goodput_rps": goodput, "slo_attainment": att, "error_rate": 0.0, "timeout_rate": 0.0,
                     "output_tok_s": goodput * 30},
         "knee": {"concurrency": 4, "goodput_rps": knee_goodput or goodput, "output_tok_s": goodput * 40},
         "sweep": [{"concurrency": 1, "requests": 6, "attainment": 1.0, "meets": True, "ttft_p95_ms": ttft}],
         "quality": {"passed": passed}, "launch": {"startup_s": 300.0, "peak_rss_mb": 900.0}, **kw}
    if kind == "vllm":
        p["serve_command"] = {"argv": ["/e/py", "-m", "vllm.entrypoints.openai.api_server", "--port", "8000"],
                              "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "port": 8000}
    return p


FAST = pair("gptq", "vllm", "vllm", e2e=800, ttft=300, goodput=1.0, knee_goodput=2.0)
BUSY = pair("base", "vllm", "vllm", e2e=1500, ttft=500, goodput=1.5, knee_goodput=3.0)
LOCAL = pair("base", "transformers", "transformers", e2e=3000, ttft=900, goodput=0.5)


def test_latency_goal_picks_lowest_p95_e2e_and_says_why():
    rec = recommend([BUSY, FAST, LOCAL], "latency")
    assert rec["recommended"] == "gptq @ vllm" and rec["runner_up"] == "base @ vllm"
    assert "47% lower P95 E2E than base @ vllm" in rec["why"] and "meets the SLOs" in rec["why"]


def test_throughput_goal_picks_most_goodput_at_the_knee():
    rec = recommend([BUSY, FAST, LOCAL], "throughput")
    assert rec["recommended"] == "base @ vllm" and "1.50× the goodput of gptq @ vllm" in rec["why"]


def test_quality_failures_and_unmeasured_pairs_are_excluded_and_slo_misses_rank_last():
    bad_quality = pair("w3", "vllm", "vllm", e2e=100, ttft=50, goodput=9, passed=False)
    broken = {**pair("awq", "llama", "llamacpp", 1, 1, 1), "measured": False, "error": "ValueError: no"}
    misses = pair("fastbutlate", "vllm", "vllm", e2e=50, ttft=20, goodput=5, att=0.5)
    rec = recommend([bad_quality, broken, misses, LOCAL], "latency")
    assert rec["recommended"] == "base @ transformers"  # meets the SLOs; the faster one does not
    assert {x["pair"]: x["why"] for x in rec["excluded"]} == {
        "w3 @ vllm": "failed the recipe's quality gates (compare.json)", "awq @ llama": "ValueError: no"}
    only_misses = recommend([misses], "latency")
    assert "NO pair meets the SLOs" in only_misses["why"]
    assert recommend([], "latency")["recommended"] is None


def test_deployment_for_each_engine_kind():
    d = deployment_of(FAST)
    assert d["engine"]["kind"] == "vllm" and d["provider"] == {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1",
                                                        "model": "gptq"}
    assert d["command"]["argv"][2] == "vllm.entrypoints.openai.api_server"
    assert deployment_of(LOCAL)["provider"] == {"kind": "local", "model": "/w/base", "device": "cpu"}
    remote = {**pair("x", "sglang", "openai", 1, 1, 1), "base_url": "http://10.0.0.2:30000", "served_model": "m"}
    assert deployment_of(remote)["provider"]["base_url"] == "http://10.0.0.2:30000/v1"


def test_card_states_goal_workload_constraints_failures_and_rollback():
    ctx = {"recipe": "r", "recipe_hash": "abc123", "goal": "latency", "generated_at": "now", "command": "qg engines r",
           "workload": {"requests": 12, "arrival": "concurrency", "concurrency": 2, "warmup_requests": 1,
                        "timeout_s": 120, "seed": 0, "slo": {"ttft_ms": 2000, "tpot_ms": 200},
                        "mix": [{"name": "short", "weight": 0.7, "prompt_tokens": 64, "output_tokens": 16}]},
           "sweep": {"levels": [1, 2, 4], "min_attainment": 0.95},
           "constraints": {"device": "cpu", "cpu_model": "EPYC", "cores": 2, "memory_gb": 23.4, "load_avg": "1.0 → 2.0"},
           "rollback_to": "base"}
    cells = [{"artifact": FAST["artifact"], "engine": "vllm", "engine_kind": "vllm",
              "expected": {"status": "yes", "kernel": "CPU W4A16"},
              "observed": {"tried": True, "loads": True, "kernel": "CPUWNA16LinearKernel"}},
             {"artifact": FAST["artifact"], "engine": "llama", "engine_kind": "llamacpp",
              "expected": {"status": "no", "reason": "llama.cpp reads GGUF files only"},
              "observed": {"tried": True, "loads": False, "reason": "error loading model"}}]
    fm = [{"kind": "queueing", "detail": "TTFT P50 grows 3.0×"}]
    card = build_card(ctx, cells, [FAST, {**BUSY, "failure_modes": fm}, LOCAL])
    assert card["recommendation"]["recommended"] == "gptq @ vllm"
    assert card["rollback"]["pair"] == "base @ vllm" and "quantgate rollback" in card["rollback"]["how"]
    assert recommended_deployment(card)["provider"]["model"] == "gptq"
    md = render_markdown(card)
    for text in ("## Goal", "**latency**", "TTFT ≤ 2,000 ms", "## Workload", "short 0.7: 64→16 tok",
                 "## Constraints", "EPYC, 2 cores", "## Format compatibility", "✓ CPUWNA16LinearKernel",
                 "✗ error loading model", "## Pairs measured", "| gptq @ vllm |", "### Concurrency sweep",
                 "## Recommendation", "Runner-up: **base @ vllm**", '"kind": "openai"', "VLLM_CPU_KVCACHE_SPACE=1 /e/py -m vllm", "## Failure modes seen",
                 "queueing: TTFT P50 grows 3.0×", "## Operations", "rollback path:", "load-test protocol"):
        assert text in md, text


def test_ungated_pairs_rank_after_gated_passes_and_are_named():
    ungated = pair("extra", "vllm", "vllm", e2e=500, ttft=100, goodput=2.0, passed=None)
    rec = recommend([BUSY, ungated], "latency")
    assert rec["recommended"] == "base @ vllm" and rec["runner_up"] == "extra @ vllm"
    assert "extra @ vllm measured better but its quality is not gated" in rec["why"]
    assert recommend([ungated, {**BUSY, "quality": {"passed": None}}], "latency")["recommended"] == "extra @ vllm"


def test_deployments_validate_as_serving_manifest_providers():
    from quantgate.serve.manifest import Deployment

    for p in (FAST, LOCAL):
        d = deployment_of(p)
        assert Deployment(name="x", artifact=d["artifact"], provider=d["provider"]).provider.kind == d["provider"]["kind"]

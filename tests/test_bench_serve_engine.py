"""bench/serve_engine.py's pure parts: rounds → added latency and throughput ratio, and the
manifest it serves the engine with (no engine, no server, no clock)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_engine.py"


@pytest.fixture()
def se(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when it runs as a script: bench/gateway.py by name
    monkeypatch.delitem(sys.modules, "gateway", raising=False)  # and gone again afterwards
    spec = importlib.util.spec_from_file_location("bench_serve_engine", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gateway", None)


def run(target, c, rnd, ttft, e2e, wall, failed=0, tokens=16):
    return {"target": target, "concurrency": c, "round": rnd, "wall_s": wall, "ttft_ms": list(ttft),
            "e2e_ms": list(e2e), "tokens_out": [tokens] * len(e2e), "failed": failed, "errors": []}


def test_added_latency_pools_every_round_and_the_per_round_spread_is_kept(se):
    runs = [run("direct", 1, 0, [10, 20, 30], [100, 110, 120], 1.0), run("gateway", 1, 0, [11, 21, 31], [101, 111, 121], 1.0),
            run("direct", 1, 1, [40, 50, 60], [130, 140, 150], 1.0), run("gateway", 1, 1, [45, 55, 65], [135, 145, 155], 1.0)]
    out = se.summarise(runs, 1, 16)
    lat = out["latency"]
    # pooled P50: direct TTFT (30+40)/2 = 35, gateway (31+45)/2 = 38; E2E 125 vs 128
    assert lat["added_ttft_p50_ms"] == pytest.approx(3.0) and lat["added_e2e_p50_ms"] == pytest.approx(3.0)
    assert lat["added_ttft_p50_ms_per_round"] == pytest.approx([1.0, 5.0])
    assert lat["requests_each"] == 6 and lat["met"] is False  # 3 ms > 2 ms
    assert "throughput" not in out  # no run at 16


def test_throughput_ratio_is_over_summed_wall_time_and_a_failure_fails_the_target(se):
    runs = [run("direct", 16, 0, [1] * 20, [1] * 20, 2.0), run("gateway", 16, 0, [1] * 20, [1] * 20, 2.0),
            run("direct", 16, 1, [1] * 20, [1] * 20, 2.0), run("gateway", 16, 1, [1] * 19, [1] * 19, 2.2)]
    thr = se.summarise(runs, 1, 16)["throughput"]
    assert thr["ratio"] == pytest.approx((39 / 4.2) / (40 / 4.0))
    assert thr["ratio_per_round"] == pytest.approx([1.0, (19 / 2.2) / 10])
    assert thr["met"] is False  # 92.9 % < 95 %
    ok = se.summarise(runs[:2], 1, 16)["throughput"]
    assert ok["ratio"] == pytest.approx(1.0) and ok["met"] is True
    failed = se.summarise([runs[0], run("gateway", 16, 0, [1] * 20, [1] * 20, 2.0, failed=1)], 1, 16)["throughput"]
    assert failed["ratio"] == pytest.approx(1.0) and failed["met"] is False  # a failed request is never "met"


def test_rows_report_what_each_target_served(se):
    rows = se.summarise([run("direct", 1, 0, [10], [100], 0.5, tokens=12), run("gateway", 1, 0, [], [], 0.5, failed=1)],
                        1, 16)["rows"]
    assert rows["direct@1"]["tokens_out_mean"] == 12 and rows["direct@1"]["rps"] == 2.0
    assert rows["gateway@1"]["ok"] == 0 and rows["gateway@1"]["ttft_p50_ms"] is None


def test_the_engine_manifest_is_valid_has_no_fallback_and_a_ladder_out_of_reach(se, tmp_path):
    from quantgate.serve.manifest import load_manifest

    p = tmp_path / "m.json"
    p.write_text(json.dumps(se.engine_manifest("http://127.0.0.1:8000")))
    m = load_manifest(p)
    assert m.active.provider.kind == "openai" and m.active.provider.base_url == "http://127.0.0.1:8000/v1"
    assert m.active.provider.model == se.SERVED
    assert m.serving.fallback is None and m.serving.ladder.enabled
    assert m.serving.ladder.light.p95_ms >= 1e6 and m.serving.api_keys  # every guard on, none tripped by a slow CPU


def test_switch_summary_counts_what_each_side_served_and_the_failures_while_switching(se):
    ev = [{"sent": 0.0, "done": 1.0, "ok": True, "deployment": "blue"},
          {"sent": 10.5, "done": 11.0, "ok": True, "deployment": "blue"},      # after the write, old still serves
          {"sent": 12.0, "done": 12.1, "ok": False, "deployment": None, "error": "HTTP 503: x"},
          {"sent": 13.0, "done": 14.0, "ok": True, "deployment": "green"},
          {"sent": 20.0, "done": 20.5, "ok": False, "deployment": None, "error": "HTTP 502: y"}]  # after it
    out = se.switch_summary(ev, t_write=10.0, t_switched=13.5, old="blue", new="green")
    assert out["switched_s"] == 3.5 and out["first_served_by_new_s"] == 4.0
    assert out["served_by_old"] == 2 and out["served_by_new"] == 1
    assert out["failed"] == 2 and out["failed_during_switch"] == 1
    assert out["errors"] == ["HTTP 502: y", "HTTP 503: x"]
    never = se.switch_summary(ev[:2], t_write=10.0, t_switched=None, old="blue", new="green")
    assert never["first_served_by_new_s"] is None and never["switched_s"] is None and never["failed"] == 0


def test_the_switch_under_load_is_compared_with_the_idle_one(se):
    switches = [{"concurrency": 0, "switched_s": 30.0, "failed": 0}, {"concurrency": 4, "switched_s": 42.0, "failed": 0},
                {"concurrency": 0, "switched_s": 34.0, "failed": 0}, {"concurrency": 4, "switched_s": 40.0, "failed": 1}]
    assert se.switch_ratio(switches) == {"idle_s": 34.0, "loaded_s": 42.0, "loaded_over_idle": 1.24, "failed": 1}
    assert se.switch_ratio(switches[:1])["loaded_over_idle"] is None

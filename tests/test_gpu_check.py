"""The GPU check's travel plan (what fits in which call) and its CPU dry run, as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_travel as t  # noqa: E402

MIB = t.MIB


def test_the_98_mb_gguf_and_the_wheels_need_two_calls_each_under_64_mib():
    wheels = {"whl/torchao.whl": int(3.2 * MIB), "whl/pydantic_core.whl": int(2.2 * MIB), "corpora.tar.gz": 2 * MIB}
    calls = t.plan_calls(int(1.3 * MIB), wheels, {"model.gguf": 98_362_432})
    assert len(calls) == 2
    assert all(c.bytes <= t.LIMIT - t.MARGIN for c in calls)
    parts = [p for c in calls for p in c.pieces if p.part_of]
    assert [p.name for p in parts] == ["model.gguf.part1", "model.gguf.part2"]
    assert parts[0].offset == 0 and parts[1].offset == parts[0].bytes  # consecutive: they concatenate back
    assert sum(p.bytes for p in parts) == 98_362_432
    assert sorted(p.name for c in calls for p in c.pieces if not p.part_of) == sorted(wheels)
    assert [c.carry for c in calls] == [".gpu/call1", ".gpu/call2"]


def test_one_call_when_everything_fits_and_more_when_whole_pieces_leave_gaps():
    assert len(t.plan_calls(MIB, {"a": 10 * MIB}, {"m": 20 * MIB})) == 1
    # three whole pieces of 40 MiB: no two share a call, whatever the total says
    calls = t.plan_calls(MIB, {"a": 40 * MIB, "b": 40 * MIB, "c": 40 * MIB}, {})
    assert len(calls) == 3 and all(len(c.pieces) == 1 for c in calls)


def test_what_cannot_travel_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="big.whl .* does not fit one call"):
        t.plan_calls(MIB, {"big.whl": 70 * MIB}, {})
    with pytest.raises(ValueError, match="working tree alone"):
        t.plan_calls(64 * MIB, {}, {})


def test_the_dry_run_runs_every_item_on_cpu_in_seconds(tmp_path):
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "dry-run", "--out-dir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    assert res["dry_run"] and res["device"] == "cpu"
    assert {k: v["rc"] for k, v in res["items"].items()} == {"decode": 0, "gptq": 0, "smollm2": 0}
    assert res["decode"]["kernel"]["name"] == "int4pack-cpu"
    assert set(res["decode"]["ratios"]["decode_tokens_per_s_w4a16_over_fp16"]) == {"1", "4", "16", "64"}
    assert res["gptq"]["at_128x2048"]["extrapolated"]
    assert "is valid" in " ".join(res["items"]["smollm2"]["tail"])
    assert (tmp_path / "gpu-check.log").stat().st_size > 0

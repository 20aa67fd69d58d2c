"""The quantize stage on a tiny random Llama: artifacts, records, resume, isolation of failures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from quantgate.errors import QuantgateError
from quantgate.pipeline import quantize
from quantgate.workspace import Workspace
from quantgate.quantize.rtn import fake_quantize, unpack_gptq
from quantgate.recipe import load_recipe
from quantgate.util import atomic_dir


def make_recipe(tmp_path, model: Path, corpus: Path, candidates: list[dict]) -> Path:
    r = {
        "name": "tiny",
        "model": {"ref": str(model)},
        "calibration": {"sources": [{"path": str(corpus)}], "n_samples": 4, "seq_len": 32},
        "candidates": candidates,
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


BASE = {"name": "base", "method": "baseline", "dtype": "float32"}
RTN = {"name": "rtn4", "method": "rtn", "bits": 4, "group_size": 32, "sym": True}


def test_baseline_and_rtn_artifacts_with_records_then_resume(tmp_path, tiny_model, corpus_file):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, corpus_file, [BASE, RTN]))
    ws = Workspace(tmp_path / "ws")
    first = quantize(recipe, ws, log=lambda *_: None)
    assert [r.status for r in first] == ["done", "done"]
    rec = first[1].record
    for key in ("method", "params", "backend", "versions", "recipe_hash", "wall_s", "peak_rss_mb", "size_bytes", "checksums"):
        assert key in rec, key
    assert rec["recipe_hash"] == recipe.recipe_hash and rec["params"]["bits"] == 4
    assert "calib_hash" not in rec  # neither candidate needs calibration
    art = Path(first[1].artifact)
    assert json.loads((art / "candidate.json").read_text()) == rec
    assert (art / "model.safetensors").is_file() and not list(art.parent.glob(".tmp-*"))
    assert rec["size_bytes"] < first[0].record["size_bytes"] / 2  # packed 4-bit vs float32

    again = quantize(recipe, ws, log=lambda *_: None)
    assert [r.status for r in again] == ["cached", "cached"]
    assert [r.artifact for r in again] == [r.artifact for r in first]
    report = json.loads((ws.run_dir(recipe) / "quantize.json").read_text())
    assert [r["status"] for r in report["results"]] == ["cached", "cached"]


def test_rtn_checkpoint_holds_exactly_the_rtn_weights(tmp_path, tiny_model, corpus_file):
    from safetensors.torch import load_file

    recipe = load_recipe(make_recipe(tmp_path, tiny_model, corpus_file, [RTN]))
    [res] = quantize(recipe, Workspace(tmp_path / "ws"), log=lambda *_: None)
    packed = load_file(Path(res.artifact) / "model.safetensors")
    orig = load_file(tiny_model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    q, zero = unpack_gptq({k: packed[f"{name}.{k}"] for k in ("qweight", "qzeros")}, 4, v2=False)
    scales = packed[f"{name}.scales"].float().t()  # [out, groups]
    deq = ((q.float().reshape(q.shape[0], -1, 32) - zero[..., None]) * scales[..., None]).reshape(q.shape)
    expect = fake_quantize(orig[f"{name}.weight"], 4, 32, True)
    assert torch.allclose(deq, expect, atol=2e-3)  # scales stored in fp16
    cfg = json.loads((Path(res.artifact) / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["desc_act"]) == ("gptq", 4, 32, False)
    assert f"{name}.weight" not in packed and "model.embed_tokens.weight" in packed


def test_one_failing_candidate_does_not_lose_the_others(tmp_path, tiny_model, corpus_file):
    # injected fault: llm-compressor's AWQ cannot run without CUDA (or the extra is missing)
    broken = {"name": "awq-no-cuda", "method": "awq", "bits": 4, "group_size": 32, "backend": "llmcompressor"}
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, corpus_file, [BASE, broken, RTN]))
    res = quantize(recipe, Workspace(tmp_path / "ws"), device="cpu", log=lambda *_: None)
    assert [r.status for r in res] == ["done", "failed", "done"]
    assert "needs a CUDA device" in res[1].error or "pip install 'quantgate[llmcompressor]'" in res[1].error
    assert not list((tmp_path / "ws" / "artifacts").glob("awq-*"))  # nothing half-written


def test_llmcompressor_gptq_writes_compressed_tensors_that_load(tmp_path, tiny_model, corpus_file):
    pytest.importorskip("llmcompressor", reason="the llmcompressor extra is not installed")
    from transformers import AutoModelForCausalLM

    spec = {"name": "lc-gptq", "method": "gptq", "bits": 4, "group_size": 32, "backend": "llmcompressor"}
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, corpus_file, [spec]))
    [res] = quantize(recipe, Workspace(tmp_path / "ws"), device="cpu", log=lambda *_: None)
    assert res.status == "done", res.error
    assert res.record["format"] == "compressed-tensors" and res.record["versions"]["llmcompressor"]
    cfg = json.loads((Path(res.artifact) / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(res.artifact)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_bad_group_size_refused_before_any_work(tmp_path, tiny_model, corpus_file):
    bad = {**RTN, "group_size": 128}  # the tiny model's hidden size is 64
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, corpus_file, [BASE, bad]))
    with pytest.raises(QuantgateError, match=r"candidates.rtn4.group_size: 128 does not divide .* sizes that work: 16, 32, 64"):
        quantize(recipe, Workspace(tmp_path / "ws"), log=lambda *_: None)
    assert not (tmp_path / "ws" / "artifacts").exists()


def test_interrupted_artifact_leaves_nothing_under_its_name(tmp_path):
    target = tmp_path / "artifacts" / "rtn-abc"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists() and not list(target.parent.iterdir())


def test_cli_validate_refuses_bad_group_size_with_exit_code(tmp_path, tiny_model, corpus_file):
    p = make_recipe(tmp_path, tiny_model, corpus_file, [{**RTN, "group_size": 128}])
    proc = subprocess.run([sys.executable, "-m", "quantgate", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "group_size: 128 does not divide" in proc.stderr and "Traceback" not in proc.stderr
    ok = make_recipe(tmp_path, tiny_model, corpus_file, [RTN])
    proc = subprocess.run([sys.executable, "-m", "quantgate", "validate", str(ok)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rtn4" in proc.stdout


def test_cli_quantize_only_unknown_candidate_suggests(tmp_path, tiny_model, corpus_file):
    p = make_recipe(tmp_path, tiny_model, corpus_file, [BASE, RTN])
    proc = subprocess.run([sys.executable, "-m", "quantgate", "quantize", str(p), "--only", "rtn5",
                           "-w", str(tmp_path / "ws")], capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'rtn4'" in proc.stderr

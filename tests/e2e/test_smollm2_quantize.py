"""End to end on the real SmolLM2-135M: the shipped CPU recipe's candidates exist, load and generate.

Slow (minutes on 2 cores); marked e2e and still run in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantgate.pipeline import quantize

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]


def test_every_candidate_is_made_with_its_record(smollm2_run):
    recipe, results = smollm2_run["recipe"], smollm2_run["quantized"]
    assert set(results) == {c.name for c in recipe.candidates}
    for name, r in results.items():
        assert r["status"] in ("done", "cached"), (name, r["error"])
        rec = json.loads((Path(r["artifact"]) / "candidate.json").read_text())
        assert rec["recipe_hash"] == recipe.recipe_hash and rec["size_bytes"] > 0 and rec["checksums"]
    gptq = results["gptq-w4g64"]["record"]
    assert gptq["calib_hash"] and gptq["calibration"]["n_samples"] == recipe.calibration.n_samples
    assert gptq["versions"]["gptqmodel"] and gptq["format"] == "gptq"
    assert results["awq-w4g64"]["record"]["format"] == "awq-gemm"
    assert results["gptq-w4g64"]["record"]["size_bytes"] < results["baseline-fp32"]["record"]["size_bytes"] / 3


def test_checkpoint_files_are_true_for_every_reader(smollm2_run):
    from transformers import AutoTokenizer

    results = smollm2_run["quantized"]
    for name in ("gptq-w4g64", "awq-w4g64"):
        assert results[name]["record"]["quantized_modules"] == 30 * 7, name  # every decoder linear
    for name, r in results.items():
        cfg = json.loads((Path(r["artifact"]) / "config.json").read_text())
        # transformers 4.57 reads the top-level key, 5.x rope_parameters: both say 100000
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0, name
        assert "offload_to_disk_path" not in json.dumps(cfg), name
        tok = AutoTokenizer.from_pretrained(r["artifact"])
        gen = json.loads((Path(r["artifact"]) / "generation_config.json").read_text())
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"] == gen["eos_token_id"] == 2


def test_quantized_checkpoints_load_with_transformers_and_answer(smollm2_run):
    """Both packed formats load and generate; the recommended one gets the fact right (how often the
    others do is the regression gate's business: GPTQ's 4-bit answer here is 'L'Étoil de Jeanne…')."""
    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import load_model

    recommended = smollm2_run["compare"]["recommended"]
    for name in ("gptq-w4g64", "awq-w4g64"):
        folder = smollm2_run["quantized"][name]["artifact"]
        tok = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.strip(), name
        if name == recommended:
            assert "Paris" in text, (name, text)


def test_resume_reuses_every_artifact(smollm2_run):
    again = quantize(smollm2_run["recipe"], smollm2_run["ws"], device="cpu", log=lambda *_: None)
    assert all(r.status == "cached" for r in again)
    assert {r.name: r.artifact for r in again} == {n: r["artifact"] for n, r in smollm2_run["quantized"].items()}

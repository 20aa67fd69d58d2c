"""End to end on the real SmolLM2-135M: the shipped CPU recipe's candidates load, generate and rank.

Slow (the quantize stage takes minutes on 2 cores); marked e2e and still run in CI. Set
QUANTGATE_TEST_WORKSPACE to a folder to keep the artifacts between runs (the runner resumes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantgate.pipeline import Workspace, quantize
from quantgate.recipe import load_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    recipe = load_recipe(REPO / "recipes" / "smollm2-cpu.yaml")
    root = os.environ.get("QUANTGATE_TEST_WORKSPACE")
    ws = Workspace(Path(root) if root else tmp_path_factory.mktemp("ws"))
    results = quantize(recipe, ws, device="cpu")
    return recipe, {r.name: r for r in results}


@pytest.fixture(scope="session")
def eval_windows(smollm2_run):
    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import perplexity_windows

    recipe, results = smollm2_run
    tok = AutoTokenizer.from_pretrained(results[recipe.baseline.name].artifact)
    return perplexity_windows(tok, recipe.evaluation.perplexity)


@pytest.fixture(scope="session")
def perplexities(smollm2_run, eval_windows):
    from quantgate.evaluate.quality import load_model, perplexity

    recipe, results = smollm2_run
    out = {}
    for name in ("baseline-fp32", "rtn-w4g64", "gptq-w4g64", "awq-w4g64"):
        model = load_model(results[name].artifact)
        out[name] = perplexity(model, eval_windows, batch_size=4).perplexity
        del model
    print("\nperplexity on held-out Britannica prose:", json.dumps(out, indent=1))
    return out


def test_every_candidate_is_made_with_its_record(smollm2_run):
    recipe, results = smollm2_run
    assert set(results) == {c.name for c in recipe.candidates}
    for name, r in results.items():
        assert r.status in ("done", "cached"), (name, r.error)
        rec = json.loads((Path(r.artifact) / "candidate.json").read_text())
        assert rec["recipe_hash"] == recipe.recipe_hash
        assert rec["size_bytes"] > 0 and rec["checksums"]
    gptq = results["gptq-w4g64"].record
    assert gptq["calib_hash"] and gptq["calibration"]["n_samples"] == recipe.calibration.n_samples
    assert gptq["versions"]["gptqmodel"] and gptq["format"] == "gptq"
    assert results["awq-w4g64"].record["format"] == "awq-gemm"
    # 4-bit weights are several times smaller than float32 ones
    assert results["gptq-w4g64"].record["size_bytes"] < results["baseline-fp32"].record["size_bytes"] / 3


def test_quantized_checkpoints_generate_sensible_text(smollm2_run):
    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import load_model

    _, results = smollm2_run
    for name in ("gptq-w4g64", "awq-w4g64"):
        folder = results[name].artifact
        tok = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in text, (name, text)


def test_gptq_and_awq_beat_rtn_on_held_out_perplexity(perplexities):
    p = perplexities
    assert p["baseline-fp32"] < p["rtn-w4g64"]
    assert p["gptq-w4g64"] < p["rtn-w4g64"]
    assert p["awq-w4g64"] < p["rtn-w4g64"]


def test_resume_reuses_every_artifact(smollm2_run, tmp_path):
    recipe, results = smollm2_run
    ws = Workspace(Path(results["rtn-w4g64"].artifact).parents[1])
    again = quantize(recipe, ws, device="cpu", log=lambda *_: None)
    assert all(r.status == "cached" for r in again)
    assert {r.name: r.artifact for r in again} == {n: r.artifact for n, r in results.items()}

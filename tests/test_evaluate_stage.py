"""The evaluation stage on a tiny model: every candidate measured the same way, then compared."""

import json

import yaml

from quantgate.pipeline import compare_run, evaluate, load_records
from quantgate.recipe import load_recipe
from quantgate.workspace import Workspace


def test_evaluate_and_compare_tiny_recipe(tmp_path, tiny_model, corpus_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i} and the fox."}) + "\n" for i in range(4)))
    regression = tmp_path / "reg.jsonl"
    regression.write_text(json.dumps({"id": "long-enough", "prompt": "Say something.",
                                      "checks": [{"type": "min_len", "value": 1}]}) + "\n")
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "tiny-eval",
        "model": {"ref": str(tiny_model)},
        "candidates": [{"name": "base", "method": "baseline", "dtype": "float32"},
                       {"name": "rtn4", "method": "rtn", "bits": 4, "group_size": 32}],
        "evaluation": {
            "perplexity": {"path": str(corpus_file), "seq_len": 32, "max_windows": 4, "batch_size": 2},
            "regression": {"path": str(regression), "max_tokens": 4},
            "offline": {"prompt_tokens": 16, "output_tokens": 4, "repeats": 1},
            "workload": {"requests": 3, "concurrency": 2, "prompts_file": str(prompts), "warmup_requests": 0,
                         "mix": [{"name": "short", "prompt_tokens": 8, "output_tokens": 4}]},
            "cost": {"usd_per_hour": 1.0},
        },
        "card": {"gates": [{"metric": "perplexity", "min_recovery": 0.5}, {"metric": "error_rate", "max": 0}]},
    }))
    recipe = load_recipe(recipe_file)
    ws = Workspace(tmp_path / "ws")
    records = evaluate(recipe, ws, log=lambda *_: None)
    assert [r.get("error") for r in records] == [None, None]
    base, rtn = records
    # identical perplexity windows for every candidate
    assert base["quality"]["perplexity"]["protocol"] == rtn["quality"]["perplexity"]["protocol"]
    assert base["quality"]["perplexity"]["tokens_scored"] == 4 * 31
    for r in records:
        m = r["metrics"]
        for key in ("perplexity", "regression_pass_rate", "prefill_ms", "ttft_p50_ms", "e2e_p95_ms",
                    "tpot_p50_ms", "output_tok_s", "weights_mb", "peak_rss_mb", "usd_per_1m_output_tokens"):
            assert m.get(key) is not None and m[key] == m[key], (r["name"], key)
        assert m["error_rate"] == 0 and len(r["speed"]["load"]["records"]) == 3
    assert rtn["metrics"]["weights_mb"] < base["metrics"]["weights_mb"]
    # a second evaluate reuses the stored results
    again = evaluate(recipe, ws, log=lambda *_: None)
    assert [r["eval_key"] for r in again] == [r["eval_key"] for r in records]
    comp = compare_run(recipe, ws, load_records(recipe, ws))
    assert comp.baseline == "base" and comp.recommended in ("base", "rtn4")
    md = (ws.run_dir(recipe) / "compare.md").read_text()
    assert "| rtn4 |" in md or "**rtn4**" in md

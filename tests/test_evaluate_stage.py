"""The evaluation stage on a tiny model: every candidate measured the same way, then compared."""

from quantgate.pipeline import compare_run, evaluate, load_records
from quantgate.recipe import load_recipe
from quantgate.workspace import Workspace

from .conftest import write_tiny_recipe


def test_evaluate_and_compare_tiny_recipe(tmp_path, tiny_model, corpus_file):
    recipe_file = write_tiny_recipe(tmp_path, tiny_model, corpus_file, name="tiny-eval", requests=3, concurrency=2,
                                    prompt="Tell me about item {i} and the fox.", prompts=4,
                                    regression_id="long-enough")
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
    # one dtype for all: the baseline's float32, though the RTN checkpoint's config says float16
    assert [r["dtype"] for r in records] == ["float32", "float32"]
    assert base["kernels"] == {} and rtn["kernels"] == {"TorchLinear": 2 * 7}  # float32 on CPU: the exact kernel
    # a second evaluate reuses the stored results
    again = evaluate(recipe, ws, log=lambda *_: None)
    assert [r["eval_key"] for r in again] == [r["eval_key"] for r in records]
    comp = compare_run(recipe, ws, load_records(recipe, ws))
    assert comp.baseline == "base" and comp.recommended in ("base", "rtn4")
    md = (ws.run_dir(recipe) / "compare.md").read_text()
    assert "| rtn4 |" in md or "**rtn4**" in md
    assert "every candidate scored in float32" in md

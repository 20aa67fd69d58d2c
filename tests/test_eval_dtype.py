"""One declared evaluation dtype: how it is resolved, what it keys, how the comparison shows it."""

import textwrap

import pytest

from quantgate.errors import RecipeError
from quantgate.evaluate.compare import compare
from quantgate.evaluate.report import scored_in
from quantgate.pipeline import eval_key
from quantgate.recipe import load_recipe


def _recipe(tmp_path, evaluation="", baseline="{name: base, method: baseline, dtype: float32}", model_dtype="auto"):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: dt
        model: {{ref: bundled:smollm2-135m-instruct, dtype: {model_dtype}}}
        candidates:
          {"- " + baseline if baseline else ""}
          - {{name: r4, method: rtn, bits: 4, group_size: 64}}
        """) + evaluation)
    return load_recipe(p)


def test_the_default_is_the_baselines_dtype_then_the_models_then_float32(tmp_path):
    assert _recipe(tmp_path).evaluation_dtype == "float32"
    assert _recipe(tmp_path, baseline="{name: base, method: baseline}").evaluation_dtype == "float16"
    assert _recipe(tmp_path, baseline="", model_dtype="bfloat16").evaluation_dtype == "bfloat16"
    assert _recipe(tmp_path, baseline="").evaluation_dtype == "float32"
    declared = _recipe(tmp_path, evaluation="evaluation: {dtype: bfloat16}\n")
    assert declared.evaluation_dtype == "bfloat16"


def test_an_unset_dtype_keeps_the_recipe_hash_and_a_set_one_moves_it(tmp_path):
    unset = _recipe(tmp_path)
    assert "dtype" not in unset.model_dump(mode="json")["evaluation"]
    same = _recipe(tmp_path, evaluation="evaluation: {perplexity: {}}\n")
    assert same.recipe_hash == unset.recipe_hash
    assert _recipe(tmp_path, evaluation="evaluation: {dtype: float32}\n").recipe_hash != unset.recipe_hash


def test_the_evaluation_key_follows_the_resolved_dtype(tmp_path):
    a = _recipe(tmp_path)
    b = _recipe(tmp_path, baseline="{name: base, method: baseline, dtype: bfloat16}")
    c = _recipe(tmp_path, baseline="{name: base, method: baseline, dtype: bfloat16}",
                evaluation="evaluation: {dtype: float32}\n")
    art = {"candidate_key": "k"}
    keys = [eval_key(r, r.candidate("r4"), art) for r in (a, b, c)]
    assert keys[0] != keys[1] and keys[1] != keys[2]


def test_an_unknown_dtype_is_refused_with_the_field_named(tmp_path):
    with pytest.raises(RecipeError, match="evaluation.dtype"):
        _recipe(tmp_path, evaluation="evaluation: {dtype: fp8}\n")


def _rows(*dtypes):
    return [{"name": n, "method": "x", "metrics": {"perplexity": 10.0 + i}, "dtype": d}
            for i, (n, d) in enumerate(zip(("base", "r4"), dtypes))]


def test_the_comparison_says_what_every_candidate_was_scored_in():
    assert scored_in(compare(_rows("bfloat16", "bfloat16"), "base", [])) == "; every candidate scored in bfloat16"
    mixed = scored_in(compare(_rows("float32", "float16"), "base", []))  # records from before the field
    assert "NOT on equal terms" in mixed and "r4 float16" in mixed
    assert scored_in(compare(_rows(None, None), "base", [])) == ""



def test_float32_on_cpu_picks_the_gptq_kernel_that_computes_in_float32():
    from quantgate.kernels import kernel_backend

    assert kernel_backend("gptq", "float32", "cpu") == "torch"
    assert kernel_backend("gptq", "bfloat16", "cpu") is None  # the automatic int4 kernel computes in bf16
    assert kernel_backend("gptq", "float32", "cuda") is None
    assert kernel_backend("awq", "float32", "cpu") is None  # its float32 kernel is ~12x slower: left automatic
    assert kernel_backend(None, "float32", "cpu") is None  # a dense checkpoint

"""Refused at `quantgate validate`, not an hour into the run (issue 10, "refused too late"): unknown
bundled corpora, missing calibration/regression files, gates on metrics nothing measures, duplicate
keys; and `manifest validate` on a manifest whose artifact folder is gone. Each as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from quantgate.errors import QuantgateError
from quantgate.recipe import load_recipe
from quantgate.validate import calibration_problems, data_problems, gate_problems

BASE = """\
name: early
calibration:
  sources:
    - corpus: gutenberg
  n_samples: 8
candidates:
  - {name: base, method: baseline}
  - {name: rtn4, method: rtn, bits: 4, group_size: 64}
evaluation:
  perplexity: {}
card:
  gates:
    - {metric: perplexity, min_recovery: 0.9}
"""


def recipe(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_the_base_recipe_has_no_early_problems(tmp_path):
    r = load_recipe(recipe(tmp_path, BASE))
    assert gate_problems(r) == [] and data_problems(r) == []


def test_an_unknown_corpus_is_named_with_a_suggestion(tmp_path):
    r = load_recipe(recipe(tmp_path, BASE.replace("corpus: gutenberg", "corpus: gutenburg")))
    [(loc, msg)] = data_problems(r)
    assert loc == ("calibration", "sources", 0, "corpus") and "did you mean 'gutenberg'" in msg


def test_missing_calibration_and_regression_files(tmp_path):
    text = BASE.replace("corpus: gutenberg", f"path: {tmp_path}/nope.jsonl").replace(
        "  perplexity: {}", f"  perplexity: {{}}\n  regression: {{path: {tmp_path}/cases.jsonl}}")
    msgs = [m for _, m in data_problems(load_recipe(recipe(tmp_path, text)))]
    assert any("calibration.sources.0.path" in m for m in msgs)
    assert any("evaluation.regression.path" in m for m in msgs)


def test_a_gate_on_a_metric_nothing_measures_suggests_the_near_name(tmp_path):
    r = load_recipe(recipe(tmp_path, BASE.replace("metric: perplexity", "metric: perplexty")))
    [(loc, msg)] = gate_problems(r)
    assert loc == ("card", "gates", 0, "metric") and "did you mean 'perplexity'" in msg


def test_the_cli_reports_file_and_line(tmp_path):
    p = recipe(tmp_path, BASE.replace("metric: perplexity", "metric: perplexty"))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code != 0
    assert f"{p}:13: card.gates.0.metric: 'perplexty'" in str(res.exception)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    p = recipe(tmp_path, BASE.replace("  n_samples: 8\n", "  n_samples: 8\n  n_samples: 64\n"))
    with pytest.raises(QuantgateError, match=r"r.yaml:6: calibration.n_samples: .*line 5"):
        load_recipe(p)


def test_manifest_validate_checks_the_artifact_folder(tmp_path):
    m = {"schema_version": 2, "active": {"name": "a", "artifact": str(tmp_path / "gone"),
                                         "provider": {"kind": "local"}}}
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(m))
    res = CliRunner().invoke(app, ["manifest", "validate", str(p)])
    assert res.exit_code != 0 and "gone does not exist" in str(res.exception)


def test_a_candidate_asking_for_more_windows_than_the_calibration_set_is_refused(tmp_path):
    text = BASE.replace("  - {name: rtn4, method: rtn, bits: 4, group_size: 64}",
                        "  - {name: gptq4, method: gptq, bits: 4, group_size: 64, n_samples: 9}")
    [(loc, msg)] = [p for p in calibration_problems(load_recipe(recipe(tmp_path, text))) if p[0][0] == "candidates"]
    assert loc == ("candidates", 1, "n_samples") and "9 is more than the 8 windows" in msg


def test_calibration_text_too_short_for_its_windows_is_refused_before_any_tokenizer(tmp_path):
    small = tmp_path / "small.jsonl"  # a few documents, some in the calib split, some held out
    small.write_text("".join(json.dumps({"text": f"Document {i}: a few words, far too few for eight windows "
                                                 "of 2048 tokens."}) + "\n" for i in range(12)))
    text = BASE.replace("corpus: gutenberg", f"path: {small}").replace("  n_samples: 8", "  n_samples: 8\n  seq_len: 2048")
    problems = calibration_problems(load_recipe(recipe(tmp_path, text)))
    assert [loc for loc, _ in problems] == [("calibration", "sources", 0)]
    assert "room for at most 0 windows of 2048 tokens" in problems[0][1] and "lower n_samples or seq_len" in problems[0][1]
    # the same file with windows it can hold passes
    enough = BASE.replace("corpus: gutenberg", f"path: {small}").replace("  n_samples: 8", "  n_samples: 1\n  seq_len: 16")
    assert calibration_problems(load_recipe(recipe(tmp_path, enough))) == []

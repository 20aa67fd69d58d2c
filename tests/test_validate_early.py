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
from quantgate.validate import data_problems, gate_problems

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

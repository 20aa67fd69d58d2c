"""The manifest schema: the example loads, writes are atomic round trips, errors name file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gwkit import base_manifest, mock, write

from quantgate.serve.manifest import (Deployment, HistoryEvent, Manifest, ManifestError, load_manifest,
                                      write_manifest)

REPO = Path(__file__).resolve().parents[2]


def test_example_manifest_loads_and_uses_mock_for_both():
    m = load_manifest(REPO / "examples" / "manifest.mock.json")
    assert m.schema_version == 1
    assert m.active.provider.kind == "mock" and m.serving.fallback.provider.kind == "mock"
    # the fallback is the faster, cheaper one
    assert m.serving.fallback.provider.delay_ms < m.active.provider.delay_ms
    assert m.serving.fallback.price.output_per_1m < m.active.price.output_per_1m
    assert m.serving.budgets.global_.usd == 50


def test_write_then_load_round_trips_and_leaves_no_temp_files(tmp_path):
    m = Manifest.model_validate(base_manifest(budgets={"global": {"usd": 1.5}}))
    m = m.model_copy(update={"history": [HistoryEvent(what="promote", why="gates passed", by="ci",
                                                      deployment="primary@1")]})
    p = tmp_path / "m.json"
    write_manifest(p, m)
    assert load_manifest(p) == m
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]
    assert '"global"' in p.read_text()  # written under the name people write, not the Python one


def _error(tmp_path, obj) -> str:
    p = write(tmp_path / "manifest.json", obj)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    return str(e.value)


def test_unknown_field_names_file_and_field(tmp_path):
    m = base_manifest(cache={"ttl": 5})
    msg = _error(tmp_path, m)
    assert f"{tmp_path / 'manifest.json'}:1: serving.cache.ttl: unknown field 'ttl'; did you mean 'ttl_s'?" in msg


def test_provider_errors_name_the_provider_field(tmp_path):
    m = base_manifest()
    m["active"]["provider"] = {"kind": "vllm"}
    assert "active.provider: unknown kind 'vllm'; kinds: mock, openai, local, command" in _error(tmp_path, m)
    m["active"]["provider"] = {"kind": "mock", "error_rate": 2}
    assert "active.provider.error_rate: Input should be less than or equal to 1" in _error(tmp_path, m)
    m["active"]["provider"] = {"kind": "command", "argv": ["gemini"]}
    assert "'{prompt}'" in _error(tmp_path, m)
    m["active"]["provider"] = {"kind": "openai", "base_url": "localhost:8000", "model": "x"}
    assert "active.provider.base_url" in _error(tmp_path, m)
    m["active"]["provider"] = {"kind": "local"}
    assert "'local' deployment needs 'artifact'" in _error(tmp_path, m)


def test_semantic_errors(tmp_path):
    m = base_manifest(default_budget_ms=5000, max_budget_ms=1000)
    assert "default_budget_ms=5000 exceeds max_budget_ms=1000" in _error(tmp_path, m)
    m = base_manifest(ladder={"light": {"p95_ms": 900}, "moderate": {"p95_ms": 500}})
    assert "moderate.p95_ms=500.0 is below light.p95_ms=900.0" in _error(tmp_path, m)
    m = base_manifest(fallback=mock("primary"))
    assert "serving.fallback is the active deployment itself" in _error(tmp_path, m)
    m = base_manifest(budgets={"tenants": {"acme": {"period_s": 60}}})
    assert "serving.budgets.tenants.acme: give 'tokens', 'usd' or both" in _error(tmp_path, m)
    m = base_manifest(api_keys={"acme": [{"sha256": "a" * 64, "env": "X"}]})
    assert "serving.api_keys.acme.0" in _error(tmp_path, m)


def test_unreadable_files(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{"active": {"name": "x",}')
    with pytest.raises(ManifestError, match=r"manifest.json:1:\d+: not valid JSON"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="no such manifest file"):
        load_manifest(tmp_path / "missing.json")
    p.write_text(json.dumps({**base_manifest(), "schema_version": 2}))
    with pytest.raises(ManifestError, match="schema_version: 2 is not supported"):
        load_manifest(p)


def test_yaml_manifest_and_deployment_key(tmp_path):
    p = tmp_path / "manifest.yaml"
    p.write_text("active:\n  name: m\n  model_version: '3'\n  sha256: " + "ab" * 32 + "\n")
    m = load_manifest(p)
    assert m.active.provider.kind == "mock"
    assert m.active.key == "m@3#" + "ab" * 6
    assert Deployment(name="m").key == "m@1"
    # promote/rollback edit deployments with model_copy: the key must follow
    assert Deployment(name="m").model_copy(update={"model_version": "2"}).key == "m@2"

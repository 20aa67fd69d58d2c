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
    assert m.schema_version == 2
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
    p.write_text(json.dumps({**base_manifest(), "schema_version": 3}))
    with pytest.raises(ManifestError, match="schema_version: 3 is not supported"):
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


# ------------------------------------------------------------------ engines and migration
VLLM = {"kind": "vllm", "argv": ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"],
        "max_model_len": 2048, "quantization": None, "port": 8000}


def test_engine_deployment_round_trips_and_caps_the_prompt(tmp_path):
    m = base_manifest()
    m["active"] = {"name": "gptq4", "artifact": str(tmp_path), "max_tokens": 256, "engine": VLLM,
                   "provider": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "gptq4"}}
    p = write(tmp_path / "manifest.json", m)
    got = load_manifest(p)
    assert got.active.engine.kind == "vllm" and got.active.max_input_tokens == 2048 - 256
    write_manifest(p, got)
    assert load_manifest(p) == got
    assert Deployment(name="x").max_input_tokens is None  # a mock: no engine, no engine cap


def test_engine_errors_name_the_field(tmp_path):
    m = base_manifest()
    m["active"]["engine"] = VLLM  # a mock provider cannot reach a vLLM server
    assert "engine 'vllm' is served through a 'openai' provider, not 'mock'" in _error(tmp_path, m)
    m["active"]["engine"] = {"kind": "vllm"}
    m["active"]["provider"] = {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    m["active"]["artifact"] = "/w/m"
    assert "active: a 'vllm' engine is started by the gateway: give engine.python" in _error(tmp_path, m)
    m["active"]["engine"] = {"kind": "sglang"}
    assert "active.engine.kind" in _error(tmp_path, m)
    m["active"]["engine"] = {"kind": "openai-url", "env": {"BAD NAME": "1"}}
    assert "not environment variable names: 'BAD NAME'" in _error(tmp_path, m)


def _v1(tmp_path) -> dict:
    return {"schema_version": 1,
            "active": {"name": "gptq4", "artifact": str(tmp_path), "provider": {"kind": "local", "dtype": "float32"}},
            "previous": [{"name": "remote", "provider": {"kind": "openai", "base_url": "http://10.0.0.5:8000/v1",
                                                         "model": "m"}}],
            "serving": {"fallback": {"name": "fb", "provider": {"kind": "mock"}}},
            "history": [{"what": "promote", "when": "2026-11-01T00:00:00Z", "why": "gates", "by": "ana",
                         "deployment": "gptq4@1"}]}


def test_old_manifest_is_refused_with_the_migrate_command(tmp_path):
    p = write(tmp_path / "manifest.json", _v1(tmp_path))
    msg = _error(tmp_path, _v1(tmp_path))
    assert "schema_version: 1 is an older manifest format" in msg and f"quantgate manifest migrate {p}" in msg


def test_migrate_rewrites_atomically_and_keeps_history(tmp_path):
    from datetime import datetime, timezone

    from quantgate.serve.manifest import migrate_manifest

    p = write(tmp_path / "manifest.json", _v1(tmp_path))
    m, steps = migrate_manifest(p, now=datetime(2026, 11, 30, tzinfo=timezone.utc), by="ops")
    assert len(steps) == 1 and "schema 1 → 2" in steps[0]
    again = load_manifest(p)
    assert again == m and again.schema_version == 2
    assert again.active.engine.kind == "transformers" and again.active.engine.dtype == "float32"
    assert again.previous[0].engine.kind == "openai" and again.serving.fallback.engine is None
    assert [e.what for e in again.history] == ["promote", "migrate"] and again.history[0].by == "ana"
    assert sorted(x.name for x in tmp_path.iterdir() if x.is_file()) == ["manifest.json"]
    # a current manifest is left as it is
    before = p.read_bytes()
    _, steps = migrate_manifest(p, now=datetime(2026, 12, 1, tzinfo=timezone.utc), by="ops")
    assert steps == [] and p.read_bytes() == before


def test_migrate_of_a_broken_old_manifest_names_the_field_and_writes_nothing(tmp_path):
    from datetime import datetime, timezone

    from quantgate.serve.manifest import migrate_manifest

    bad = _v1(tmp_path)
    bad["active"]["provider"]["dtype"] = "int3"
    p = write(tmp_path / "manifest.json", bad)
    before = p.read_bytes()
    with pytest.raises(ManifestError, match="active.provider.dtype"):
        migrate_manifest(p, now=datetime(2026, 11, 30, tzinfo=timezone.utc), by="ops")
    assert p.read_bytes() == before

"""`quantgate promote --canary`, `quantgate canary status|advance|abort` and `manifest validate` on a canary."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from quantgate import deploy
from quantgate.cli import app
from quantgate.serve import canary as cn
from quantgate.serve.manifest import Deployment, Manifest, load_manifest, write_manifest

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
run = CliRunner().invoke


def dep(name: str) -> Deployment:
    return Deployment(name=name, provider={"kind": "mock"})


@pytest.fixture()
def path(tmp_path):
    p = tmp_path / "manifest.json"
    write_manifest(p, cn.start(Manifest(active=dep("old")), dep("new"), [5, 50, 100], now=T0, by="me"))
    return p


def test_status_advance_and_abort_move_the_block(path):
    r = run(app, ["canary", "status", str(path)])
    assert r.exit_code == 0, r.output
    assert "canary new@1 (running) beside stable old@1: 5% at step 1 of 3" in r.output
    r = run(app, ["canary", "advance", str(path), "--reason", "looks fine", "--by", "ops"])
    assert r.exit_code == 0 and "at 50%" in r.output, r.output
    m = load_manifest(path)
    assert m.canary.step == 1 and m.canary.history[-1].by == "ops" and "looks fine" in m.canary.history[-1].why
    r = run(app, ["manifest", "validate", str(path)])
    assert r.exit_code == 0 and "canary new@1 at 50% (step 2 of 3)" in r.output, r.output
    r = run(app, ["canary", "abort", str(path), "--reason", "p95 up"])
    assert r.exit_code == 0, r.output
    m = load_manifest(path)
    assert m.active.name == "old" and m.canary.state == "rolled_back" and m.history[-1].what == "canary rollback"
    r = run(app, ["canary", "abort", str(path)])
    assert r.exit_code != 0  # nothing runs any more


def test_advance_past_the_last_step_promotes(path):
    for _ in range(2):
        assert run(app, ["canary", "advance", str(path)]).exit_code == 0
    r = run(app, ["canary", "advance", str(path)])
    assert r.exit_code == 0 and "new@1 promoted; active = new@1" in r.output, r.output
    m = load_manifest(path)
    assert m.active.name == "new" and m.previous[0].name == "old"
    assert json.loads(run(app, ["canary", "status", str(path), "--json"]).output)["state"] == "promoted"


def test_validate_checks_the_challengers_artifact(path, tmp_path):
    m = load_manifest(path)
    gone = Deployment(name="new", artifact=str(tmp_path / "gone"), provider={"kind": "local"})
    write_manifest(path, m.model_copy(update={"canary": m.canary.model_copy(update={"challenger": gone})}))
    r = run(app, ["manifest", "validate", str(path)])
    assert r.exit_code != 0 and "canary.challenger: artifact folder" in str(r.exception)


def test_canary_candidate_carries_the_regression_set_as_probes(path, tmp_path, monkeypatch):
    cases = tmp_path / "reg.jsonl"
    cases.write_text(json.dumps({"id": "c", "prompt": "capital of France?",
                                 "checks": [{"type": "contains", "value": "Paris"}]}) + "\n")
    recipe = SimpleNamespace(evaluation=SimpleNamespace(regression=SimpleNamespace(path=str(cases), max_tokens=16)))
    monkeypatch.setattr(deploy, "open_run", lambda run_dir: (recipe, None, None))
    monkeypatch.setattr(deploy, "candidate_deployment",
                        lambda run_dir, name, **kw: (dep(name), [], {"run": str(run_dir)}, None))
    run(app, ["canary", "abort", str(path)])
    m = deploy.canary_candidate(tmp_path, "cand", path, [10, 100], by="me", min_requests=50, probe_every_s=2)
    c = m.canary
    assert c.running and c.challenger.name == "cand" and c.weight == 10 and c.min_requests == 50
    assert [x.id for x in c.probes.cases] == ["c"] and c.probes.every_s == 2 and c.probes.max_tokens == 16
    assert m.active.name == "old"  # the stable stays active (and the rollback target)


def test_promote_refuses_a_bad_schedule_before_reading_anything(tmp_path):
    r = run(app, ["promote", str(tmp_path), "-c", "x", "--canary", "5,x"])
    assert r.exit_code != 0 and "give weights in percent" in str(r.exception)


def test_the_shipped_canary_example_validates():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "manifest.canary.json"
    r = run(app, ["manifest", "validate", str(example)])
    assert r.exit_code == 0 and "canary smollm2-rtn-w4@2 at 10% (step 1 of 3)" in r.output, r.output

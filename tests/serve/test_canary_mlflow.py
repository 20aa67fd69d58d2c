"""A canary's steps, live figures and outcome on the challenger's MLflow run (serve/canary_mlflow.py), with the
registry aliases: real MLflow on an embedded sqlite store in tmp_path, a real gateway on loopback.

Waits are on conditions (the manifest's state, the gateway's count of finished copies) with deadlines."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from gwkit import mock
from quantgate.serve.canary import Window, abort, advance, decide, record, start
from quantgate.serve.canary_mlflow import LOGGED_TAG, plan, sync
from quantgate.serve.manifest import Deployment, load_manifest
from quantgate.serve.promote import promote
from test_canary_gateway import canary_manifest, drive, ended, wait_for

pytest.importorskip("mlflow")
pytestmark = pytest.mark.timeout(180)

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


@pytest.fixture()
def registry(tmp_path):
    """A registered model `demo` with two versions, each from its own run: stable (1) and good (2)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("canary", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("demo")
    regs = {}
    for name in ("stable", "good"):
        run = client.create_run(exp, run_name=name)
        mv = client.create_model_version("demo", source=f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id)
        regs[name] = {"uri": uri, "model": "demo", "version": str(mv.version), "run_id": run.info.run_id}
    return client, regs


def tracked(name: str, reg: dict, **engine) -> dict:
    return {**mock(name, version=reg["version"], **engine), "params": {"mlflow": reg}}


def alias(client, a):
    try:
        return str(client.get_model_version_by_alias("demo", a).version)
    except Exception:  # noqa: BLE001 - not set
        return None


def weights(client, run_id):
    return [(x.step, x.value) for x in sorted(client.get_metric_history(run_id, "canary.weight"), key=lambda x: x.step)]


# ----------------------------------------------------------------------------- pure
def _canary(regs, *moves):
    m = promote(None, Deployment.model_validate(tracked("stable", regs["stable"])), now=T0, by="t")
    m = start(m, Deployment.model_validate(tracked("good", regs["good"])), [10, 50, 100], now=T0, by="t")
    for i, what in enumerate(moves, start=1):
        now = T0 + timedelta(minutes=i)
        m = advance(m, now=now, by="t", reason="by hand") if what == "step" else abort(m, now=now, by="t", reason=what)
    return m


REGS = {"stable": {"uri": "sqlite:///x.db", "model": "demo", "version": "1", "run_id": "r1"},
        "good": {"uri": "sqlite:///x.db", "model": "demo", "version": "2", "run_id": "r2"}}


def test_plan_logs_each_event_once_and_a_new_canary_afresh():
    m = _canary(REGS, "step", "p95 E2E 3x the stable's")
    p = plan(m, None)
    assert [(v, s) for k, v, _, s in p.metrics if k == "canary.weight"] == [(10.0, 0), (50.0, 1), (0.0, 2)]
    assert p.tags["quantgate.canary.outcome"] == "rolled_back"
    assert p.tags["quantgate.canary.rollback"] == "aborted by hand: p95 E2E 3x the stable's"
    assert p.aliases == {"challenger": None}
    again = plan(m, p.logged)  # everything logged: nothing new
    assert again.metrics == [] and again.logged == p.logged
    partial = plan(m, p.logged.rsplit(" ", 1)[0] + " 2")
    assert [s for *_, s in partial.metrics] == [2]
    other = plan(m, "2020-01-01T00:00:00+00:00 3")  # the tag of an earlier canary of this candidate
    assert len([x for x in other.metrics if x[0] == "canary.weight"]) == 3


def test_plan_on_promotion_moves_champion_and_previous():
    m = _canary(REGS, "step", "step", "step")
    assert m.canary.state == "promoted"
    p = plan(m, None)
    assert p.aliases == {"champion": "2", "challenger": None, "previous": "1"}
    assert p.tags["quantgate.canary.outcome"] == "promoted" and "quantgate.canary.rollback" not in p.tags
    assert plan(_canary(REGS), None).aliases == {"challenger": "2"}


# ----------------------------------------------------------------------------- real MLflow
def test_sync_moves_the_aliases_and_logs_every_step_once(registry):
    client, regs = registry
    m = _canary(regs)
    assert sync(m) == 1 and alias(client, "challenger") == regs["good"]["version"]
    stable_window, canary_window = Window(), Window()
    for _ in range(30):
        stable_window.ok(10, 20)
        canary_window.ok(11, 21)
    c = m.canary.model_copy(update={"min_requests": 20, "min_seconds": 0})
    d = decide(c, stable_window, canary_window, now=T0 + timedelta(seconds=5))
    assert d.action == "step"
    m = record(m.model_copy(update={"canary": c}), d, now=T0 + timedelta(seconds=5), by="gateway g1", step=0)
    assert sync(m) == 1 and sync(m) == 0  # the second copy finds nothing new
    run = regs["good"]["run_id"]
    assert weights(client, run) == [(0, 10.0), (1, 50.0)]
    hist = client.get_metric_history(run, "canary.canary.p95_e2e_ms")
    assert [x.step for x in hist] == [1] and hist[0].value == pytest.approx(21, abs=1)
    m = advance(advance(m, now=T0 + timedelta(minutes=1), by="t", reason=""), now=T0 + timedelta(minutes=2), by="t",
                reason="")
    assert m.canary.state == "promoted" and sync(m) == 2
    assert (alias(client, "champion"), alias(client, "previous"), alias(client, "challenger")) == (
        regs["good"]["version"], regs["stable"]["version"], None)
    tags = client.get_run(run).data.tags
    assert tags["quantgate.canary.outcome"] == "promoted" and tags[LOGGED_TAG].endswith(" 4")
    assert len(weights(client, run)) == 4
    local = client.download_artifacts(run, "canary/history.json")
    assert [e["what"] for e in json.loads(open(local).read())] == ["start", "step", "step", "promote"]


def test_a_rollback_leaves_a_challenger_alias_that_names_another_version(registry):
    client, regs = registry
    m = _canary(regs)
    sync(m)
    client.set_registered_model_alias("demo", "challenger", regs["stable"]["version"])  # a later run's challenger
    sync(abort(m, now=T0 + timedelta(minutes=1), by="t", reason="by hand"))
    assert alias(client, "challenger") == regs["stable"]["version"]


def test_the_gateway_logs_a_rollback_with_its_reason_to_the_challengers_run(serve, manifest_path, registry):
    client, regs = registry
    challenger = tracked("flaky", regs["good"], reply_tokens=8, error_rate=0.5, seed=3)
    client.set_registered_model_alias("demo", "challenger", regs["good"]["version"])  # as `promote --canary` sets
    srv = serve(canary_manifest(challenger, probes={"cases": []}))
    drive(srv, manifest_path, ended("rolled_back"))

    def tags():
        return client.get_run(regs["good"]["run_id"]).data.tags

    m = load_manifest(manifest_path)
    # the logged tag is the copy's last write: once it counts the whole history, the copy is done
    wait_for(lambda: tags().get(LOGGED_TAG, "").endswith(f" {len(m.canary.history)}"), "the gateway's copy to MLflow")
    assert srv.gateway.canary.mlflow.failures == 0
    tags = tags()
    assert tags["quantgate.canary.rollback"] == m.canary.history[-1].why and "error rate" in tags["quantgate.canary.rollback"]
    assert weights(client, regs["good"]["run_id"])[-1][1] == 0
    assert client.get_metric_history(regs["good"]["run_id"], "canary.canary.error_rate")[-1].value > 0.2
    assert alias(client, "challenger") is None


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_mlflow_down_costs_a_warning_not_the_canary_and_canary_log_catches_up(serve, manifest_path, registry,
                                                                              monkeypatch, caplog):
    """The manifest keeps the tracking URI redacted; its credentials come from MLFLOW_TRACKING_URI. Unset, the
    gateway reaches for a server that is not there: every copy fails, the canary is promoted all the same.
    With it set (the server back), `quantgate canary log` copies the whole story once."""
    from quantgate.cli import app

    client, regs = registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    down = {**regs["good"], "uri": f"http://***@127.0.0.1:{_closed_port()}"}
    srv = serve(canary_manifest(tracked("good", down, reply_tokens=8)))
    with caplog.at_level("WARNING", logger="quantgate.serve"):
        _, failed, _ = drive(srv, manifest_path, ended("promoted"))
        log, n = srv.gateway.canary.mlflow, len(load_manifest(manifest_path).canary.history)
        wait_for(lambda: log.idle and log.last is not None and len(log.last.canary.history) == n,
                 "the gateway's copy of the promotion")
    assert not failed and log.failures == log.copies >= 1
    assert any("could not log to MLflow at http://***@127.0.0.1" in r.getMessage() for r in caplog.records)
    assert weights(client, regs["good"]["run_id"]) == []
    runner = CliRunner()
    res = runner.invoke(app, ["canary", "log", str(manifest_path)])
    assert res.exit_code != 0 and "could not log to MLflow" in str(res.exception)
    assert "Connection refused" in str(res.exception)  # the server is not there (not a malformed URL)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", regs["good"]["uri"])
    res = runner.invoke(app, ["canary", "log", str(manifest_path)])
    assert res.exit_code == 0, res.output
    assert "3 new canary event(s)" in res.output  # two steps and the promotion
    assert [v for _, v in weights(client, regs["good"]["run_id"])] == [50.0, 100.0, 100.0]
    assert alias(client, "champion") == regs["good"]["version"]
    assert "0 new canary event(s)" in runner.invoke(app, ["canary", "log", str(manifest_path)]).output


def test_canary_abort_by_hand_tags_the_run_with_the_reason(registry, tmp_path):
    from quantgate.deploy import canary_edit
    from quantgate.serve.manifest import write_manifest

    client, regs = registry
    path = tmp_path / "manifest.json"
    write_manifest(path, _canary(regs))
    canary_edit(path, "abort", reason="answers look off", by="ops")
    tags = client.get_run(regs["good"]["run_id"]).data.tags
    assert tags["quantgate.canary.rollback"] == "aborted by hand: answers look off"
    assert [v for _, v in weights(client, regs["good"]["run_id"])] == [10.0, 0.0]

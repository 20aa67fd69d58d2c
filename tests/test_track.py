"""MLflow tracking from finished records: a real sqlite store, and a real `mlflow server` on loopback."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from quantgate.errors import QuantgateError
from quantgate.evaluate.compare import compare
from quantgate.recipe import Recipe
from quantgate.track import log_run, set_aliases

pytestmark = pytest.mark.timeout(300)


def make_run(tmp_path):
    recipe = Recipe.model_validate({
        "name": "demo", "candidates": [
            {"name": "base", "method": "baseline"},
            {"name": "rtn4", "method": "rtn", "bits": 4, "group_size": 64},
            {"name": "gptq4", "method": "gptq", "bits": 4, "group_size": 64}],
        "card": {"gates": [{"metric": "perplexity", "min_recovery": 0.85}]},
    })
    ws = tmp_path / "ws"
    run_dir = ws / "runs" / "demo-x"
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    metrics = {"base": (17.0, 1000.0, 3.0), "rtn4": (23.0, 800.0, 1.0), "gptq4": (18.0, 820.0, 1.2)}
    quantize_results, records = [], []
    for name, (ppl, e2e, usd) in metrics.items():
        art = ws / "artifacts" / name
        art.mkdir(parents=True)
        (art / "candidate.json").write_text(json.dumps({"name": name, "calib_hash": "c" * 64}))
        quantize_results.append({"name": name, "artifact": str(art), "record": {"calib_hash": "c" * 64,
                                                                                 "versions": {"torch": "x"},
                                                                                 "wall_s": 40.0}})
        m = {"perplexity": ppl, "e2e_p50_ms": e2e * 0.8, "e2e_p95_ms": e2e, "e2e_p99_ms": e2e * 1.1,
             "ttft_p50_ms": 100.0, "ttft_p95_ms": 150.0, "ttft_p99_ms": 160.0, "tpot_p50_ms": 20.0,
             "tpot_p95_ms": 25.0, "tpot_p99_ms": 30.0, "usd_per_1m_output_tokens": usd}
        rec = {"name": name, "method": recipe.candidate(name).method, "metrics": m, "wall_s": 20.5,
               "quality": {"regression": {"pass_rate": 1.0, "cases": []}}}
        (run_dir / "evaluate" / f"{name}.json").write_text(json.dumps(rec))
        records.append(rec)
    comp = compare([{"name": r["name"], "method": r["method"], "metrics": r["metrics"]} for r in records],
                   "base", recipe.card.gates).to_dict()
    (run_dir / "compare.json").write_text(json.dumps(comp))
    return recipe, ws, run_dir, quantize_results, records, comp


def check_logged(uri, res, comp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["quantgate.recipe_hash"] and parent.data.tags["quantgate.calib_hash"] == "c" * 64
    assert parent.data.params["version.torch"] == "x"
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)} | {
        a.path for a in client.list_artifacts(res.parent_run_id, "plots")}
    assert {"recipe.yaml", "compare.json", "plots/pareto.png", "plots/latency.png"} <= arts
    child = client.get_run(res.child_run_ids["gptq4"])
    assert child.data.metrics["perplexity"] == 18.0 and child.data.metrics["gates_failed"] == 0
    assert child.data.tags["gate.perplexity"].startswith("pass: ")
    assert child.data.params["method"] == "gptq" and child.data.tags["mlflow.parentRunId"] == res.parent_run_id
    # every candidate has the same parameter names, so MLflow's compare view lines them up
    assert set(child.data.params) == set(client.get_run(res.child_run_ids["base"]).data.params)
    rtn = client.get_run(res.child_run_ids["rtn4"]).data
    assert rtn.metrics["gates_failed"] == 1 and rtn.tags["gate.perplexity"].startswith("FAIL: perplexity recovery")
    assert "short by" in rtn.tags["mlflow.note.content"]
    # the reviewer's answer without opening files: the experiment opens on runs, the parent says it
    exp = client.get_experiment(res.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # a run's duration in the UI is the candidate's work (quantize 40 s + evaluate 20.5 s), not the
    # second logging took; the parent spans its candidates' work
    info = child.info
    assert info.status == "FINISHED" and info.end_time - info.start_time == 60_500
    pinfo = client.get_run(res.parent_run_id).info
    assert pinfo.start_time <= info.start_time and pinfo.end_time >= info.end_time
    p = client.get_run(res.parent_run_id).data
    assert p.tags["mlflow.note.content"].startswith("**Recommended: gptq4**") and "rtn4" in p.tags["mlflow.note.content"]
    assert p.tags["quantgate.gates"] == "rtn4: FAIL perplexity; gptq4: pass"
    assert p.metrics["candidates_passing"] == 1 and p.metrics["recommended_perplexity"] == 18.0
    assert "comparison_table.json" in arts
    mv = client.get_model_version("demo", res.versions["gptq4"])
    assert res.parent_run_id in mv.description and "passed every gate" in mv.description
    # registry: passing candidates only; the recommended one is the challenger
    assert set(res.versions) == {"base", "gptq4"} and comp["recommended"] == "gptq4"
    mv = client.get_model_version_by_alias("demo", "challenger")
    assert str(mv.version) == res.versions["gptq4"] and mv.tags["quantgate.candidate"] == "gptq4"


def test_logs_to_embedded_sqlite_store(tmp_path):
    recipe, ws, run_dir, q, records, comp = make_run(tmp_path)
    res = log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp, log=lambda *_: None)
    assert res.uri.startswith("sqlite:///") and (ws / "mlflow.db").is_file()
    check_logged(res.uri, res, comp)
    assert json.loads((run_dir / "tracking.json").read_text())["parent_run_id"] == res.parent_run_id
    # a resume that changed nothing logs nothing new: no second parent run, no new model versions
    again = log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp, log=lambda *_: None)
    from mlflow.tracking import MlflowClient as _C

    c = _C(res.uri)
    assert again.parent_run_id == res.parent_run_id and again.versions == res.versions
    assert len(c.search_runs([res.experiment_id], "tags.`quantgate.kind` = 'recipe'")) == 1
    assert len(c.search_model_versions("name='demo'")) == 2
    # a changed result is a new parent run with its own name; the same checkpoints keep their versions
    comp2 = {**comp, "why": comp["why"] + " (re-gated)"}
    third = log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp2, log=lambda *_: None)
    parents = c.search_runs([res.experiment_id], "tags.`quantgate.kind` = 'recipe'")
    assert third.parent_run_id != res.parent_run_id and len({r.info.run_name for r in parents}) == 2
    assert third.versions == res.versions and len(c.search_model_versions("name='demo'")) == 2
    set_aliases(res.uri, "demo", {"champion": res.versions["gptq4"], "previous": res.versions["base"]})
    from mlflow.tracking import MlflowClient

    assert MlflowClient(res.uri).get_model_version_by_alias("demo", "champion").version == int(res.versions["gptq4"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts, log_path):
    """A real `mlflow server` on loopback that proxies artifacts (clients never see the store)."""
    port = _free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # readiness poll with a deadline: the server answers /health once it is up
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start (log: {log_path})")
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_logs_to_a_real_mlflow_server_on_loopback(tmp_path):
    recipe, ws, run_dir, q, records, comp = make_run(tmp_path)
    with mlflow_server(f"sqlite:///{tmp_path / 'srv.db'}", tmp_path / "srv-artifacts", tmp_path / "srv.log") as uri:
        res = log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp, uri=uri,
                      log=lambda *_: None)
        check_logged(uri, res, comp)


@pytest.fixture()
def postgres_db():
    """A fresh database on the PostgreSQL that .ci/run starts (QUANTGATE_TEST_PG_URI, a superuser URI)."""
    base = os.environ.get("QUANTGATE_TEST_PG_URI")
    if not base:
        pytest.skip("QUANTGATE_TEST_PG_URI is not set (.ci/run starts PostgreSQL and sets it; locally: "
                    "source .ci/postgres.sh && start_postgres)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the `server` extra) talks to PostgreSQL")
    name = f"qg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield base.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def postgres_mlflow_server(postgres_db: str, tmp_path):
    """The `mlflow server` on PostgreSQL that .ci/run starts (QUANTGATE_TEST_MLFLOW_URI, its artifact
    folder in QUANTGATE_TEST_MLFLOW_ARTIFACTS); without it, one started here on a fresh database."""
    uri = os.environ.get("QUANTGATE_TEST_MLFLOW_URI")
    if uri:
        yield uri, Path(os.environ["QUANTGATE_TEST_MLFLOW_ARTIFACTS"])
        return
    store = tmp_path / "srv-artifacts"
    with mlflow_server(postgres_db, store, tmp_path / "srv.log") as uri:
        yield uri, store


def test_postgres_backed_server_with_proxied_artifacts_and_promote_rollback_move_aliases(tmp_path, postgres_db):
    """MLflow as teams run it: runs, registry and aliases in PostgreSQL, artifacts through the server."""
    from mlflow.tracking import MlflowClient

    from quantgate.deploy import move_aliases
    from quantgate.serve.manifest import Deployment
    from quantgate.serve.promote import promote, rollback

    recipe, ws, run_dir, q, records, comp = make_run(tmp_path)
    with postgres_mlflow_server(postgres_db, tmp_path) as (uri, store):
        res = log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp, uri=uri,
                      log=lambda *_: None)
        check_logged(uri, res, comp)
        # artifacts went through the server into its own store, and the run only knows the proxy URI
        client = MlflowClient(uri)
        assert client.get_run(res.parent_run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        assert any(p.name == "compare.json" for p in store.rglob("compare.json"))

        def dep(name):
            return Deployment.model_validate({"name": name, "model_version": res.versions[name], "provider": {
                "kind": "mock"}, "params": {"mlflow": {"uri": uri, "model": "demo", "version": res.versions[name]}}})

        def alias(a):
            return str(client.get_model_version_by_alias("demo", a).version)

        now = datetime.now(timezone.utc)
        m1 = promote(None, dep("base"), now=now, by="t")
        move_aliases(m1)
        m2 = promote(m1, dep("gptq4"), now=now, by="t")
        move_aliases(m2)
        assert (alias("champion"), alias("previous")) == (res.versions["gptq4"], res.versions["base"])
        assert alias("challenger") == res.versions["gptq4"]
        m3 = rollback(m2, now=now, by="t", reason="p95 regression")
        move_aliases(m3)
        assert alias("champion") == res.versions["base"]
        with pytest.raises(Exception, match="previous"):
            alias("previous")  # nothing left to roll back to


def test_server_down_keeps_results_and_says_how_to_log_later(tmp_path):
    recipe, ws, run_dir, q, records, comp = make_run(tmp_path)
    with pytest.raises(QuantgateError, match=r"not reachable .* quantgate track"):
        log_run(recipe, ws, run_dir, quantize_results=q, records=records, comparison=comp,
                uri=f"http://127.0.0.1:{_free_port()}", log=lambda *_: None)
    assert (run_dir / "compare.json").is_file() and not (run_dir / "tracking.json").exists()

"""`quantgate run` on the real model → comparison, MLflow, promote, rollback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantgate", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_report_ranks_gptq_and_awq_above_rtn_and_fills_every_figure(smollm2_run):
    comp = smollm2_run["compare"]
    m = {c["name"]: c["metrics"] for c in comp["candidates"]}
    print("\nperplexity:", {k: round(v["perplexity"], 3) for k, v in m.items()})
    assert m["gptq-w4g64"]["perplexity"] < m["rtn-w4g64"]["perplexity"]
    assert m["awq-w4g64"]["perplexity"] < m["rtn-w4g64"]["perplexity"]
    assert m["baseline-fp32"]["perplexity"] < m["rtn-w4g64"]["perplexity"]
    for name, metrics in m.items():
        for key in ("ttft_p95_ms", "tpot_p50_ms", "e2e_p95_ms", "output_tok_s", "weights_mb", "peak_rss_mb",
                    "usd_per_1m_output_tokens", "usd_per_request", "regression_pass_rate", "error_rate"):
            assert metrics.get(key) is not None, (name, key)
    md = (smollm2_run["run_dir"] / "compare.md").read_text()
    assert "Recommended" in md and "gptq-w4g64" in md


def test_run_prints_where_to_look_and_the_promote_command(smollm2_run):
    out = smollm2_run["stdout"] + smollm2_run["stderr"]
    assert "MLflow" in out and "quantgate ui" in out
    # quantgate's own lines, not its libraries': the backends' output is in the per-candidate logs
    for noise in ("GPTQModel", "Failed to load", "_pytree", "GenerationConfig", "it/s]", "\r"):
        assert noise not in out, noise
    assert len(out.splitlines()) < 150, out[-3000:]
    logs = smollm2_run["run_dir"] / "logs"
    assert "GPTQModel" in (logs / "gptq-w4g64.quantize.log").read_text()
    rec = smollm2_run["compare"]["recommended"]
    if rec:
        assert f"quantgate promote {smollm2_run['run_dir']} --candidate {rec}" in out


def test_mlflow_has_runs_metrics_plots_and_registry(smollm2_run):
    from mlflow.tracking import MlflowClient

    tracking = json.loads((smollm2_run["run_dir"] / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    parent = client.get_run(tracking["parent_run_id"])
    assert parent.data.tags["quantgate.recipe_hash"] == smollm2_run["recipe"].recipe_hash
    plots = {a.path for a in client.list_artifacts(tracking["parent_run_id"], "plots")}
    assert {"plots/pareto.png", "plots/latency.png"} <= plots
    child = client.get_run(tracking["child_run_ids"]["gptq-w4g64"])
    assert child.data.metrics["perplexity"] > 0 and "e2e_p95_ms" in child.data.metrics
    passing = [c["name"] for c in smollm2_run["compare"]["candidates"] if c["passed"]]
    assert set(passing) <= set(tracking["versions"])
    # the only other versions are candidates someone promoted with --force (a kept workspace has them)
    model = tracking["registered_model"]
    for name in set(tracking["versions"]) - set(passing):
        assert "--force" in client.get_model_version(model, tracking["versions"][name]).description, name


def test_promote_recommended_then_rollback_restores_previous(smollm2_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from quantgate.serve.manifest import load_manifest

    run_dir = smollm2_run["run_dir"]
    comp = smollm2_run["compare"]
    rec = comp["recommended"]
    assert rec, "the shipped recipe should have a candidate passing every gate"
    manifest = tmp_path / "manifest.json"
    base = smollm2_run["recipe"].baseline.name
    passing = [c["name"] for c in comp["candidates"] if c["passed"] and c["name"] != rec]
    first = base if rec != base else passing[0]   # what serves before the recommended one
    assert cli("promote", run_dir, "--candidate", first, "--manifest", manifest).returncode == 0
    proc = cli("promote", run_dir, "--candidate", rec, "--manifest", manifest)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(manifest)
    assert m.active.name == rec and m.previous[0].name == first
    assert m.evidence["go_live_check"]["engine_supports_format"]["ok"]
    target = m.evidence["go_live_check"]["rollback_target"]  # the fallback the gateway serves meanwhile:
    if rec != base:  # the baseline, its checksums verified
        assert target["name"] == base and target["verified"], target
    else:  # the baseline is the active one (the load test's cost noise can recommend it): no fallback
        assert target == {"name": None, "present": False, "verified": False}, target
        assert m.previous[0].sha256  # and the rollback goes to the previous deployment, checksummed
    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    model = tracking["registered_model"]
    assert client.get_model_version_by_alias(model, "champion").version == int(tracking["versions"][rec])
    # a failing candidate is refused, naming the gate
    assert m.active.price and m.active.price.output_per_1m > 0  # the gateway's cost accounting
    assert m.evidence["run"] == str(run_dir) and m.active.params["recipe_hash"] == smollm2_run["recipe"].recipe_hash
    failing = [c for c in comp["candidates"] if not c["passed"]]
    assert failing, "the shipped recipe should show a gate that fails"
    bad = cli("promote", run_dir, "--candidate", failing[0]["name"], "--manifest", manifest)
    assert bad.returncode == 2 and "gate" in bad.stderr
    # forced onto a failing candidate: the registry's champion follows the manifest
    forced = cli("promote", run_dir, "--candidate", failing[0]["name"], "--manifest", manifest, "--force",
                 "--reason", "e2e test")
    assert forced.returncode == 0, forced.stderr
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert client.get_model_version_by_alias(model, "champion").version == int(tracking["versions"][failing[0]["name"]])
    assert cli("rollback", "--manifest", manifest, "--reason", "undo the forced promote").returncode == 0
    proc = cli("rollback", "--manifest", manifest, "--reason", "e2e test")
    assert proc.returncode == 0, proc.stderr
    back = load_manifest(manifest)
    assert back.active.name == first and back.history[-1].what == "rollback"
    assert client.get_model_version_by_alias(model, "champion").version == int(tracking["versions"][first])


def test_resume_that_changes_nothing_logs_nothing_new(smollm2_run):
    from mlflow.tracking import MlflowClient

    run_dir = smollm2_run["run_dir"]
    before = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(before["uri"])
    n_versions = len(client.search_model_versions(f"name='{before['registered_model']}'"))
    proc = cli("run", REPO / "recipes" / "smollm2-cpu.yaml", "-w", smollm2_run["ws"].root, "--device", "cpu",
               cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "nothing new since parent run" in out and " running" not in out
    assert json.loads((run_dir / "tracking.json").read_text())["parent_run_id"] == before["parent_run_id"]
    assert len(client.search_model_versions(f"name='{before['registered_model']}'")) == n_versions
    assert f"recommended: {smollm2_run['compare']['recommended']} — " in out

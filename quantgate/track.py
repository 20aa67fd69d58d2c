"""MLflow adapter: logs a finished run from its records (it never hooks into the computation).

Layout in MLflow, per recipe run:
  parent run   the recipe (artifact + flattened params), hashes, library versions, git commit,
               the comparison table and the plots (Pareto, latency percentiles)
  child runs   one per candidate: parameters, every metric, each gate's result, candidate.json,
               the evaluation record and the regression outputs
  registry     candidates that pass every gate become versions of one registered model; the
               recommended one gets the alias `challenger` (promotion moves `champion`/`previous`)
The default store is embedded: sqlite + local artifacts inside the workspace, no server needed.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import QuantgateError, require
from .workspace import CANDIDATE_RECORD, RunFolder, Workspace


def default_uri(workspace: Path) -> str:
    return Workspace(workspace).mlflow_uri


def tracking_uri(recipe, workspace: Path) -> str:
    return recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(workspace)


def check_reachable(uri: str, run_dir: Path, timeout: float = 3.0) -> None:
    """Fail fast on a tracking server that is down (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as exc:
        raise QuantgateError(f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}); "
                             f"every result is kept in {run_dir}; log it later with: quantgate track {run_dir}") from None


def artifact_root(workspace: Path) -> str:
    return Workspace(workspace).mlflow_artifacts.as_uri()


@dataclass
class TrackingResult:
    uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    child_run_ids: dict[str, str] = field(default_factory=dict)
    registered_model: str | None = None
    versions: dict[str, str] = field(default_factory=dict)  # candidate → model version
    ui_hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v, default=str)[:5000]
        else:
            out[key] = v
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def _mlflow_key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def log_run(recipe, workspace: Path, run_dir: Path, *, quantize_results: list[dict], records: list[dict],
            comparison: dict, uri: str | None = None, log=print) -> TrackingResult:
    mlflow = require("mlflow", what="MLflow tracking", extra="track")
    from mlflow.tracking import MlflowClient

    from . import plots

    uri = uri or tracking_uri(recipe, workspace)
    run = RunFolder(Path(run_dir))
    check_reachable(uri, run_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_name = recipe.tracking.experiment or f"quantgate/{recipe.name}"
    try:
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            exp_name, artifact_location=artifact_root(workspace) if uri.startswith("sqlite") else None)
    except Exception as exc:  # an unreachable server: every result stays local; `quantgate track` later
        raise QuantgateError(f"MLflow at {uri} is not reachable ({type(exc).__name__}); results are kept in "
                             f"{run_dir}; log them later with: quantgate track {run_dir}") from None
    by_q = {q["name"]: q for q in quantize_results}
    calib_hash = next((q["record"].get("calib_hash") for q in quantize_results if q.get("record", {}).get("calib_hash")), None)
    verdicts = {c["name"]: c for c in comparison["candidates"]}
    tags = {"quantgate.recipe": recipe.name, "quantgate.recipe_hash": recipe.recipe_hash,
            "quantgate.model": recipe.model.ref, "quantgate.recommended": str(comparison.get("recommended"))}
    if calib_hash:
        tags["quantgate.calib_hash"] = calib_hash
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    versions = next((q["record"].get("versions") for q in quantize_results if q.get("record")), {}) or {}

    result = TrackingResult(uri, exp_name, exp_id, "")
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{recipe.name}@{recipe.recipe_hash[:8]}",
                          tags={**tags, "quantgate.kind": "recipe"}) as parent:
        result.parent_run_id = parent.info.run_id
        params = flatten(recipe.model_dump(mode="json", exclude={"candidates"}))
        params.update({f"version.{k}": v for k, v in versions.items()})
        mlflow.log_params({_mlflow_key(k)[:250]: str(v)[:6000] for k, v in list(params.items())[:400]})
        for f in (run.recipe_file, run.compare_report, run.compare_file, run.quantize_file):
            if f.is_file():
                mlflow.log_artifact(str(f))
        rows = [{"name": r["name"], "metrics": r.get("metrics", {})} for r in records if not r.get("error")]
        plot_dir = run.plots
        plot_dir.mkdir(exist_ok=True)
        for made in (plots.pareto_plot(rows, plot_dir / "pareto.png", recommended=comparison.get("recommended")),
                     plots.latency_plot(rows, plot_dir / "latency.png")):
            if made:
                mlflow.log_artifact(str(made), artifact_path="plots")
        for rec in records:
            name = rec["name"]
            spec = recipe.candidate(name)
            v = verdicts.get(name, {})
            ctags = {**tags, "quantgate.kind": "candidate", "quantgate.candidate": name, "quantgate.method": spec.method,
                     "quantgate.passed": str(v.get("passed", False)),
                     "quantgate.recommended_candidate": str(name == comparison.get("recommended"))}
            with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, tags=ctags) as child:
                result.child_run_ids[name] = child.info.run_id
                mlflow.log_params({_mlflow_key(k): str(val)[:6000] for k, val in flatten(spec.model_dump(mode="json")).items()})
                mlflow.log_metrics({_mlflow_key(k): val for k, val in _numeric(rec.get("metrics", {})).items()})
                mlflow.log_metrics({_mlflow_key(f"recovery/{k}"): val for k, val in _numeric(v.get("recovery", {})).items()})
                for g in v.get("gates", []):
                    mlflow.log_metric(_mlflow_key(f"gate/{g['metric']}"), 1.0 if g["passed"] else 0.0)
                    mlflow.set_tag(_mlflow_key(f"gate.{g['metric']}"), g["reason"][:5000])
                if rec.get("error"):
                    mlflow.set_tag("quantgate.error", rec["error"][:5000])
                art = (by_q.get(name) or {}).get("artifact")
                if art and (Path(art) / CANDIDATE_RECORD).is_file():
                    mlflow.log_artifact(str(Path(art) / CANDIDATE_RECORD))
                    # the registry version points at this run's `checkpoint` folder: the whole
                    # checkpoint when log_checkpoints is on, else its record (the weights stay put)
                    if recipe.tracking.log_checkpoints:
                        mlflow.log_artifacts(art, artifact_path="checkpoint")
                    else:
                        mlflow.log_artifact(str(Path(art) / CANDIDATE_RECORD), artifact_path="checkpoint")
                    mlflow.set_tag("quantgate.artifact_uri", Path(art).resolve().as_uri())
                eval_file = run.evaluation_file(name)
                if eval_file.is_file():
                    mlflow.log_artifact(str(eval_file), artifact_path="evaluation")
                reg = (rec.get("quality") or {}).get("regression")
                if reg:
                    mlflow.log_dict(reg, "evaluation/regression_outputs.json")
    result.registered_model = recipe.tracking.registered_model or recipe.name
    result.versions = register_passing(client, result, comparison, by_q, recipe.recipe_hash)
    result.ui_hint = (f"quantgate ui -w {workspace}" if uri.startswith("sqlite") else uri) + f"  → experiment '{exp_name}'"
    run.write_tracking(result.to_dict())
    return result


def register_passing(client, result: TrackingResult, comparison: dict, by_q: dict, recipe_hash: str) -> dict[str, str]:
    """Register every candidate that passes its gates; alias the recommended one `challenger`."""
    name = result.registered_model
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, tags={"quantgate.recipe_hash": recipe_hash})
    versions = {}
    for c in comparison["candidates"]:
        art = (by_q.get(c["name"]) or {}).get("artifact")
        if not c.get("passed") or not art:
            continue
        run_id = result.child_run_ids.get(c["name"])
        mv = client.create_model_version(
            name, source=f"runs:/{run_id}/checkpoint", run_id=run_id,
            tags={"quantgate.candidate": c["name"], "quantgate.method": c.get("method", ""),
                  "quantgate.recipe_hash": recipe_hash, "quantgate.artifact_uri": Path(art).resolve().as_uri()},
            description=f"{c['name']} ({c.get('method', '')}) from recipe run {result.parent_run_id}",
        )
        versions[c["name"]] = str(mv.version)
    rec = comparison.get("recommended")
    if rec in versions:
        client.set_registered_model_alias(name, "challenger", versions[rec])
    return versions


def set_aliases(uri: str, model: str, aliases: dict[str, str | None]) -> None:
    """Move registry aliases (champion / previous / challenger); None deletes one. Used by promote/rollback."""
    require("mlflow", what="MLflow registry aliases", extra="track")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for alias, version in aliases.items():
        if version is None:
            try:
                client.delete_registered_model_alias(model, alias)
            except Exception:
                pass  # deleting an alias that is not set is not an error here
        else:
            client.set_registered_model_alias(model, alias, str(version))

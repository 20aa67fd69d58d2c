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
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import QuantgateError, require
from .util import redact_uri
from .workspace import CANDIDATE_RECORD, RunFolder, Workspace, read_json


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
        raise QuantgateError(f"MLflow tracking server {redact_uri(uri)} is not reachable ({getattr(exc, 'reason', exc)}); "
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
    fingerprint: str = ""  # what was logged; the same again logs nothing new

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

    _quiet_mlflow()
    uri = uri or tracking_uri(recipe, workspace)
    run = RunFolder(Path(run_dir))
    check_reachable(uri, run_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_name = recipe.tracking.experiment or f"quantgate/{recipe.name}"
    fingerprint = run_fingerprint(recipe, quantize_results, records, comparison)
    if (same := already_logged(client, run, uri, fingerprint)) is not None:
        log(f"MLflow: nothing new since parent run {same.parent_run_id}; not logged again")
        return same
    try:
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            exp_name, artifact_location=artifact_root(workspace) if uri.startswith("sqlite") else None)
        # MLflow 3 opens GenAI experiments on an (empty) traces overview; this one is about runs
        client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    except Exception as exc:  # an unreachable server: every result stays local; `quantgate track` later
        raise QuantgateError(f"MLflow at {redact_uri(uri)} is not reachable ({type(exc).__name__}); results are kept in "
                             f"{run_dir}; log them later with: quantgate track {run_dir}") from None
    by_q = {q["name"]: q for q in quantize_results}
    calib_hash = next((q["record"].get("calib_hash") for q in quantize_results if q.get("record", {}).get("calib_hash")), None)
    verdicts = {c["name"]: c for c in comparison["candidates"]}
    tags = {"quantgate.recipe": recipe.name, "quantgate.recipe_hash": recipe.recipe_hash,
            "quantgate.model": recipe.model.ref, "quantgate.recommended": str(comparison.get("recommended"))}
    parent_tags = {"quantgate.why": comparison.get("why", "")[:5000], "quantgate.gates": gate_summary(comparison),
                   "mlflow.note.content": parent_description(comparison, run)}
    if calib_hash:
        tags["quantgate.calib_hash"] = calib_hash
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    versions = next((q["record"].get("versions") for q in quantize_results if q.get("record")), {}) or {}

    result = TrackingResult(redact_uri(uri), exp_name, exp_id, "", fingerprint=fingerprint)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    n = 1 + len(client.search_runs([exp_id], f"tags.`quantgate.recipe_hash` = '{recipe.recipe_hash}' "
                                             "and tags.`quantgate.kind` = 'recipe'"))
    spans = {r["name"]: work_span(r, by_q.get(r["name"]), run) for r in records}
    p_start = min((a for a, _ in spans.values()), default=None)
    p_end = max((b for _, b in spans.values()), default=None)
    parent_id = _create_run(client, exp_id, f"{recipe.name}@{recipe.recipe_hash[:8]} #{n} ({when} UTC)",
                            {**tags, **parent_tags, "quantgate.kind": "recipe"}, p_start)
    with mlflow.start_run(run_id=parent_id) as parent:
        result.parent_run_id = parent.info.run_id
        mlflow.log_metrics(parent_metrics(comparison))
        with warnings.catch_warnings():  # pandas' dtype deprecation notices inside MLflow
            warnings.simplefilter("ignore")
            mlflow.log_table(data=comparison_table_data(comparison), artifact_file="comparison_table.json")
        for card in (run.engine_card_report, run.engine_card, run.engine_slo_rate_plot):
            if card.is_file():
                mlflow.log_artifact(str(card), artifact_path="engine_card")
        params = flatten(recipe.model_dump(mode="json", exclude={"candidates"}))
        params.update({f"version.{k}": v for k, v in versions.items()})
        mlflow.log_params({_mlflow_key(k)[:250]: redact_uri(str(v))[:6000] for k, v in list(params.items())[:400]})
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
            ctags["mlflow.note.content"] = candidate_description(name, v, comparison)
            child_id = _create_run(client, exp_id, name, {**ctags, "mlflow.parentRunId": parent_id}, spans[name][0])
            with mlflow.start_run(run_id=child_id, nested=True) as child:
                result.child_run_ids[name] = child.info.run_id
                mlflow.log_params(candidate_params(spec, (by_q.get(name) or {}).get("record") or {}, rec))
                mlflow.log_metrics({_mlflow_key(k): val for k, val in _numeric(rec.get("metrics", {})).items()})
                mlflow.log_metrics({_mlflow_key(f"recovery/{k}"): val for k, val in _numeric(v.get("recovery", {})).items()})
                gates = v.get("gates", [])
                mlflow.log_metrics({"gates_passed": float(sum(g["passed"] for g in gates)),
                                    "gates_failed": float(sum(not g["passed"] for g in gates))})
                for g in gates:
                    if isinstance(g.get("value"), (int, float)):  # what the rule compared, beside its threshold
                        mlflow.log_metric(_mlflow_key(f"gate/{g['metric']}/value"), float(g["value"]))
                    mlflow.set_tag(_mlflow_key(f"gate.{g['metric']}"),
                                   ("pass: " if g["passed"] else "FAIL: ") + g["reason"][:4990])
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
                if art and (mixed := ((by_q.get(name) or {}).get("record") or {}).get("mixed")):
                    _log_mixed(mlflow, name, mixed, Path(art), run.plots)
                eval_file = run.evaluation_file(name)
                if eval_file.is_file():
                    mlflow.log_artifact(str(eval_file), artifact_path="evaluation")
                reg = (rec.get("quality") or {}).get("regression")
                if reg:
                    mlflow.log_dict(reg, "evaluation/regression_outputs.json")
            _finish_at(client, child_id, spans[name][1])
    _finish_at(client, parent_id, p_end)
    result.registered_model = recipe.tracking.registered_model or recipe.name
    result.versions = register_passing(client, result, comparison, by_q, recipe.recipe_hash)
    result.ui_hint = (f"quantgate ui -w {workspace}" if uri.startswith("sqlite") else redact_uri(uri)) + f"  → experiment '{exp_name}'"
    run.write_tracking(result.to_dict())
    return result


def _log_mixed(mlflow, name: str, mixed: dict, artifact: Path, plot_dir: Path) -> None:
    """A mixed candidate's bit map (JSON), its summary as params, and the sensitivity plot."""
    from . import plots

    mlflow.log_dict(mixed, "mixed/bit_map.json")
    mlflow.log_params({f"mixed.{k}": str(mixed.get(k)) for k in ("algorithm", "avg_bits", "size_mb", "base_bits")}
                      | {"mixed.units_per_bits": json.dumps(mixed.get("units_per_bits"))})
    table = read_json(artifact / "sensitivity.json")
    if table:
        plot_dir.mkdir(exist_ok=True)
        made = plots.sensitivity_plot(table, mixed.get("bits") or {}, plot_dir / f"sensitivity-{name}.png",
                                      title=f"{name}: sensitivity and the bits given")
        if made:
            mlflow.log_artifact(str(made), artifact_path="plots")


def work_span(record: dict, quantized: dict | None, run: RunFolder) -> tuple[float | None, float | None]:
    """When a candidate's work happened, in epoch seconds, so MLflow's run duration is the work
    (quantization plus evaluation wall time), not the second it took to log it. The evaluation
    record is written when that work ends; a resumed step keeps the time it was first done."""
    f = run.evaluation_file(record["name"])
    if not f.is_file():
        return None, None
    end = f.stat().st_mtime
    took = float(record.get("wall_s") or 0) + float(((quantized or {}).get("record") or {}).get("wall_s") or 0)
    return end - took, end


def _create_run(client, exp_id: str, name: str, tags: dict, start: float | None) -> str:
    """A run whose start time is when its work began (fluent start_run always says 'now')."""
    from mlflow.tracking.context.registry import resolve_tags

    run = client.create_run(exp_id, start_time=int(start * 1000) if start else None,
                            tags=resolve_tags({**tags, "mlflow.runName": name}), run_name=name)
    return run.info.run_id


def _finish_at(client, run_id: str, end: float | None) -> None:
    if end is not None:
        client.set_terminated(run_id, "FINISHED", end_time=int(end * 1000))


def register_passing(client, result: TrackingResult, comparison: dict, by_q: dict, recipe_hash: str) -> dict[str, str]:
    """Register every candidate that passes its gates; alias the recommended one `challenger`."""
    versions = {}
    for c in comparison["candidates"]:
        art = (by_q.get(c["name"]) or {}).get("artifact")
        if not c.get("passed") or not art:
            continue
        passed = "; ".join(g["reason"] for g in c.get("gates", [])) or "no gates"
        versions[c["name"]] = register_candidate(
            client, result.registered_model, result.child_run_ids.get(c["name"]), c["name"], c.get("method", ""),
            recipe_hash, art, result.parent_run_id, gates=f"passed every gate: {passed}")
    rec = comparison.get("recommended")
    if rec in versions:
        client.set_registered_model_alias(result.registered_model, "challenger", versions[rec])
    return versions


def register_candidate(client, model: str, run_id: str, name: str, method: str, recipe_hash: str, artifact: str,
                       parent_run_id: str, *, gates: str) -> str:
    """One registry version for one candidate's checkpoint; the same checkpoint is never registered twice."""
    if isinstance(client, str):
        require("mlflow", what="MLflow registry", extra="track")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(client)
    try:
        client.get_registered_model(model)
    except Exception:
        client.create_registered_model(model, tags={"quantgate.recipe_hash": recipe_hash})
    art_uri = Path(artifact).resolve().as_uri()
    for mv in client.search_model_versions(f"name='{model}'"):
        if mv.tags.get("quantgate.artifact_uri") == art_uri and mv.tags.get("quantgate.candidate") == name:
            return str(mv.version)
    mv = client.create_model_version(
        model, source=f"runs:/{run_id}/checkpoint", run_id=run_id,
        tags={"quantgate.candidate": name, "quantgate.method": method, "quantgate.recipe_hash": recipe_hash,
              "quantgate.artifact_uri": art_uri},
        description=(f"{name} ({method}) from recipe run {parent_run_id} (recipe_hash {recipe_hash[:12]}); "
                     f"checkpoint {art_uri}; {gates}")[:5000],
    )
    return str(mv.version)


# ------------------------------------------------------------------ what a reviewer reads
def run_fingerprint(recipe, quantize_results: list[dict], records: list[dict], comparison: dict) -> str:
    from .recipe import stable_hash

    return stable_hash({"recipe": recipe.recipe_hash, "comparison": comparison,
                        "artifacts": sorted((q["name"], q.get("artifact") or "") for q in quantize_results),
                        "evaluations": sorted((r["name"], r.get("eval_key") or r.get("error") or "") for r in records)})


def already_logged(client, run: RunFolder, uri: str, fingerprint: str) -> TrackingResult | None:
    """The earlier logging of exactly these results, if its parent run still exists in this store."""
    got = run.tracking()
    if not got:
        return None
    try:
        prev = TrackingResult(**got)
    except (TypeError, ValueError):
        return None
    if prev.uri != redact_uri(uri) or prev.fingerprint != fingerprint:  # the record keeps no credentials
        return None
    try:
        return prev if client.get_run(prev.parent_run_id).info.lifecycle_stage == "active" else None
    except Exception:
        return None


def gate_summary(comparison: dict) -> str:
    out = []
    for c in comparison["candidates"]:
        if c["name"] == comparison.get("baseline"):
            continue
        failed = [g["metric"] for g in c.get("gates", []) if not g["passed"]]
        out.append(f"{c['name']}: " + ("error" if c.get("error") else "FAIL " + ",".join(failed) if failed else "pass"))
    return "; ".join(out)[:5000]


def parent_description(comparison: dict, run: RunFolder) -> str:
    """The parent run's description (MLflow's note): the answer first, then the table and gates."""
    rec = comparison.get("recommended")
    head = [f"**Recommended: {rec}** — {comparison.get('why', '')}" if rec else "**No candidate passes every gate.**", ""]
    for c in comparison["candidates"]:
        for g in c.get("gates", []):
            if not g["passed"]:
                head.append(f"- ❌ `{c['name']}` fails {g['rule']} on `{g['metric']}`: {g['reason']}")
    md = run.compare_report
    body = md.read_text() if md.is_file() else ""
    return ("\n".join(head) + "\n\n" + body)[:20000]


def candidate_description(name: str, verdict: dict, comparison: dict) -> str:
    lines = [f"**{name}** ({verdict.get('method', '')})"
             + (" — recommended: " + comparison.get("why", "") if name == comparison.get("recommended") else ""), ""]
    if verdict.get("error"):
        lines.append(f"- ❌ error: {verdict['error']}")
    for g in verdict.get("gates", []):
        lines.append(f"- {'✅' if g['passed'] else '❌'} {g['rule']} on `{g['metric']}`: {g['reason']}")
    return "\n".join(lines)[:5000]


PARENT_METRICS = ("perplexity", "regression_pass_rate", "e2e_p95_ms", "ttft_p95_ms", "peak_rss_mb", "weights_mb",
                  "usd_per_1m_output_tokens")


def parent_metrics(comparison: dict) -> dict:
    """The parent run's own numbers: how many pass, and the recommended candidate against the baseline."""
    cands = [c for c in comparison["candidates"] if c["name"] != comparison.get("baseline")]
    out = {"candidates_total": float(len(cands)), "candidates_passing": float(sum(bool(c.get("passed")) for c in cands))}
    by = {c["name"]: c for c in comparison["candidates"]}
    for role, name in (("recommended", comparison.get("recommended")), ("baseline", comparison.get("baseline"))):
        m = (by.get(name) or {}).get("metrics") or {}
        out.update({f"{role}_{k}": v for k, v in _numeric({k: m.get(k) for k in PARENT_METRICS}).items()})
    return out


def comparison_table_data(comparison: dict) -> dict:
    """The comparison as columns for mlflow.log_table (rendered as a table in the run's artifacts)."""
    keys = ["perplexity", "regression_pass_rate", "ttft_p95_ms", "tpot_p50_ms", "e2e_p50_ms", "e2e_p95_ms",
            "e2e_p99_ms", "load_requests_n", "output_tok_s", "weights_mb", "peak_rss_mb", "usd_per_1m_output_tokens"]
    keys += sorted({k for c in comparison["candidates"] for k in (c.get("metrics") or {}) if k.startswith("lm_eval/")})
    rows = comparison["candidates"]
    data = {"candidate": [c["name"] for c in rows], "method": [c.get("method", "") for c in rows],
            "verdict": ["baseline" if c["name"] == comparison.get("baseline") else
                        "error" if c.get("error") else "pass" if c.get("passed") else
                        "FAIL " + ",".join(g["metric"] for g in c.get("gates", []) if not g["passed"]) for c in rows],
            "recommended": [c["name"] == comparison.get("recommended") for c in rows]}
    for k in keys:
        data[k] = [(c.get("metrics") or {}).get(k) for c in rows]
    return data


def candidate_params(spec, record: dict, evaluation: dict | None = None) -> dict:
    """Params that line up across candidates in MLflow's compare view (one set of names for all);
    `eval_dtype` is the dtype every candidate was scored in (a baseline's `dtype` is how it was saved)."""
    d = spec.model_dump(mode="json")
    params = {k: d.get(k) for k in ("method", "bits", "group_size", "sym", "act_order", "damp_percent", "n_samples",
                                     "backend", "dtype", "engine")}
    params.update(format=record.get("format"), quantized_modules=record.get("quantized_modules"),
                  skip=",".join(d.get("skip") or []) or None, eval_dtype=(evaluation or {}).get("dtype"))
    return {k: ("-" if v is None else str(v)) for k, v in params.items()}


def _quiet_mlflow() -> None:
    """MLflow's and alembic's INFO lines (store migrations, run URLs) are not the run's story."""
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def engine_card_table(card: dict) -> dict:
    """The card's pairs as columns for log_table: which engine served which candidate, how fast, chosen or not."""
    rec = (card.get("recommendation") or {}).get("recommended")
    pairs = card.get("pairs") or []

    def pid(p):
        return f"{p['artifact']['name']} @ {p['engine']}"

    def metric(p, k):
        return (p.get("metrics") or {}).get(k)

    return {"pair": [pid(p) for p in pairs], "engine_kind": [p.get("engine_kind") for p in pairs],
            "format": [(p.get("artifact") or {}).get("label") for p in pairs],
            "kernel": [p.get("kernel") for p in pairs], "measured": [bool(p.get("measured")) for p in pairs],
            "e2e_p95_ms": [metric(p, "e2e_p95_ms") for p in pairs], "ttft_p95_ms": [metric(p, "ttft_p95_ms") for p in pairs],
            "goodput_rps": [metric(p, "goodput_rps") for p in pairs],
            "max_slo_load": [(p.get("slo_rate") or {}).get("max_value") for p in pairs],
            "goodput_at_max_slo_load": [(p.get("slo_rate") or {}).get("goodput_rps") for p in pairs],
            "recommended": [pid(p) == rec for p in pairs]}


def log_engine_card(uri: str, run_id: str, card_file: Path, report_file: Path | None = None) -> None:
    """The engine-selection card with the run it selected for: card.json and card.md as artifacts
    (engine_card/, as `run` logs them when the card already exists) and the pairs as a table."""
    require("mlflow", what="MLflow tracking", extra="track")
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    client = MlflowClient(uri)
    card = json.loads(Path(card_file).read_text())
    plots = [Path(card_file).parent / name for name in card.get("plots") or []]  # beside the card, by its name
    for f in (card_file, report_file, *plots):
        if f is not None and Path(f).is_file():
            client.log_artifact(run_id, str(f), artifact_path="engine_card")
    with warnings.catch_warnings():  # pandas' dtype deprecation notices inside MLflow
        warnings.simplefilter("ignore")
        client.log_table(run_id, data=engine_card_table(card), artifact_file="engine_card/pairs.json")
    rec = (card.get("recommendation") or {}).get("recommended")
    if rec:
        client.set_tag(run_id, "quantgate.engine_recommended", rec)

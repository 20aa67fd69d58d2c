"""From a finished run to the serving manifest: build deployments, lock, verify, move aliases.

The decisions are quantgate.serve.promote's pure functions; this module is the I/O around them:
reading the run folder, a file lock so concurrent promotes never interleave, atomic writes,
checksum verification of what a rollback restores, and the MLflow registry aliases.
"""

from __future__ import annotations

import getpass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from .errors import QuantgateError
from .formats import Artifact, artifact_of_candidate, expected, provider_support
from .integrity import CURRENT_RULE, folder_checksums, weights_sha256
from .serve.manifest import (
    ArithmeticSpec,
    Deployment,
    LocalProviderSpec,
    Manifest,
    PriceSpec,
    ServingSpec,
    edit_manifest,
    migrate_manifest,
)
from .serve.promote import PromotionRefused, promote, refuse_failing, rollback
from .util import redact_uri, with_credentials
from .workspace import candidate_record, open_run, read_json

def migrate(path: Path, *, by: str | None = None):
    """`quantgate manifest migrate`: an older manifest rewritten in the current schema, under the lock."""
    path = Path(path)
    with FileLock(str(path) + ".lock", timeout=60):
        return migrate_manifest(path, now=datetime.now(timezone.utc), by=by or getpass.getuser())


def deployment_for(run_dir: Path, name: str) -> Deployment:
    """A candidate of a finished run as a local-provider deployment, with its checksum and registry version."""
    recipe, _, run = open_run(run_dir)
    recipe.candidate(name)  # a clear error, with a suggestion, for a typo
    res = next((r for r in run.quantize_results() if r.name == name), None)
    if res is None or not res.artifact:
        raise QuantgateError(f"candidate '{name}' has no artifact in {run_dir} (it failed or was not run)")
    rec = res.record
    tracking = run.tracking()
    version = (tracking.get("versions") or {}).get(name)
    # recipe_hash: the run this deployment comes from (evidence.run); a resumed run reuses an
    # artifact another recipe version made, which its record names as artifact_recipe_hash
    params = {**rec.get("params", {}), "format": rec.get("format"), "recipe_hash": recipe.recipe_hash,
              "artifact_recipe_hash": rec.get("recipe_hash"), "calib_hash": rec.get("calib_hash")}
    if version:
        params["mlflow"] = {"uri": redact_uri(tracking["uri"]), "model": tracking["registered_model"], "version": version,
                            "run_id": tracking["child_run_ids"].get(name)}
    evaluated = evaluated_arithmetic(run.evaluation(name))
    local = LocalProviderSpec(kind="local", **({"dtype": evaluated.dtype, "device": evaluated.device}
                                               if evaluated and evaluated.dtype in LOCAL_DTYPES else {}))
    return Deployment(
        name=name, model_version=version or recipe.recipe_hash[:12], artifact=res.artifact,
        sha256=weights_sha256(Path(res.artifact)), files=folder_checksums(Path(res.artifact)), files_rule=CURRENT_RULE,
        method=rec.get("method", ""), params=params,
        provider=local, price=measured_price(run, name), evaluated=evaluated,
    )


LOCAL_DTYPES = ("float32", "float16", "bfloat16")


def evaluated_arithmetic(record: dict | None) -> ArithmeticSpec | None:
    """The dtype and kernels an evaluation record says its scores were computed on (None: no record)."""
    if not record or not record.get("dtype"):
        return None
    return ArithmeticSpec(dtype=record["dtype"], kernels=record.get("kernels") or {},
                          device="cuda" if record.get("device") == "cuda" else "cpu")


def served_arithmetic(dep: Deployment) -> tuple[Deployment, list[str]]:
    """The deployment on the arithmetic its gates were measured on, and what still differs (pure).

    In process: the local provider loads in the evaluated dtype with the same kernel rule
    (quantgate.kernels), so an `auto` dtype becomes the evaluated one and only an explicit other one
    differs. A started engine from a card row: its dtype flag must name the evaluated dtype (`auto`
    lets the engine pick, which is not a measured choice); one chosen with `--engine KIND` (no row
    measured it) is started in the evaluated dtype. Its kernels are the engine's own, as the card
    measured them (quality on the serving engine itself is not measured here).
    A running server someone else runs (openai) reports no arithmetic: nothing to compare."""
    ev = dep.evaluated
    if ev is None:
        return dep, []
    if dep.provider.kind == "local":
        p = dep.provider
        if p.dtype == "auto" and ev.dtype in LOCAL_DTYPES:
            p = p.model_copy(update={"dtype": ev.dtype})
            dep = dep.model_copy(update={"provider": p})
        return dep, [] if p.dtype in ("auto", ev.dtype) else [
            f"the in-process provider loads {p.dtype}; the gates were measured in {ev.dtype}"]
    e = dep.engine
    if e is None or not e.launched:
        return dep, []
    if e.dtype == "auto" and not (e.source or "").startswith("engine card"):
        # `--engine KIND` without a measured row: start it in the evaluated dtype rather than let it pick
        return dep.model_copy(update={"engine": e.model_copy(update={"dtype": ev.dtype})}), []
    if e.dtype != ev.dtype:
        return dep, [f"{e.kind} starts with --dtype {e.dtype}; the gates were measured in {ev.dtype} "
                     f"(set `dtype: {ev.dtype}` for this engine in the selection file and measure it again)"]
    return dep, []


def measured_price(run, name: str) -> PriceSpec | None:
    """What a million output tokens cost on the measured machine: the gateway's cost accounting."""
    usd = ((run.evaluation(name) or {}).get("metrics") or {}).get("usd_per_1m_output_tokens")
    if not isinstance(usd, (int, float)) or usd != usd or usd in (float("inf"), float("-inf")) or usd < 0:
        return None
    return PriceSpec(output_per_1m=round(float(usd), 6))


# the manifest's serving fields a promotion takes from the recipe; every other one is the live manifest's
RECIPE_OWNED = ("default_budget_ms", "max_budget_ms", "max_concurrency", "fallback")


def serving_for(run_dir: Path, active: str) -> ServingSpec:
    recipe, _, _ = open_run(run_dir)
    fallback_name = recipe.card.rollback_to or (recipe.baseline.name if recipe.baseline else None)
    fallback = None
    if fallback_name and fallback_name != active:  # served in process, like any candidate without an engine choice
        fb = deployment_for(run_dir, fallback_name)
        fallback = _validated(fb, {"kind": "transformers", "source": FALLBACK_ENGINE}, fb.provider.model_dump(),
                              FALLBACK_ENGINE)
    s = recipe.serving
    # anonymous: a new manifest serves on loopback without keys, as written in the file; the gateway
    # refuses to expose it on another address until serving.api_keys is added.
    return ServingSpec(default_budget_ms=s.default_budget_ms, max_budget_ms=s.max_budget_ms,
                       max_concurrency=s.max_concurrency, fallback=fallback, anonymous=True)


def engine_support(dep: Deployment, art: Artifact):
    """(engine kind, what the format table says) for the engine that serves `dep`."""
    if dep.engine is not None and (dep.engine.launched or dep.engine.info.provider == "local"):
        return dep.engine.kind, expected(dep.engine.kind, art, dep.engine.device)
    return dep.provider.kind, provider_support(dep.provider.kind, art, getattr(dep.provider, "device", "cpu"))


def go_live_check(run_dir: Path, name: str, dep: Deployment, serving: ServingSpec) -> dict:
    """The chapter's quantization go-live self-check, filled from the run's records."""
    _, _, run = open_run(run_dir)
    comp = run.comparison()
    verdict = next(c for c in comp["candidates"] if c["name"] == name)
    ev = run.evaluation(name) or {}
    q = candidate_record(dep.artifact) or {}
    art = artifact_of(name, dep)
    kind, support = engine_support(dep, art)
    fb = serving.fallback
    _, differs = served_arithmetic(dep)
    served_dtype = dep.engine.dtype if dep.engine and dep.engine.launched else getattr(dep.provider, "dtype", None)
    return {
        "engine_supports_format": {"engine": kind, "format": art.format, "ok": support.status == "yes",
                                   "support": support.status, "kernel": support.kernel, "why": support.reason},
        "arithmetic": {"evaluated": dep.evaluated.model_dump() if dep.evaluated else None,
                       "served_dtype": served_dtype, "ok": not differs, "why": "; ".join(differs) or None},
        "calibration": q.get("calibration"),
        "rollback_target": {"name": fb.name if fb else None, "present": fb is not None,
                            "verified": bool(fb and fb.sha256 and weights_sha256(Path(fb.artifact)) == fb.sha256)},
        "regression": {k: v for k, v in ((ev.get("quality") or {}).get("regression") or {}).items() if k != "cases"},
        "gates": verdict["gates"],
        "recovery": verdict.get("recovery"),
        "recommended": comp.get("recommended"),
    }


def gated_arithmetic(dep: Deployment, *, force: bool, reason: str) -> tuple[Deployment, list[str]]:
    """served_arithmetic, refused when something still differs unless forced with a reason."""
    dep, differs = served_arithmetic(dep)
    if differs and not force:
        raise PromotionRefused(f"'{dep.name}' would not be served on the arithmetic its gates were measured on: "
                               + "; ".join(differs) + "\npromote it anyway only with --force --reason \"...\"")
    if differs and not reason.strip():
        raise PromotionRefused("--force needs --reason \"...\": the history records why a deployment went live on "
                               "arithmetic its gates did not measure")
    return dep, differs


def artifact_of(name: str, dep: Deployment) -> Artifact:
    """The format-table view of a deployment's checkpoint (format, bits, group size, act-order, ...)."""
    q = candidate_record(dep.artifact) or {}
    return artifact_of_candidate(name, dep.artifact, {**q, "format": dep.params.get("format") or q.get("format")},
                                 read_json(Path(dep.artifact) / "config.json"))


FALLBACK_ENGINE = "the fallback: in-process transformers"
DEFAULT_ENGINE = ("default: in-process transformers (the engine card, if any, has no started pair of this candidate; "
                  "choose with --engine)")


def with_engine(dep: Deployment, choice, *, force: bool, reason: str) -> tuple[Deployment, dict]:
    """The deployment served by the chosen engine (an engines.serving.EngineChoice, or None for the
    in-process default), and what the evidence records about the choice. A choice the matrix saw fail,
    or the format table rules out, is refused unless forced with a reason."""
    if choice is None:  # deployment_for's in-process provider, now naming its engine
        return _validated(dep, {"kind": "transformers", "source": DEFAULT_ENGINE},
                          dep.provider.model_dump(), DEFAULT_ENGINE), {"source": DEFAULT_ENGINE}
    if choice.refused and not force:
        raise PromotionRefused(f"'{dep.name}' on {choice.engine['kind']} ({choice.source}) is refused: "
                               f"{choice.refused}\npromote it anyway only with --force --reason \"...\"")
    if choice.refused and not reason.strip():
        raise PromotionRefused("--force needs --reason \"...\": the history records why an engine the evidence "
                               "refuses went live")
    new = _validated(dep, choice.engine, choice.provider, choice.source)
    return new, {"source": choice.source, "kind": choice.engine["kind"], "refused_but_forced": choice.refused,
                 "notes": choice.notes}


def _validated(dep: Deployment, engine: dict, provider: dict, source: str) -> Deployment:
    try:
        return Deployment.model_validate({**dep.model_dump(by_alias=True), "engine": engine, "provider": provider})
    except ValidationError as exc:
        raise QuantgateError(f"the engine from {source} does not make a valid deployment: {exc}") from None


def candidate_deployment(run_dir: Path, name: str, *, force: bool = False, reason: str = "", engine_for=None):
    """A finished run's candidate as the deployment to serve, through its gates, its engine choice and its
    arithmetic check: (deployment, failed gates, evidence, the recipe's serving settings). promote and
    `promote --canary` both start here, so a challenger is refused for the same reasons a promotion is."""
    _, _, run = open_run(run_dir)
    comp = run.comparison()
    verdict = next((c for c in comp["candidates"] if c["name"] == name), None)
    if verdict is None:
        raise QuantgateError(f"candidate '{name}' is not in {run.compare_file}")
    failed = [g["reason"] for g in verdict["gates"] if not g["passed"]]
    if verdict.get("error"):
        failed.append(f"evaluation error: {verdict['error']}")
    refuse_failing(name, failed, force=force, reason=reason)
    if force and failed:
        # only passing candidates are registered by `run`; a forced one is registered now, so the
        # registry's champion and the manifest's active deployment stay the same model
        register_forced(run_dir, name, verdict, failed, reason)
    dep = deployment_for(run_dir, name)
    dep, engine_evidence = with_engine(dep, engine_for(artifact_of(name, dep)) if engine_for else None,
                                       force=force, reason=reason)
    dep, differs = gated_arithmetic(dep, force=force, reason=reason)
    if differs:
        engine_evidence["arithmetic_differs_but_forced"] = differs
    serving = serving_for(run_dir, name)
    evidence = {"run": str(run_dir), "engine": engine_evidence,
                "go_live_check": go_live_check(run_dir, name, dep, serving)}
    if "mlflow" in dep.params:
        evidence["mlflow"] = dep.params["mlflow"]
    return dep, failed, evidence, serving


def promote_candidate(run_dir: Path, name: str, manifest_path: Path, *, force: bool = False, reason: str = "",
                      by: str | None = None, engine_for=None) -> Manifest:
    """engine_for(artifact) → the engine choice (engines.serving.choose, wired by the CLI), or None."""
    _, _, run = open_run(run_dir)
    dep, failed, evidence, serving = candidate_deployment(run_dir, name, force=force, reason=reason,
                                                          engine_for=engine_for)

    def change(current):
        keep = serving
        if current is not None:  # guards tuned by hand in the live manifest survive a promotion:
            # only what the recipe owns is taken from it, so a new guard needs no change here
            keep = current.serving.model_copy(update={k: getattr(serving, k) for k in RECIPE_OWNED})
        return promote(current, dep, now=datetime.now(timezone.utc), by=by or getpass.getuser(), reason=reason,
                       failed_gates=failed, force=force, evidence=evidence, serving=keep)

    new = edit_manifest(manifest_path, change)
    move_aliases(new)
    log_card(run)
    return new


def canary_candidate(run_dir: Path, name: str, manifest_path: Path, steps: list[float], *, force: bool = False,
                     reason: str = "", by: str | None = None, engine_for=None, probe_every_s: float = 5.0,
                     **settings) -> Manifest:
    """`promote --canary`: the candidate as the challenger of a canary beside the active deployment, with the
    recipe's regression set as its probes; the active deployment (stable) stays the rollback target."""
    from .grading import load_cases
    from .serve.canary import start

    recipe, _, _ = open_run(run_dir)
    dep, failed, evidence, _ = candidate_deployment(run_dir, name, force=force, reason=reason, engine_for=engine_for)
    reg = recipe.evaluation.regression if recipe.evaluation else None
    if reg is not None and "probes" not in settings:
        settings["probes"] = {"cases": [c.model_dump() for c in load_cases(reg.path)], "max_tokens": reg.max_tokens,
                              "every_s": probe_every_s}
    why = reason or ("forced past: " + "; ".join(failed) if failed else "passed every gate")
    dep = dep.model_copy(update={"params": {**dep.params, "canary_evidence": evidence}})

    def change(current):
        if current is None:
            raise QuantgateError(f"{manifest_path}: no manifest yet; a canary needs a stable deployment to "
                                 "compare with: promote one first (without --canary)")
        return start(current, dep, steps, now=datetime.now(timezone.utc), by=by or getpass.getuser(), reason=why,
                     **settings)

    new = edit_manifest(manifest_path, change)
    log_canary(new)  # the alias `challenger` on its version while it runs
    return new


def canary_edit(manifest_path: Path, action: str, *, reason: str = "", by: str | None = None) -> Manifest:
    """`quantgate canary advance|abort` under the manifest's lock."""
    from .serve.canary import abort, advance

    if not manifest_path.is_file():
        raise QuantgateError(f"{manifest_path}: no such manifest")
    fn = {"advance": advance, "abort": abort}[action]
    new = edit_manifest(manifest_path, lambda cur: fn(cur, now=datetime.now(timezone.utc),
                                                      by=by or getpass.getuser(), reason=reason))
    log_canary(new)  # champion/previous on promotion (as move_aliases), the rollback tag on abort
    return new


def log_canary(m: Manifest) -> None:
    """The canary's steps, figures and outcome to the challenger's MLflow run (serve/canary_mlflow.py);
    a tracking hiccup is reported, not fatal: the manifest is the record, `quantgate canary log` copies it later."""
    from .serve.canary_mlflow import problem, sync

    try:
        sync(m)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: {problem(m, exc)}")


def log_card(run) -> None:
    """The run's engine card to its MLflow parent run (the card is usually made after `run` logged)."""
    tracking = run.tracking()
    if not run.engine_card.is_file() or not tracking or not tracking.get("parent_run_id"):
        return
    from .track import log_engine_card

    try:
        log_engine_card(with_credentials(tracking["uri"]), tracking["parent_run_id"], run.engine_card, run.engine_card_report)
    except Exception as exc:  # the manifest is the source of truth; a tracking hiccup is reported, not fatal
        print(redact_uri(f"warning: could not log the engine card to MLflow ({type(exc).__name__}: {exc})"))


def register_forced(run_dir: Path, name: str, verdict: dict, failed: list[str], reason: str) -> None:
    recipe, _, run = open_run(run_dir)
    tracking = run.tracking()
    if not tracking or name in (tracking.get("versions") or {}) or name not in (tracking.get("child_run_ids") or {}):
        return
    from .track import register_candidate

    art = next((r.artifact for r in run.quantize_results() if r.name == name), None)
    try:
        version = register_candidate(
            tracking["uri"], tracking["registered_model"], tracking["child_run_ids"][name], name,
            verdict.get("method", ""), recipe.recipe_hash, art, tracking["parent_run_id"],
            gates=f"promoted with --force ({reason or 'no reason given'}) despite failing: " + "; ".join(failed))
    except Exception as exc:  # the manifest stays the source of truth; say why the registry lags
        print(f"warning: could not register '{name}' in MLflow ({type(exc).__name__}: {exc})")
        return
    tracking.setdefault("versions", {})[name] = version
    run.write_tracking(tracking)


def rollback_manifest(manifest_path: Path, *, reason: str = "", by: str | None = None) -> Manifest:
    if not manifest_path.is_file():
        raise QuantgateError(f"{manifest_path}: no such manifest; promote a candidate first")

    def change(current):
        if current.previous:
            verify(current.previous[0])
        return rollback(current, now=datetime.now(timezone.utc), by=by or getpass.getuser(), reason=reason)

    new = edit_manifest(manifest_path, change)
    move_aliases(new)
    return new


def verify(dep: Deployment) -> None:
    """Refuse to restore a deployment whose weights changed or vanished since it was promoted."""
    if not dep.artifact or not dep.sha256:
        return  # remote or mock deployments carry no local weights to check
    folder = Path(dep.artifact)
    if not folder.is_dir():
        raise QuantgateError(f"rollback target '{dep.key}': {folder} no longer exists; restore it or edit the manifest")
    got = weights_sha256(folder)
    if got != dep.sha256:
        raise QuantgateError(f"rollback target '{dep.key}': checksum mismatch in {folder} "
                             f"(manifest {dep.sha256[:12]}…, on disk {got[:12]}…); refusing to serve changed weights")


def move_aliases(m: Manifest) -> None:
    """champion → the active deployment's registry version; previous → the next rollback target's."""
    reg = m.active.params.get("mlflow")
    if not reg:
        return
    from .track import set_aliases

    prev = next((d.params["mlflow"]["version"] for d in m.previous
                 if d.params.get("mlflow", {}).get("model") == reg["model"]), None)
    try:
        set_aliases(with_credentials(reg["uri"]), reg["model"], {"champion": reg["version"], "previous": prev})
    except Exception as exc:  # the manifest is the source of truth; a registry hiccup is reported, not fatal
        print(redact_uri(f"warning: could not move MLflow aliases ({type(exc).__name__}: {exc})"))


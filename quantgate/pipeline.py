"""The one place that wires the stages together: recipe → model → calibration → candidates.

Each stage writes a plain JSON record into the run folder before the next one starts, so a run
can be resumed, inspected and logged after the fact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .data import build_calibration
from .errors import QuantgateError
from .models import model_identity, resolve
from .quantize.runner import CandidateResult, needs_calibration, run_candidate
from .recipe import Recipe
from .util import atomic_write_json, atomic_write_text
from .validate import check_recipe


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        # absolute: records, manifests and worker processes must not depend on the current folder
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def run_dir(self, recipe: Recipe) -> Path:
        return self.root / "runs" / f"{recipe.name}-{recipe.recipe_hash[:12]}"


def select(recipe: Recipe, only: list[str] | None):
    if not only:
        return list(recipe.candidates)
    return [recipe.candidate(n) for n in only]  # raises with a suggestion for a typo


def prepare(recipe: Recipe, ws: Workspace, log=print) -> tuple[Path, dict, Path | None]:
    """Validate, resolve the model, build the calibration set; returns (model folder, meta, calib file)."""
    problems = check_recipe(recipe)
    if problems:
        raise QuantgateError("the recipe cannot run on this model:\n" + "\n".join(problems))
    run_dir = ws.run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    source = resolve(recipe.model.ref, revision=recipe.model.revision, progress=log)
    meta = {
        "recipe": recipe.name,
        "recipe_hash": recipe.recipe_hash,
        "model": {"ref": recipe.model.ref, "folder": str(source), "identity": model_identity(source)},
        "quantgate_version": __version__,
    }
    calib_file = None
    if any(needs_calibration(c) for c in recipe.candidates):
        calib_file = run_dir / "calibration.json"
        if calib_file.is_file():
            calib = json.loads(calib_file.read_text())
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source)
            cs = build_calibration(recipe.calibration, tok)
            calib = {**cs.describe(), "spec": recipe.calibration.model_dump(mode="json"), "windows": cs.windows}
            atomic_write_json(calib_file, calib)
            log(f"calibration: {cs.describe()['n_samples']} windows × {cs.seq_len} tokens "
                f"from {cs.per_source} (calib_hash {cs.calib_hash[:12]})")
        meta["calib_hash"] = calib["calib_hash"]
        meta["calibration"] = {k: v for k, v in calib.items() if k != "windows"}
    return source, meta, calib_file


def quantize(recipe: Recipe, ws: Workspace, *, only: list[str] | None = None, device: str = "cpu",
             force: bool = False, log=print, on_result=None) -> list[CandidateResult]:
    chosen = select(recipe, only)
    source, meta, calib_file = prepare(recipe, ws, log)
    results: list[CandidateResult] = []
    report = ws.run_dir(recipe) / "quantize.json"
    for spec in chosen:
        log(f"→ {spec.name} ({spec.method})")
        res = run_candidate(
            spec, source=source, calibration_file=calib_file if needs_calibration(spec) else None,
            artifacts=ws.artifacts, meta=meta, device=device, force=force, log=log,
        )
        results.append(res)
        # written after every candidate: an interrupted run keeps what it finished
        atomic_write_json(report, {"recipe": recipe.name, "recipe_hash": recipe.recipe_hash,
                                   "results": [r.to_dict() for r in results]})
        if on_result:
            on_result(res)
    return results


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ------------------------------------------------------------------------------ evaluate
def eval_key(recipe: Recipe, spec, artifact_record: dict) -> str:
    """What an evaluation result depends on: the artifact, the evaluation settings, the engine."""
    from .recipe import stable_hash

    return stable_hash({
        "artifact": artifact_record.get("candidate_key") or artifact_record.get("checksums"),
        "evaluation": recipe.evaluation.model_dump(mode="json", exclude={"engines"}),
        "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
    })


def prompt_texts(recipe: Recipe) -> list[str]:
    """Prompt text for the load test: the eval split of the workload's corpus (never calibration text)."""
    from .data import split_documents
    from .recipe import SourceSpec

    w = recipe.evaluation.workload
    if w is None or w.prompts_file:
        return []
    return [d.text for d in split_documents(SourceSpec(corpus=w.corpus), "eval")]


def evaluate(recipe: Recipe, ws: Workspace, *, only: list[str] | None = None, device: str = "cpu",
             force: bool = False, log=print) -> list[dict]:
    """Quantize (resuming) and evaluate each candidate in its own process; returns the records."""
    from .isolate import run_in_child

    results = quantize(recipe, ws, only=only, device=device, log=log)
    out_dir = ws.run_dir(recipe) / "evaluate"
    texts = prompt_texts(recipe)
    records = []
    for res in results:
        spec = recipe.candidate(res.name)
        path = out_dir / f"{res.name}.json"
        if res.status == "failed":
            records.append({"name": res.name, "method": res.method, "error": f"quantization failed: {res.error}"})
            continue
        key = eval_key(recipe, spec, res.record)
        # results are cached by what they depend on, not by recipe: editing the card or the
        # candidate list re-gates without re-measuring
        cached = ws.root / "evaluations" / f"{key[:32]}.json"
        if not force and cached.is_file():
            log(f"✓ {res.name}: already evaluated with these settings")
            rec = {**json.loads(cached.read_text()), "name": res.name}
            atomic_write_json(path, rec)
            records.append(rec)
            continue
        log(f"→ evaluating {res.name}")
        job = {
            "candidate": {"name": res.name, "method": res.method, "artifact": res.artifact},
            "evaluation": recipe.evaluation.model_dump(mode="json"),
            "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
            "device": device, "eval_key": key, "prompt_texts": texts,
        }
        got = run_in_child("quantgate.evaluate.worker", job, out_dir)
        if got.get("error"):
            rec = {"name": res.name, "method": res.method, "error": got["error"]}
        else:
            rec = got["record"]
            atomic_write_json(cached, rec)
            atomic_write_json(path, rec)
        records.append(rec)
    return records


def compare_run(recipe: Recipe, ws: Workspace, records: list[dict]):
    """Gate every candidate against the baseline; write compare.json and compare.md."""
    from .evaluate.compare import compare
    from .evaluate.report import comparison_markdown

    baseline = recipe.baseline
    if baseline is None:
        raise QuantgateError(f"recipe '{recipe.name}': comparing needs a baseline candidate (method: baseline)")
    rows = [{"name": r["name"], "method": r.get("method", ""), "metrics": r.get("metrics", {}), "error": r.get("error")}
            for r in records]
    if not any(r["name"] == baseline.name and not r["error"] for r in rows):
        raise QuantgateError(f"the baseline '{baseline.name}' has no evaluation; rerun `quantgate evaluate`")
    comp = compare(rows, baseline.name, recipe.card.gates)
    run_dir = ws.run_dir(recipe)
    atomic_write_json(run_dir / "compare.json", {"recipe": recipe.name, "recipe_hash": recipe.recipe_hash,
                                                 **comp.to_dict()})
    atomic_write_text(run_dir / "compare.md", comparison_markdown(recipe, comp, records))
    return comp


def load_records(recipe: Recipe, ws: Workspace) -> list[dict]:
    d = ws.run_dir(recipe) / "evaluate"
    records = []
    for c in recipe.candidates:
        p = d / f"{c.name}.json"
        records.append(json.loads(p.read_text()) if p.is_file()
                       else {"name": c.name, "method": c.method, "error": "not evaluated"})
    return records


# --------------------------------------------------------------------------------- track
def track(recipe: Recipe, ws: Workspace, *, uri: str | None = None, log=print):
    """Log the finished run (quantize.json, evaluate/*.json, compare.json) to MLflow."""
    from .track import log_run

    run_dir = ws.run_dir(recipe)
    for needed in ("quantize.json", "compare.json"):
        if not (run_dir / needed).is_file():
            raise QuantgateError(f"{run_dir / needed} is missing: run `quantgate run` (or evaluate) first")
    quantize_results = json.loads((run_dir / "quantize.json").read_text())["results"]
    comparison = json.loads((run_dir / "compare.json").read_text())
    return log_run(recipe, ws.root, run_dir, quantize_results=quantize_results, records=load_records(recipe, ws),
                   comparison=comparison, uri=uri, log=log)


def recipe_of_run(path: Path) -> tuple[Recipe, Workspace]:
    """A run folder (workspace/runs/NAME-HASH) → its recipe and workspace."""
    from .recipe import load_recipe

    path = Path(path)
    if not (path / "recipe.yaml").is_file():
        raise QuantgateError(f"{path}: not a run folder (no recipe.yaml); runs live in WORKSPACE/runs/")
    return load_recipe(path / "recipe.yaml"), Workspace(path.parents[1])

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

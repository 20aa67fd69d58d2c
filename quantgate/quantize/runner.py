"""Produce one candidate: resume, isolation, atomic artifact folder, and the candidate record.

Each candidate is quantized in a child process (`python -m quantgate.quantize.worker`): peak
memory is then the candidate's own, a crash in a native kernel loses only that candidate, and
the parent keeps going with the others. The artifact folder is named by a hash of everything
that determines its content, so the same candidate is never made twice.
"""

from __future__ import annotations

from pathlib import Path

from ..recipe import stable_hash
from ..workspace import CandidateResult, candidate_record


def needs_calibration(spec) -> bool:
    return spec.calibrated


def candidate_key(spec, model_id: str, calib_hash: str | None) -> str:
    """What an artifact's content depends on: the spec (not its name), the model, the calibration."""
    params = spec.model_dump(mode="json", exclude={"name", "engine"})
    return stable_hash({"spec": params, "model": model_id, "calib": calib_hash if needs_calibration(spec) else None})


def artifact_dir(artifacts: Path, spec, key: str) -> Path:
    return artifacts / f"{spec.method}-{key[:16]}"


def find_existing(folder: Path) -> dict | None:
    # a torn record cannot happen with atomic writes; an unreadable one counts as absent
    return candidate_record(folder)


def plan_candidate(spec, *, source: Path, calibration_file: Path | None, artifacts: Path, meta: dict,
                   device: str, force: bool = False, load: dict | None = None) -> tuple[Path, CandidateResult | dict]:
    """(artifact folder, the cached result) when it was already made, else (artifact folder, the
    worker's job). The job runs as `python -m quantgate.quantize.worker` (wherever the executor puts
    it) with `artifacts` as its working folder; `candidate_result` reads what it returned."""
    key = candidate_key(spec, meta["model"]["identity"], meta.get("calib_hash"))
    target = artifact_dir(artifacts, spec, key)
    if not force and (rec := find_existing(target)):
        return target, CandidateResult(spec.name, spec.method, "cached", str(target), record=rec)
    return target, {
        "spec": spec.model_dump(mode="json"),
        "source": str(source),
        "calibration_file": str(calibration_file) if calibration_file else None,
        "target": str(target),
        "device": device,
        "load": load or {},  # the recipe's trust_remote_code / allow_pickle, for every loader in the worker
        "meta": {**meta, "candidate_key": key},
    }


WORKER = "quantgate.quantize.worker"


def candidate_result(spec, target: Path, got: dict) -> CandidateResult:
    """The worker's {"record"} or {"error"} → the candidate's result."""
    if got.get("error"):
        return CandidateResult(spec.name, spec.method, "failed", error=got["error"])
    return CandidateResult(spec.name, spec.method, "done", str(target), record=got["record"])

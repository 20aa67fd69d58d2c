"""The workspace and its run folders: the one module that knows where every file lives.

    WORKSPACE/
      artifacts/<method>-<key>/          one folder per quantized candidate (candidate.json inside)
      evaluations/<eval key>.json        evaluation results cached by what they depend on
      runs/<recipe>-<recipe hash>/       one run folder per recipe version (RunFolder below)
      manifest.json                      the default serving manifest
      mlflow.db, mlartifacts/            the embedded MLflow store

Stages read and write their records through `RunFolder`; no other module spells a file name of
the run folder. Records are plain JSON so a run can be resumed, inspected and logged later; the
quantize stage's per-candidate record is typed (`CandidateResult`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import QuantgateError
from .util import atomic_write_json, atomic_write_text

CANDIDATE_RECORD = "candidate.json"  # inside each artifact folder


@dataclass
class CandidateResult:
    """One candidate's quantization outcome, as quantize.json lists it."""

    name: str
    method: str
    status: str  # done | cached | failed
    artifact: str | None = None
    error: str | None = None
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CandidateResult:
        return cls(**{k: d.get(k) for k in ("name", "method", "status", "artifact", "error")},
                   record=d.get("record") or {})


def read_json(path: Path) -> dict | None:
    """A record, or None when it is absent or unreadable (atomic writes never leave a torn one)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def candidate_record(folder: str | Path) -> dict | None:
    """The candidate.json of an artifact folder, or None."""
    return read_json(Path(folder) / CANDIDATE_RECORD)


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        # absolute: records, manifests and worker processes must not depend on the current folder
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def evaluation_cache(self, key: str) -> Path:
        return self.root / "evaluations" / f"{key[:32]}.json"

    @property
    def manifest(self) -> Path:
        """The default serving manifest."""
        return self.root / "manifest.json"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def run_dir(self, recipe) -> Path:
        return self.root / "runs" / f"{recipe.name}-{recipe.recipe_hash[:12]}"

    def run(self, recipe) -> RunFolder:
        return RunFolder(self.run_dir(recipe))


@dataclass(frozen=True)
class RunFolder:
    """One recipe run: what each stage wrote, and where."""

    path: Path

    # ------------------------------------------------------------------ where
    @property
    def workspace(self) -> Workspace:
        return Workspace(Path(self.path).parents[1])

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def calibration_file(self) -> Path:
        return self.path / "calibration.json"

    @property
    def quantize_file(self) -> Path:
        return self.path / "quantize.json"

    @property
    def compare_file(self) -> Path:
        return self.path / "compare.json"

    @property
    def compare_report(self) -> Path:
        return self.path / "compare.md"

    @property
    def tracking_file(self) -> Path:
        return self.path / "tracking.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def timings_file(self) -> Path:
        """Wall time of every step of every run of this folder (bench/main_job.py reads it)."""
        return self.path / "timings.json"

    def log_file(self, name: str, stage: str) -> Path:
        """Everything one worker printed (its libraries' banners, warnings, progress bars)."""
        return self.path / "logs" / f"{name}.{stage}.log"

    @property
    def evaluate_dir(self) -> Path:
        return self.path / "evaluate"

    def evaluation_file(self, name: str) -> Path:
        return self.evaluate_dir / f"{name}.json"

    @property
    def engines_dir(self) -> Path:
        return self.path / "engines"

    @property
    def engine_card(self) -> Path:
        return self.engines_dir / "card.json"

    @property
    def engine_card_report(self) -> Path:
        return self.engines_dir / "card.md"

    @property
    def engine_slo_rate_plot(self) -> Path:
        return self.engines_dir / "pareto-slo-rate.png"

    def engine_pair_file(self, engine: str, artifact: str) -> Path:
        return self.engines_dir / "pairs" / f"{engine}--{artifact}.json"

    def engine_report_file(self, slug: str) -> Path:
        return self.engines_dir / "reports" / f"{slug}.json"

    def engine_log_file(self, slug: str) -> Path:
        return self.engines_dir / "logs" / f"{slug}.log"

    @property
    def engines_tmp(self) -> Path:
        return self.engines_dir / "tmp"

    # ------------------------------------------------------------------ read / write
    def _require(self, path: Path) -> dict:
        got = read_json(path)
        if got is None:
            raise QuantgateError(f"{path} is missing: run `quantgate run` (or evaluate) on the recipe first")
        return got

    def write_recipe(self, recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_file, recipe.to_yaml())

    def recipe(self):
        from .recipe import load_recipe

        if not self.recipe_file.is_file():
            raise QuantgateError(f"{self.path}: not a run folder (no recipe.yaml); runs live in WORKSPACE/runs/")
        return load_recipe(self.recipe_file)

    def write_quantize(self, recipe, results: list[CandidateResult]) -> None:
        atomic_write_json(self.quantize_file, {"recipe": recipe.name, "recipe_hash": recipe.recipe_hash,
                                               "results": [r.to_dict() for r in results]})

    def quantize_results(self, required: bool = True) -> list[CandidateResult]:
        data = self._require(self.quantize_file) if required else (read_json(self.quantize_file) or {})
        return [CandidateResult.from_dict(r) for r in data.get("results", [])]

    def write_comparison(self, recipe, comparison: dict, markdown: str) -> None:
        atomic_write_json(self.compare_file, {"recipe": recipe.name, "recipe_hash": recipe.recipe_hash,
                                              **comparison})
        atomic_write_text(self.compare_report, markdown)

    def comparison(self, required: bool = True) -> dict | None:
        return self._require(self.compare_file) if required else read_json(self.compare_file)

    def add_timing(self, stage: str, candidate: str, wall_s: float, status: str, parts: dict | None = None,
                   cpu_s: float | None = None, node: str | None = None) -> None:
        """`node`: the Ray node the step ran on (absent for the local executor)."""
        data = read_json(self.timings_file) or {"stages": []}
        data["stages"].append({"stage": stage, "candidate": candidate, "wall_s": round(wall_s, 2), "status": status,
                               **({"cpu_s": round(cpu_s, 2)} if cpu_s is not None else {}),
                               **({"node": node} if node else {}),
                               **({"parts_s": parts} if parts else {})})
        atomic_write_json(self.timings_file, data)

    def write_tracking(self, tracking: dict) -> None:
        atomic_write_json(self.tracking_file, tracking)

    def tracking(self) -> dict:
        """What `track` recorded (MLflow uri, run ids, registry versions); {} before tracking."""
        return read_json(self.tracking_file) or {}

    def write_evaluation(self, name: str, record: dict) -> None:
        atomic_write_json(self.evaluation_file(name), record)

    def evaluation(self, name: str) -> dict | None:
        return read_json(self.evaluation_file(name))

    def write_engine_card(self, card: dict, markdown: str) -> None:
        atomic_write_json(self.engine_card, card)
        atomic_write_text(self.engine_card_report, markdown)


def open_run(path: str | Path):
    """A run folder (WORKSPACE/runs/NAME-HASH) → (its recipe, its workspace, the RunFolder)."""
    run = RunFolder(Path(path))
    return run.recipe(), run.workspace, run

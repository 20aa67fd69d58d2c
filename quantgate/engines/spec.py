"""What an engine-selection run asks for: which engines (and where their interpreters live), the
goal, the concurrency sweep, and GGUF files measured beside the recipe's candidates.

It is a YAML file beside the recipe (`<recipe>.engines.yaml`, or `quantgate engines RECIPE --config
FILE`), its fields at the top level or under `engine_selection:`. Engines run in their own Python environments, never
in quantgate's: `python` names that interpreter, else `$QUANTGATE_<KIND>_PYTHON`, else
`$QUANTGATE_ENGINES_HOME/<kind>-venv/bin/python` (default home: ~/.cache/quantgate/engines).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..documents import Spec, load_document
from ..engine_spec import EngineSpec
from ..workload import WorkloadSpec
from .ratesearch import grid, probes_needed


class ExtraArtifactSpec(Spec):
    """A checkpoint measured beside the candidates: a GGUF file, the bundled model's own GGUF, a
    GGUF converted from a candidate's folder with llama.cpp's convert_hf_to_gguf.py, or a
    checkpoint folder made elsewhere (a quantgate artifact with candidate.json, or any folder
    with config.json)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    gguf: str | None = Field(None, description="a .gguf path, or 'bundled:NAME' for the bundled model's GGUF")
    convert_from: str | None = Field(None, description="candidate whose folder is converted to GGUF")
    folder: str | None = Field(None, description="a checkpoint folder (safetensors + config.json)")
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "q8_0"

    @model_validator(mode="after")
    def _one_source(self) -> ExtraArtifactSpec:
        if sum(x is not None for x in (self.gguf, self.convert_from, self.folder)) != 1:
            raise ValueError(f"extra '{self.name}' needs exactly one of 'gguf', 'convert_from' or 'folder'")
        return self


class SweepSpec(Spec):
    """Concurrency levels tried in order, each a short closed-loop run of the same mix; the knee
    is the highest level whose requests still meet the SLOs."""

    levels: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    requests_per_level: int | None = Field(None, ge=1, description="default: 3 × level, at least 6")
    min_attainment: float = Field(0.95, gt=0, le=1, description="share of requests that must meet the SLOs")
    stop_after_miss: bool = Field(True, description="stop at the first level that misses")

    @model_validator(mode="after")
    def _increasing(self) -> SweepSpec:
        if any(b <= a for a, b in zip(self.levels, self.levels[1:])) or self.levels[0] < 1:
            raise ValueError("sweep.levels must be positive and strictly increasing, e.g. [1, 2, 4, 8]")
        return self


class SLORateSpec(Spec):
    """The search for the highest load a pair sustains within the SLOs (engines/ratesearch.py): a
    bisection over the grid low, low·growth, … high, each probe a short load test at one value. The
    answer is a grid value and the one above it that missed: exact to one step (× growth)."""

    axis: Literal["rate", "concurrency"] = Field(
        "rate", description="rate: open-loop arrivals at so many requests/s (the workload's burst shape, else "
                            "Poisson); concurrency: a closed loop with so many requests in flight")
    low: float = Field(0.25, gt=0, description="the lowest value probed (req/s, or requests in flight)")
    high: float = Field(16.0, gt=0, description="the highest value probed")
    growth: float = Field(1.25, gt=1, le=4, description="each grid value is the previous one times this")
    max_probes: int = Field(8, ge=1, le=32, description="load tests per pair, at most")
    requests: int | None = Field(None, ge=1, description="requests per probe (default: 4 × the value, at least 12)")
    in_flight_cap: int = Field(256, ge=1, description="rate axis: requests in flight at most, so the server's "
                                                       "queue (not the client's) shows an overload")

    @model_validator(mode="after")
    def _bounded(self) -> SLORateSpec:
        if self.high <= self.low:
            raise ValueError(f"slo_rate.high ({self.high:g}) must be above slo_rate.low ({self.low:g})")
        if self.axis == "concurrency" and self.low < 1:
            raise ValueError("slo_rate.low: a concurrency is at least 1")
        n = len(self.values)
        if probes_needed(n) > self.max_probes:
            raise ValueError(f"slo_rate.max_probes: the grid from {self.low:g} to {self.high:g} at growth "
                             f"{self.growth:g} has {n} values and needs {probes_needed(n)} probes to find the "
                             f"boundary to one step; raise max_probes to {probes_needed(n)}, raise growth or "
                             "narrow low/high")
        return self

    @property
    def values(self) -> list[float]:
        return grid(self.low, self.high, self.growth, integer=self.axis == "concurrency")

    def requests_at(self, value: float) -> int:
        return self.requests or max(12, math.ceil(4 * value))


class EngineSelectionSpec(Spec):
    goal: Literal["latency", "throughput", "cost"] = Field(
        "latency", description="latency: lowest P95 TTFT/E2E within the SLOs; throughput: most goodput at the "
                               "highest SLO rate (else the knee); cost: fewest $ per 1M output tokens there")
    engines: dict[str, EngineSpec] = Field(default_factory=lambda: {"transformers": EngineSpec(kind="transformers")},
                                           min_length=1)
    candidates: list[str] | None = Field(None, description="which candidates (default: all)")
    extra: list[ExtraArtifactSpec] = Field(default_factory=list)
    workload: WorkloadSpec | None = Field(None, description="default: evaluation.workload")
    sweep: SweepSpec | None = Field(default_factory=SweepSpec)
    slo_rate: SLORateSpec | Literal[False] | None = Field(
        None, description="search each pair's highest load within the SLOs (default: searched with the "
                          "default settings when the goal is throughput or cost, not for latency; false: never)")
    probe_unsupported: bool = Field(
        True, description="start launched engines (vllm, llamacpp) on pairs the table marks unsupported anyway, "
                          "to record the engine's own message (they fail fast)")
    serve_port: int = Field(8000, ge=1, le=65535, description="port the recommended engine serves on")
    gguf_converter: str | None = Field(
        None, description="llama.cpp's convert_hf_to_gguf.py (default: $QUANTGATE_GGUF_CONVERTER, else "
                          "$QUANTGATE_ENGINES_HOME/llama.cpp/); it runs in the llama.cpp engine's interpreter")

    @property
    def rate_search(self) -> SLORateSpec | None:
        """The search to run: the one given, else the default one where the goal ranks on it."""
        if self.slo_rate is False:
            return None
        if self.slo_rate is not None:
            return self.slo_rate
        return SLORateSpec() if self.goal in ("throughput", "cost") else None

    @model_validator(mode="after")
    def _running_servers_named(self) -> EngineSelectionSpec:
        for name, e in self.engines.items():
            if e.kind == "openai" and not e.base_url:
                raise ValueError(f"engines.{name}: an 'openai' engine is a running server: give base_url "
                                 "(and model, serves)")
        return self


# ------------------------------------------------------------------------------- loading
def load_selection(path: str | Path) -> EngineSelectionSpec:
    """An EngineSelectionSpec from YAML: the mapping itself or one under `engine_selection:`."""
    return load_document(path, EngineSelectionSpec, name="engine-selection", unwrap="engine_selection",
                         shape="a mapping (goal, engines, sweep, ...)")


def selection_for(recipe, path: str | Path | None = None) -> EngineSelectionSpec:
    """The selection to run: the file given, else the recipe's own evaluation engines with the
    default goal and sweep."""
    if path is not None:
        return load_selection(path)
    engines = {}
    for name, e in recipe.evaluation.engines.items():
        if e.kind == "openai":
            engines[name] = EngineSpec(kind="openai", base_url=e.base_url or "", model=e.model, threads=e.threads)
        else:
            engines[name] = EngineSpec(kind="transformers", threads=e.threads)
    return EngineSelectionSpec(engines=engines)


# ------------------------------------------------------------------------ interpreters
def engines_home() -> Path:
    env = os.environ.get("QUANTGATE_ENGINES_HOME")
    if env:
        return Path(env).expanduser()
    root = Path(os.environ.get("QUANTGATE_CACHE") or Path.home() / ".cache" / "quantgate")
    return root / "engines"


def engine_python(kind: str, spec: EngineSpec | None = None) -> tuple[Path, str]:
    """(the interpreter to start `kind` with, where that choice came from). Not checked here."""
    if spec is not None and spec.python:
        return Path(spec.python).expanduser(), "the engine's `python` setting"
    var = f"QUANTGATE_{kind.upper()}_PYTHON"
    if os.environ.get(var):
        return Path(os.environ[var]).expanduser(), f"${var}"
    return engines_home() / f"{kind}-venv" / "bin" / "python", "the default location ($QUANTGATE_ENGINES_HOME)"


def gguf_converter(selection: EngineSelectionSpec) -> tuple[str, str] | None:
    """(interpreter, convert_hf_to_gguf.py) for conversions, or None when no converter is set."""
    script = selection.gguf_converter or os.environ.get("QUANTGATE_GGUF_CONVERTER")
    if not script:
        default = engines_home() / "llama.cpp" / "convert_hf_to_gguf.py"  # the sdist's vendor/llama.cpp
        if not default.is_file():
            return None
        script = str(default)
    llama = next((e for e in selection.engines.values() if e.kind == "llamacpp"), None)
    python, _ = engine_python("llamacpp", llama)
    return str(python), str(Path(script).expanduser())

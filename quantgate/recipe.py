"""Recipes: the YAML document that drives a whole run, as typed pydantic models.

A recipe composes specs owned by the stages: the model to start from, the calibration set, the
candidates to produce, and optional sections (evaluation, trade-off card, serving) that later
stages read. Loading validates everything before any work starts; errors name the file, the
line and the field, and suggest the nearest valid name for a typo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from .documents import Spec, load_document, omitted_while_unset, suggest
from .errors import RecipeError
from .workload import WorkloadSpec

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
Dtype = Literal["float32", "float16", "bfloat16"]


# ----------------------------------------------------------------------------------- model
class ModelSpec(Spec):
    ref: str = Field(
        DEFAULT_MODEL,
        description="'bundled:NAME', 'hf:org/name[@revision]', or a local folder path",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = Field(
        False, description="also load .bin/.pt weights; off: only safetensors are loaded"
    )


# ----------------------------------------------------------------------------- calibration
class SourceSpec(Spec):
    """One calibration source: exactly one of corpus, path or hf."""

    corpus: str | None = Field(None, description="a bundled corpus, e.g. gutenberg, britannica")
    path: str | None = Field(None, description="a local .txt or .jsonl file (or folder of them)")
    hf: str | None = Field(None, description="a Hugging Face dataset id (needs the hub)")
    config: str | None = None
    split: str = "train"
    field: str = "text"
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceSpec":
        given = [k for k in ("corpus", "path", "hf") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "a calibration source needs exactly one of 'corpus', 'path' or 'hf'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def label(self) -> str:
        return self.corpus or self.path or f"hf:{self.hf}"


class CalibrationSpec(Spec):
    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(corpus="gutenberg"), SourceSpec(corpus="britannica")],
        min_length=1,
    )
    n_samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=16, le=131_072)
    seed: int = 0
    chat_template: bool = Field(
        False, description="wrap each window's text in the model's chat template"
    )


# ------------------------------------------------------------------------------ candidates
Bits = Literal[2, 3, 4, 8]


class _CandidateBase(Spec):
    calibrated: ClassVar[bool] = False  # needs the calibration set (part of the artifact key when True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    engine: str = Field("transformers", description="which of evaluation.engines measures this candidate")


class BaselineSpec(_CandidateBase):
    """The unquantized model, saved in the chosen dtype: every comparison is against it."""

    method: Literal["baseline"]
    dtype: Dtype = "float16"


class _WeightQuantBase(_CandidateBase):
    bits: Bits = 4
    group_size: int = Field(128, description="columns per quantization group; -1 = per-channel")
    sym: bool = True
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="module name patterns left unquantized",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return _check_group_size(v)


def _check_group_size(v: int) -> int:
    if v == -1 or (v > 0 and v & (v - 1) == 0 and v >= 16):
        return v
    raise ValueError("group_size must be -1 (per-channel) or a power of two ≥ 16, e.g. 64 or 128")


class RTNSpec(_WeightQuantBase):
    """Round-to-nearest: the papers' baseline, no calibration data."""

    method: Literal["rtn"]
    backend: Literal["quantgate"] = "quantgate"


class _CalibratedBase(_WeightQuantBase):
    calibrated: ClassVar[bool] = True

    n_samples: int | None = Field(
        None, ge=1, description="use only the first N calibration windows (AWQ's search is costly on CPU)"
    )


class GPTQSpec(_CalibratedBase):
    method: Literal["gptq"]
    act_order: bool = Field(True, description="quantize columns in order of Hessian diagonal")
    damp_percent: float = Field(0.01, gt=0, lt=1)
    true_sequential: bool = True
    backend: Literal["gptqmodel", "llmcompressor"] = "gptqmodel"


class AWQSpec(_CalibratedBase):
    method: Literal["awq"]
    sym: bool = False
    backend: Literal["gptqmodel", "llmcompressor"] = "gptqmodel"


class BudgetSpec(Spec):
    """What a mixed candidate may spend: exactly one of a checkpoint size or an average weight width."""

    size_mb: float | None = Field(None, gt=0, description="the checkpoint's weights (safetensors), in MB (1e6 bytes)")
    bits: float | None = Field(None, gt=0, description="average bits per weight of the quantizable linears")

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetSpec":
        if (self.size_mb is None) == (self.bits is None):
            raise ValueError("a budget needs exactly one of 'size_mb' or 'bits', e.g. {size_mb: 130} or {bits: 4.5}")
        return self

    @property
    def kind(self) -> str:
        return "size_mb" if self.size_mb is not None else "bits"

    @property
    def value(self) -> float:
        return self.size_mb if self.size_mb is not None else self.bits


class W8A8Spec(_CandidateBase):
    """INT8 weights and activations (compressed-tensors W8A8): SmoothQuant moves activation outliers
    into the weights, GPTQ quantizes the weights per output channel, activations are quantized per
    token at run time. Through llm-compressor; vLLM serves it with INT8 GEMMs."""

    calibrated: ClassVar[bool] = True

    method: Literal["w8a8"]
    smoothing_strength: float = Field(0.8, gt=0, lt=1, description="SmoothQuant's migration strength (alpha)")
    damp_percent: float = Field(0.01, gt=0, lt=1)
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module name patterns left unquantized")
    n_samples: int | None = Field(None, ge=1, description="use only the first N calibration windows")
    backend: Literal["llmcompressor"] = "llmcompressor"


class FP8Spec(_CandidateBase):
    """FP8 (E4M3) weights per output channel and activations per token, scaled at run time
    (compressed-tensors FP8_DYNAMIC): no calibration data. vLLM serves it on GPUs only."""

    method: Literal["fp8"]
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module name patterns left unquantized")
    backend: Literal["llmcompressor"] = "llmcompressor"


MIXED_BITS = {"rtn": (2, 4, 8, 16), "gptq": (2, 3, 4, 8, 16), "awq": (4, 16)}  # 16: left unquantized


class MixedSpec(_CandidateBase):
    """Each linear unit at the precision it can bear: the bits per unit that minimise the predicted
    loss increase (a per-layer sensitivity, measured once per model and calibration) within a budget."""

    calibrated: ClassVar[bool] = True

    method: Literal["mixed"]
    choices: list[int] = Field(default_factory=lambda: [4, 8, 16], min_length=2,
                               description="bit widths a unit may get; 16 leaves it unquantized")
    budget: BudgetSpec
    algorithm: Literal["gptq", "rtn", "awq"] = "gptq"
    group_size: int = Field(128, description="columns per quantization group; -1 = per-channel")
    sym: bool = True
    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module name patterns left unquantized")
    act_order: bool = Field(True, description="gptq: quantize columns in order of Hessian diagonal")
    damp_percent: float = Field(0.01, gt=0, lt=1)
    n_samples: int | None = Field(None, ge=1, description="calibration windows the algorithm uses (default: all)")
    sensitivity_samples: int = Field(8, ge=1, description="calibration windows the sensitivity pass uses")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return _check_group_size(v)

    @model_validator(mode="after")
    def _choices_fit_algorithm(self) -> "MixedSpec":
        allowed = MIXED_BITS[self.algorithm]
        bad = sorted({b for b in self.choices if b not in allowed})
        if bad:
            raise ValueError(f"choices {bad} are not widths {self.algorithm} can write; it takes "
                             f"{', '.join(map(str, allowed))} (16 = unquantized)")
        if len(set(self.choices)) < 2:
            raise ValueError("choices needs at least two different widths, e.g. [4, 8, 16]")
        return self


# every method a candidate can name; the lists below are derived from it, never repeated
CANDIDATE_CLASSES = (BaselineSpec, RTNSpec, GPTQSpec, AWQSpec, MixedSpec, W8A8Spec, FP8Spec)
CandidateSpec = Annotated[Union[CANDIDATE_CLASSES], Field(discriminator="method")]
SPEC_BY_METHOD = {get_args(cls.model_fields["method"].annotation)[0]: cls for cls in CANDIDATE_CLASSES}
METHODS = tuple(SPEC_BY_METHOD)
QUANT_METHODS = tuple(m for m in METHODS if m != "baseline")


# ------------------------------------------------------------------------------ evaluation
class PerplexitySpec(Spec):
    corpus: str = Field("britannica", description="bundled corpus whose eval split is measured")
    path: str | None = Field(None, description="or: local text (its eval split by the same rule)")
    seq_len: int = Field(512, ge=16)
    max_windows: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)


class LMEvalSpec(Spec):
    tasks: list[str] = Field(default_factory=list, description="bundled qg_* tasks or any lm-eval task name")
    limit: int | None = Field(None, ge=1, description="documents per task (None: all)")
    batch_size: int = Field(4, ge=1)
    num_fewshot: int | None = None


class RegressionSpec(Spec):
    path: str = Field(..., description="JSONL of prompts with checks (contains, regex, exact, length)")
    max_tokens: int = Field(64, ge=1)


class OfflineSpec(Spec):
    prompt_tokens: int = Field(256, ge=1)
    output_tokens: int = Field(32, ge=2)
    repeats: int = Field(3, ge=1)


class EvaluationClientSpec(Spec):
    """Which load-test client measures a candidate's speed (evaluate/clients/): in-process
    transformers, or an OpenAI-compatible server. The recipe field keeps its name,
    `evaluation.engines`, so recipes and their hashes stay as they are."""

    kind: Literal["transformers", "openai"] = "transformers"
    base_url: str | None = None
    model: str | None = None
    threads: int | None = Field(None, ge=1)


class CostSpec(Spec):
    """Either what the machine costs per hour, or a hosted API's per-token prices."""

    usd_per_hour: float | None = Field(None, ge=0)
    usd_per_1m_input_tokens: float | None = Field(None, ge=0)
    usd_per_1m_output_tokens: float | None = Field(None, ge=0)


class EvaluationSpec(Spec):
    dtype: Dtype | None = Field(
        None, description="the one dtype every candidate is loaded and scored in (default: the baseline's dtype, "
                          "else model.dtype, else float32); see Recipe.evaluation_dtype")
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    lm_eval: LMEvalSpec | None = None
    regression: RegressionSpec | None = None
    offline: OfflineSpec | None = Field(default_factory=OfflineSpec)
    workload: WorkloadSpec | None = Field(default_factory=lambda: WorkloadSpec(requests=8, concurrency=2))
    engines: dict[str, EvaluationClientSpec] = Field(default_factory=lambda: {"transformers": EvaluationClientSpec()})
    cost: CostSpec = Field(default_factory=lambda: CostSpec(usd_per_hour=0.10))

    # a recipe that does not set evaluation.dtype keeps the dump (and so the recipe hash) it had before
    # the field existed; the resolved dtype enters the evaluation key instead
    _stable_dump = omitted_while_unset("dtype")


class GateSpec(Spec):
    """One rule of the trade-off card: exactly one of min, max, min_recovery, max_ratio."""

    metric: str
    min: float | None = None
    max: float | None = None
    min_recovery: float | None = Field(None, gt=0, description="keep at least this share of the baseline's quality")
    max_ratio: float | None = Field(None, gt=0, description="at most this multiple of the baseline's value")

    @model_validator(mode="after")
    def _one_rule(self) -> "GateSpec":
        given = [k for k in ("min", "max", "min_recovery", "max_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a gate needs exactly one of 'min', 'max', 'min_recovery', 'max_ratio'")
        return self

    @property
    def threshold(self) -> float:
        return next(v for v in (self.min, self.max, self.min_recovery, self.max_ratio) if v is not None)

    @property
    def rule(self) -> str:
        k = next(k for k in ("min", "max", "min_recovery", "max_ratio") if getattr(self, k) is not None)
        return f"{k} {self.threshold:g}"


DEFAULT_COST_TOLERANCE = 0.05  # costs this close to the cheapest are a tie, won by the smaller model


class TradeoffCardSpec(Spec):
    """The chapter's trade-off card: targets in words, gates as rules, the rollback target."""

    quality: str | None = Field(None, description="which tasks must stay accurate, which may degrade")
    latency: str | None = None
    cost: str | None = None
    gates: list[GateSpec] = Field(default_factory=list)
    rollback_to: str | None = Field(None, description="candidate served on rollback (default: the baseline)")
    cost_tolerance: float | None = Field(
        None, ge=0, le=1,
        description="passing candidates whose cost is within this fraction of the cheapest count as equally "
                    f"cheap, and the smallest of them is recommended (default {DEFAULT_COST_TOLERANCE}): a short "
                    "load test cannot tell a few percent apart")

    _stable_dump = omitted_while_unset("cost_tolerance")  # a card without one hashes as before the field

    @property
    def cost_tolerance_or_default(self) -> float:
        return DEFAULT_COST_TOLERANCE if self.cost_tolerance is None else self.cost_tolerance


class TrackingSpec(Spec):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a sqlite store in the workspace")
    experiment: str | None = Field(None, description="default: quantgate/<recipe name>")
    registered_model: str | None = Field(None, description="registry name for passing candidates; default: the recipe name")
    log_checkpoints: bool = Field(False, description="upload whole checkpoints as run artifacts (large)")


class ServingDefaultsSpec(Spec):
    """What the recipe proposes for the serving manifest's budgets when a candidate is promoted
    (deploy.RECIPE_OWNED). Not the manifest's ServingSpec (serve/manifest.py), which owns every
    live guard: these defaults suit a recipe's measured candidate on the machine it was measured
    on (a tighter 30 s budget ceiling, 8 in flight), and changing them would move every recipe
    hash, so the two keep their own defaults and their own names."""

    default_budget_ms: int = Field(2000, gt=0)
    max_budget_ms: int = Field(30_000, gt=0)
    max_concurrency: int = Field(8, gt=0)


# -------------------------------------------------------------------------------- executor
class TaskResourcesSpec(Spec):
    """What one candidate's step asks the cluster for (Ray's num_cpus, num_gpus, memory)."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float | None = Field(None, ge=0, description="default: 1 when the run's device is cuda, else 0")
    memory_gb: float | None = Field(None, gt=0, description="memory Ray reserves for the step; default: none")


class StageResourcesSpec(Spec):
    quantize: TaskResourcesSpec = Field(default_factory=TaskResourcesSpec)
    evaluate: TaskResourcesSpec = Field(default_factory=TaskResourcesSpec)


class ExecutorSpec(Spec):
    """Where each candidate's quantize and evaluate steps run. Not part of the recipe hash or of any
    artifact or evaluation key: the same recipe gives the same run folder and artifacts on either."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="ray: 'auto', 'ray://HOST:PORT' or 'HOST:PORT'; "
                                                  "default: $RAY_ADDRESS, else a Ray started for this run")
    resources: StageResourcesSpec = Field(default_factory=StageResourcesSpec)
    candidates: dict[str, StageResourcesSpec] = Field(
        default_factory=dict, description="per-candidate resources, replacing `resources` for that candidate")


# ---------------------------------------------------------------------------------- recipe
class Recipe(Spec):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    candidates: list[CandidateSpec] = Field(..., min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    card: TradeoffCardSpec = Field(default_factory=TradeoffCardSpec)
    serving: ServingDefaultsSpec = Field(default_factory=ServingDefaultsSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    executor: ExecutorSpec | None = None

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v  # `executor: ray`

    _stable_dump = omitted_while_unset("executor")  # a recipe without one dumps exactly as before the field
    _source: str | None = PrivateAttr(None)  # the file it was loaded from, if any

    @property
    def source(self) -> str | None:
        return self._source

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        seen: set[str] = set()
        for c in self.candidates:
            if c.name in seen:
                raise ValueError(f"candidate name '{c.name}' is used twice; names must be unique")
            seen.add(c.name)
            if c.engine not in self.evaluation.engines:
                raise ValueError(f"candidate '{c.name}' names engine '{c.engine}', which evaluation.engines "
                                 f"does not define (defined: {', '.join(self.evaluation.engines)})"
                                 + suggest(c.engine, self.evaluation.engines))
        if self.card.rollback_to and self.card.rollback_to not in seen:
            raise ValueError(f"card.rollback_to '{self.card.rollback_to}' is not a candidate"
                             + suggest(self.card.rollback_to, seen))
        for name in (self.executor.candidates if self.executor else {}):
            if name not in seen:
                raise ValueError(f"executor.candidates names '{name}', which is not a candidate" + suggest(name, seen))
        if sum(c.method == "baseline" for c in self.candidates) > 1:
            raise ValueError("a recipe has at most one baseline candidate: every comparison is against it")
        return self

    # ---------------------------------------------------------------- identity and access
    @property
    def recipe_hash(self) -> str:
        """Stable over key order, comments and formatting; changes with any setting except where the
        steps run (`executor`): a run moves between executors and keeps its folder and artifacts."""
        return stable_hash(self.model_dump(mode="json", exclude={"description", "executor"}))

    def candidate(self, name: str):
        for c in self.candidates:
            if c.name == name:
                return c
        raise RecipeError(
            f"recipe '{self.name}' has no candidate '{name}'"
            + suggest(name, [c.name for c in self.candidates])
            + f"; candidates: {', '.join(c.name for c in self.candidates)}"
        )

    @property
    def baseline(self) -> BaselineSpec | None:
        return next((c for c in self.candidates if c.method == "baseline"), None)

    @property
    def evaluation_dtype(self) -> str:
        """The one dtype every candidate is evaluated in, so they compete on the same arithmetic: the
        recipe's evaluation.dtype, else the baseline's (every comparison is against it), else the
        model's declared dtype, else float32. Checkpoints carry their own dtype (GPTQModel saves
        bfloat16, RTN float16, a baseline what it was asked for); loading each in its own would
        compare dtypes as much as methods."""
        if self.evaluation.dtype:
            return self.evaluation.dtype
        if self.baseline is not None:
            return self.baseline.dtype
        return self.model.dtype if self.model.dtype != "auto" else "float32"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return load_recipe(path)


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path) -> Recipe:
    recipe = load_document(path, Recipe, error=RecipeError, name="recipe",
                           shape="a YAML mapping with at least 'name' and 'candidates'",
                           hint=" (recipes/ holds examples)")
    recipe._source = str(path)  # so the checks before a run can name the file (not part of any hash)
    return recipe

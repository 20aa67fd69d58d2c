"""The narrow interface every quantization method implements, and the lazy backend table.

A Quantizer takes a candidate spec, the source model folder and (if it needs one) the
calibration set, and writes a standard checkpoint into an output folder. Everything else —
hashing, resume, atomic folders, the candidate record — is the runner's job, not the method's.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from ..allocation import skip_matcher  # noqa: F401  (the quantizers' import of it)
from ..errors import MissingExtraError, QuantgateError


class Progress(Protocol):
    def iter(self, items: Iterable, label: str) -> Iterable: ...
    def log(self, msg: str) -> None: ...


class PlainProgress:
    """Progress that just logs; the CLI swaps in a rich progress bar."""

    def __init__(self, log: Callable[[str], None] = print):
        self._log = log

    def iter(self, items, label):
        return items

    def log(self, msg):
        self._log(msg)


@dataclass
class QuantizeContext:
    source: Path  # a folder with config.json, tokenizer and safetensors
    calibration: list[list[int]] | None
    device: str = "cpu"
    progress: Progress = field(default_factory=PlainProgress)
    trust_remote_code: bool = False  # recipe model.trust_remote_code: run the checkpoint's own code
    allow_pickle: bool = False       # recipe model.allow_pickle: also read .bin/.pt (pickle) weights
    # what a cache shared between candidates is keyed on (the sensitivity of mixed candidates), and where
    model_identity: str | None = None
    calib_hash: str | None = None
    artifacts: Path | None = None

    def load_kwargs(self) -> dict:
        """What every loader of the source model is given, so the recipe's choices hold everywhere."""
        return {"trust_remote_code": self.trust_remote_code,
                "use_safetensors": None if self.allow_pickle else True}


@dataclass
class QuantizeOutcome:
    format: str  # checkpoint format written: gptq, gptq_v2, awq-gemm, compressed-tensors, dense
    quantized_modules: int = 0
    backend_versions: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # method-specific entries for candidate.json (a mixed bit map)


class Quantizer(Protocol):
    name: str

    def quantize(self, spec, ctx: QuantizeContext, out: Path) -> QuantizeOutcome: ...


# (method, backend) → "module:Class"; modules import their heavy libraries only when used.
BACKENDS: dict[tuple[str, str], tuple[str, str]] = {
    ("baseline", "quantgate"): ("quantgate.quantize.baseline:BaselineQuantizer", "models"),
    ("rtn", "quantgate"): ("quantgate.quantize.rtn:RTNQuantizer", "models"),
    ("gptq", "gptqmodel"): ("quantgate.quantize.gptqmodel_backend:GPTQModelQuantizer", "gptqmodel"),
    ("awq", "gptqmodel"): ("quantgate.quantize.gptqmodel_backend:GPTQModelQuantizer", "gptqmodel"),
    ("gptq", "llmcompressor"): ("quantgate.quantize.llmcompressor_backend:LLMCompressorQuantizer", "llmcompressor"),
    ("awq", "llmcompressor"): ("quantgate.quantize.llmcompressor_backend:LLMCompressorQuantizer", "llmcompressor"),
    ("mixed", "quantgate"): ("quantgate.quantize.mixed:MixedQuantizer", "models"),
    ("w8a8", "llmcompressor"): ("quantgate.quantize.llmcompressor_backend:LLMCompressorQuantizer", "llmcompressor"),
    ("fp8", "llmcompressor"): ("quantgate.quantize.llmcompressor_backend:LLMCompressorQuantizer", "llmcompressor"),
}


def backend_of(spec) -> str:
    return getattr(spec, "backend", "quantgate")


def get_quantizer(spec) -> Quantizer:
    key = (spec.method, backend_of(spec))
    if key not in BACKENDS:
        raise QuantgateError(f"candidate '{spec.name}': no backend '{key[1]}' for method '{key[0]}'")
    target, extra = BACKENDS[key]
    mod_name, cls_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except MissingExtraError:
        raise
    except ImportError as exc:
        raise MissingExtraError(f"the {key[1]} backend for {key[0]}", extra, exc.name or mod_name) from exc
    return getattr(mod, cls_name)()


# ---------------------------------------------------------------- module selection helpers
LAYER_LINEAR = re.compile(r"^(.*\.layers\.\d+\..*(?:proj|fc\d?|dense|linear)[^.]*)\.weight$")


def layer_linears(state: dict) -> list[str]:
    """Names of the decoder layers' linear modules in a state dict (what weight-only PTQ quantizes)."""
    return [m.group(1) for k in state if (m := LAYER_LINEAR.match(k)) and state[k].dim() == 2]

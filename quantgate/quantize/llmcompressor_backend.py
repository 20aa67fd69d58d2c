"""GPTQ, AWQ, W8A8 (SmoothQuant + GPTQ, INT8) and FP8-dynamic through llm-compressor, written as
compressed-tensors (vLLM's native format).

An optional extra (`pip install 'quantgate[llmcompressor]'`). Known limit: llm-compressor's AWQ
calls `pin_memory()` unconditionally and fails without an accelerator, so AWQ here needs CUDA;
GPTQ, W8A8 and FP8 run on CPU too (FP8 is only *served* on GPUs: formats.RULES).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QuantgateError, require
from ..models import copy_tokenizer
from .base import QuantizeContext, QuantizeOutcome


def scheme(spec) -> dict:
    """compressed-tensors config group for a candidate spec (pure: tested without the library)."""
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
               "strategy": "channel" if spec.group_size == -1 else "group"}
    if spec.group_size != -1:
        weights["group_size"] = spec.group_size
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def modifier_kwargs(spec) -> dict:
    kw = {"config_groups": scheme(spec), "ignore": list(spec.skip)}
    if spec.method == "gptq":
        kw.update(dampening_frac=spec.damp_percent, actorder="static" if spec.act_order else None)
    return kw


MODIFIERS = {  # name → where llm-compressor keeps it
    "GPTQModifier": "llmcompressor.modifiers.quantization:GPTQModifier",
    "QuantizationModifier": "llmcompressor.modifiers.quantization:QuantizationModifier",
    "AWQModifier": "llmcompressor.modifiers.awq:AWQModifier",
    "SmoothQuantModifier": "llmcompressor.modifiers.smoothquant:SmoothQuantModifier",
}


def modifiers(spec) -> list[tuple[str, dict]]:
    """The llm-compressor recipe for a candidate: (modifier name, its arguments), in order (pure)."""
    if spec.method == "w8a8":  # smooth first: the scales it folds into the weights are what GPTQ then sees
        return [("SmoothQuantModifier", {"smoothing_strength": spec.smoothing_strength}),
                ("GPTQModifier", {"scheme": "W8A8", "targets": ["Linear"], "ignore": list(spec.skip),
                                  "dampening_frac": spec.damp_percent})]
    if spec.method == "fp8":
        return [("QuantizationModifier", {"scheme": "FP8_DYNAMIC", "targets": ["Linear"], "ignore": list(spec.skip)})]
    return [("GPTQModifier" if spec.method == "gptq" else "AWQModifier", modifier_kwargs(spec))]


def _modifier(name: str, kwargs: dict):
    import importlib

    mod, attr = MODIFIERS[name].split(":")
    return getattr(importlib.import_module(mod), attr)(**kwargs)


class LLMCompressorQuantizer:
    name = "llmcompressor"

    def quantize(self, spec, ctx: QuantizeContext, out: Path) -> QuantizeOutcome:
        llmc = require("llmcompressor", what=f"candidate '{spec.name}' ({spec.method} via llm-compressor)",
                       extra="llmcompressor")
        if spec.method == "awq" and ctx.device != "cuda":
            raise QuantgateError(f"candidate '{spec.name}': llm-compressor's AWQ needs a CUDA device (it pins "
                                 "memory unconditionally); use backend: gptqmodel for AWQ on CPU")
        import torch
        from datasets import Dataset
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM

        windows = ctx.calibration or []
        model = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=torch.float32 if ctx.device == "cpu" else "auto",
                                                     device_map=ctx.device, **ctx.load_kwargs())
        ctx.progress.log(f"{spec.method.upper()} {spec.name} via llm-compressor {llmc.__version__} on {ctx.device}")
        recipe = [_modifier(n, kw) for n, kw in modifiers(spec)]
        if spec.calibrated:
            ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
            oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
                    max_seq_length=len(windows[0]) if windows else None, shuffle_calibration_samples=False)
        else:  # FP8 dynamic: weights scaled from themselves, activations at run time
            oneshot(model=model, recipe=recipe)
        model.save_pretrained(out, save_compressed=True)
        copy_tokenizer(ctx.source, out)
        return QuantizeOutcome(format="compressed-tensors", backend_versions={"llmcompressor": llmc.__version__})

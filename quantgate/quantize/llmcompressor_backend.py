"""GPTQ and AWQ through llm-compressor, written as compressed-tensors (vLLM's native format).

An optional extra (`pip install 'quantgate[llmcompressor]'`). Known limit: llm-compressor's AWQ
calls `pin_memory()` unconditionally and fails without an accelerator, so AWQ here needs CUDA;
GPTQ runs on CPU too.
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

        if spec.method == "gptq":
            from llmcompressor.modifiers.quantization import GPTQModifier as Modifier
        else:
            from llmcompressor.modifiers.awq import AWQModifier as Modifier
        windows = ctx.calibration or []
        ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
        model = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=torch.float32 if ctx.device == "cpu" else "auto",
                                                     device_map=ctx.device, **ctx.load_kwargs())
        ctx.progress.log(f"{spec.method.upper()} {spec.name} via llm-compressor {llmc.__version__} on {ctx.device}")
        oneshot(model=model, dataset=ds, recipe=Modifier(**modifier_kwargs(spec)),
                num_calibration_samples=len(windows), max_seq_length=len(windows[0]) if windows else None,
                shuffle_calibration_samples=False)
        model.save_pretrained(out, save_compressed=True)
        copy_tokenizer(ctx.source, out)
        return QuantizeOutcome(format="compressed-tensors", backend_versions={"llmcompressor": llmc.__version__})

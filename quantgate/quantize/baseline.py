"""The unquantized baseline: the source model saved in the dtype the recipe asks for."""

from __future__ import annotations

from pathlib import Path

from ..models import copy_tokenizer
from .base import QuantizeContext, QuantizeOutcome


class BaselineQuantizer:
    name = "quantgate-baseline"

    def quantize(self, spec, ctx: QuantizeContext, out: Path) -> QuantizeOutcome:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, spec.dtype)
        ctx.progress.log(f"baseline {spec.name}: saving the source model as {spec.dtype}")
        model = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=dtype, **ctx.load_kwargs())
        model.save_pretrained(out, safe_serialization=True)
        copy_tokenizer(ctx.source, out)
        return QuantizeOutcome(format="dense")

"""GPTQ and AWQ through GPTQModel (the maintained successor of AutoGPTQ), on CPU or CUDA.

GPTQ writes the standard GPTQ checkpoint; AWQ writes the AWQ GEMM layout. On CPU, AWQ runs
through GPTQModel's torch kernels (AWQ_TORCH), and GPTQModel needs GPTQMODEL_CPU_WORKERS set
on small machines, so both are set here rather than left to the user to discover.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import QuantgateError, require
from ..models import copy_tokenizer
from .base import QuantizeContext, QuantizeOutcome


def quantize_config_kwargs(spec) -> dict:
    """GPTQModel QuantizeConfig arguments for a candidate spec (pure: tested without the library)."""
    # offload_to_disk: GPTQModel parks finished layers in a temporary folder by default (and wrote
    # that folder's path into the checkpoint's config); the models quantgate quantizes on CPU fit in memory
    kw = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "lm_head": False, "offload_to_disk": False}
    if spec.method == "gptq":
        kw.update(desc_act=spec.act_order, damp_percent=spec.damp_percent, true_sequential=spec.true_sequential)
        if spec.act_order:
            kw["act_group_aware"] = False  # GPTQModel: desc_act and act_group_aware exclude each other
    else:
        kw.update(method="awq", format="gemm")
    skip = [p for p in spec.skip if p != "lm_head"]  # lm_head is never quantized (lm_head=False)
    if skip:
        kw["dynamic"] = {f"-:.*{re.escape(p).replace(chr(92) + '*', '.*')}.*": {} for p in skip}
    return kw


class GPTQModelQuantizer:
    name = "gptqmodel"

    def quantize(self, spec, ctx: QuantizeContext, out: Path, dynamic: dict | None = None) -> QuantizeOutcome:
        """`dynamic`: per-module overrides (GPTQModel's regex rules) ahead of the spec's skip rules."""
        # GPTQModel sizes its CPU pool from this; its model loader alone needs two workers
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(4, (os.cpu_count() or 1) // 2))))
        gptqmodel = require("gptqmodel", what=f"candidate '{spec.name}' ({spec.method} via GPTQModel)", extra="gptqmodel")
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

        if not ctx.calibration:
            raise QuantgateError(f"candidate '{spec.name}': {spec.method} needs calibration data")
        device = "cuda" if ctx.device == "cuda" else "cpu"
        kw = quantize_config_kwargs(spec)
        if dynamic:  # first match wins: the allocation's rules, then the skips
            kw["dynamic"] = {**dynamic, **kw.get("dynamic", {})}
        qc = QuantizeConfig(**kw)
        calib = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in ctx.calibration]
        ctx.progress.log(
            f"{spec.method.upper()} {spec.name} via GPTQModel {gptqmodel.__version__} on {device}: "
            f"{len(calib)} windows × {len(ctx.calibration[0])} tokens"
        )
        notes = []
        if spec.method == "awq":
            from . import awq_clip

            if awq_clip.install():  # same search, as matmuls: the clip search was 95% of AWQ on CPU
                notes.append("AWQ clip search: quantgate.quantize.awq_clip (batched matmul, same result)")
        model = GPTQModel.load(str(ctx.source), qc, device=device, trust_remote_code=ctx.trust_remote_code)
        backend = BACKEND.AWQ_TORCH if (spec.method == "awq" and device == "cpu") else BACKEND.AUTO
        model.quantize(calib, batch_size=1, backend=backend, calibration_sort=None)
        model.save(str(out))
        copy_tokenizer(ctx.source, out)
        return QuantizeOutcome(
            format="gptq" if spec.method == "gptq" else "awq-gemm",
            backend_versions={"gptqmodel": gptqmodel.__version__}, notes=notes,
        )

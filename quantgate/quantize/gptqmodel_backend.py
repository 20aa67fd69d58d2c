"""GPTQ and AWQ through GPTQModel (the maintained successor of AutoGPTQ), on CPU or CUDA.

GPTQ writes the standard GPTQ checkpoint; AWQ writes the AWQ GEMM layout. On CPU, AWQ runs
through GPTQModel's torch kernels (AWQ_TORCH), and GPTQModel needs GPTQMODEL_CPU_WORKERS set
on small machines, so both are set here rather than left to the user to discover.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import QuantgateError, require
from ..kernels import bf16_linears_in_float32, cpu_flags, float32_linears, quantize_dtype
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


def downcast_dense(folder: Path, dtype: str) -> None:
    """Store a checkpoint quantized in float32 the way GPTQModel's default stores it: the float32
    tensors it kept dense (embeddings, norms, lm_head) in `dtype`, and config.json saying so. The
    packed weights, zeros and float16 scales are untouched; without this the 4-bit SmolLM2 checkpoint
    grows from 114 MB to 175 MB and every reader would load its dense layers in float32."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as src:
            meta = src.metadata()
            tensors = {k: src.get_tensor(k) for k in src.keys()}
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        tensors = {k: t.to(target) if t.dtype == torch.float32 else t for k, t in tensors.items()}
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, f)
    cfg = Path(folder) / "config.json"
    conf = json.loads(cfg.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in conf:
            conf[key] = dtype
    cfg.write_text(json.dumps(conf, indent=2) + "\n")


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
        flags = cpu_flags()
        dtype = quantize_dtype(spec.method, device, flags)
        upcast = float32_linears("bfloat16", device, flags)  # a CPU without native bfloat16
        if spec.method == "awq":
            from . import awq_clip

            # same search, as matmuls: the clip search was 95% of AWQ on CPU
            if awq_clip.install(float32_products=upcast):
                notes.append("AWQ clip search: quantgate.quantize.awq_clip (batched matmul"
                             + (", bfloat16 products in float32" if upcast else "") + ")")
        if dtype != "auto":
            import torch

            notes.append(f"quantized in {dtype}: this CPU has no native bfloat16 (GPTQModel's CPU default)")
            ctx.progress.log(notes[-1])
        elif upcast and bf16_linears_in_float32():
            notes.append("bfloat16 linears computed as float32 matmuls: this CPU has no native bfloat16")
            ctx.progress.log(notes[-1])
        model = GPTQModel.load(str(ctx.source), qc, device=device, trust_remote_code=ctx.trust_remote_code,
                               **({"dtype": getattr(torch, dtype)} if dtype != "auto" else {}))
        backend = BACKEND.AWQ_TORCH if (spec.method == "awq" and device == "cpu") else BACKEND.AUTO
        model.quantize(calib, batch_size=1, backend=backend, calibration_sort=None)
        model.save(str(out))
        if dtype == "float32":
            downcast_dense(out, "bfloat16")
        copy_tokenizer(ctx.source, out)
        return QuantizeOutcome(
            format="gptq" if spec.method == "gptq" else "awq-gemm",
            backend_versions={"gptqmodel": gptqmodel.__version__}, notes=notes,
        )

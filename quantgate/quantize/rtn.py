"""Round-to-nearest weight quantization (the GPTQ and AWQ papers' baseline), packed as GPTQ.

The numerics are a few lines of torch; the output is a standard GPTQ-format checkpoint
(`checkpoint_format: gptq`, desc_act off) so the same loaders and kernels that serve GPTQ
serve RTN, and the comparison between methods is about the method alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import QuantgateError
from ..models import copy_tokenizer
from .base import QuantizeContext, QuantizeOutcome, layer_linears, skip_matcher

PACKABLE_BITS = (2, 4, 8)  # bit widths that tile a 32-bit word exactly


def quant_params(w, bits: int, group_size: int, sym: bool):
    """Per-group scale and zero point for a [out, in] weight.

    Returns (scale, zero) shaped [out, n_groups]; zero is an integer-valued tensor in [0, 2^bits-1].
    Symmetric uses GPTQ's convention: zero at the middle of the range.
    """
    import torch

    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    wg = w.float().reshape(out_f, in_f // g, g)
    maxq = 2**bits - 1
    wmin = wg.amin(dim=-1).clamp(max=0)
    wmax = wg.amax(dim=-1).clamp(min=0)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if zero is None:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_weight(w, bits: int, group_size: int, sym: bool):
    """Integer codes q [out, in], scale and zero [out, n_groups] with w ≈ scale * (q - zero)."""
    import torch

    out_f, in_f = w.shape
    if group_size != -1 and in_f % group_size:
        raise QuantgateError(f"group_size {group_size} does not divide the layer width {in_f}")
    scale, zero = quant_params(w, bits, group_size, sym)
    g = in_f if group_size == -1 else group_size
    wg = w.float().reshape(out_f, in_f // g, g)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return q.reshape(out_f, in_f).to(torch.int32), scale, zero


def dequantize(q, scale, zero, group_size: int):
    out_f, in_f = q.shape
    g = in_f if group_size == -1 else group_size
    qg = q.float().reshape(out_f, in_f // g, g)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)


def fake_quantize(w, bits: int, group_size: int, sym: bool):
    """The weight as RTN leaves it, in the original dtype (what the packed checkpoint computes)."""
    q, s, z = quantize_weight(w, bits, group_size, sym)
    return dequantize(q, s, z, group_size).to(w.dtype)


# ----------------------------------------------------------------------- GPTQ packing
def pack_rows(values, bits: int):
    """Pack int codes along dim 0 into int32 words, lowest bits first (GPTQ's qweight layout)."""
    import torch

    per = 32 // bits
    v = values.to(torch.int64)
    rows, cols = v.shape
    if rows % per:
        raise QuantgateError(f"cannot pack {rows} rows of {bits}-bit codes into 32-bit words")
    v = v.reshape(rows // per, per, cols)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (v << shifts).sum(dim=1)
    return (packed & 0xFFFFFFFF).to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else packed.to(torch.int32)


def unpack_rows(packed, bits: int):
    import torch

    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    v = (p.unsqueeze(1) >> shifts) & (2**bits - 1)
    return v.reshape(-1, packed.shape[1]).to(torch.int32)


def pack_gptq(q, scale, zero, bits: int, group_size: int, v2: bool) -> dict:
    """GPTQ tensors for one linear layer: qweight, qzeros, scales, g_idx.

    The v1 layout stores zero points minus one, which wraps a zero point of 0 (common in
    asymmetric quantization); v2 (`checkpoint_format: gptq_v2`) stores them as they are.
    """
    import torch

    out_f, in_f = q.shape
    g = in_f if group_size == -1 else group_size
    zeros = zero.to(torch.int32) - (0 if v2 else 1)  # [out, groups]
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),  # [in/per, out]
        "qzeros": pack_rows(zeros.contiguous(), bits).t().contiguous(),  # [groups, out/per]
        "scales": scale.t().contiguous().to(torch.float16),  # [groups, out]
        "g_idx": torch.arange(in_f, dtype=torch.int32) // g,
    }


def unpack_gptq(t: dict, bits: int, v2: bool):
    """Inverse of pack_gptq: (q [out, in], zero [out, groups]); used to verify checkpoints."""
    q = unpack_rows(t["qweight"], bits).t().contiguous()
    zero = unpack_rows(t["qzeros"].t().contiguous(), bits) + (0 if v2 else 1)
    return q, zero


class RTNQuantizer:
    name = "quantgate-rtn"

    def quantize(self, spec, ctx: QuantizeContext, out: Path) -> QuantizeOutcome:
        if spec.bits not in PACKABLE_BITS:
            raise QuantgateError(
                f"candidate '{spec.name}': RTN packs {', '.join(map(str, PACKABLE_BITS))}-bit weights; "
                f"{spec.bits}-bit is not packable in the GPTQ layout (use gptq for 3-bit)"
            )
        skipped = skip_matcher(spec.skip)

        def config_for(linears):
            return gptq_quantization_config(spec, skipped_modules=[n for n in linears if skipped(n)])

        n = write_rtn(ctx, out, lambda name: None if skipped(name) else spec.bits, spec.group_size, spec.sym,
                      config_for, label=f"RTN {spec.name}")
        return QuantizeOutcome(format="gptq", quantized_modules=n, backend_versions={})


def write_rtn(ctx: QuantizeContext, out: Path, bits_of, group_size: int, sym: bool, config_for, label: str) -> int:
    """Round each decoder linear to `bits_of(name)` bits (None: left as it is) and write a GPTQ-layout
    checkpoint whose quantization_config is `config_for(linear names)`; returns how many were packed."""
    import torch
    from safetensors.torch import load_file, save_file

    state: dict = {}
    for f in sorted(ctx.source.glob("*.safetensors")):
        state.update(load_file(f))
    config = json.loads((ctx.source / "config.json").read_text())
    linears = layer_linears(state)
    targets = [n for n in linears if bits_of(n) is not None]
    tensors = {}
    for name, t in state.items():
        t = t.to(torch.float16) if t.is_floating_point() else t
        tensors[name] = t
    for name in ctx.progress.iter(targets, label):
        w = state[f"{name}.weight"]
        q, s, z = quantize_weight(w, bits_of(name), group_size, sym)
        del tensors[f"{name}.weight"]
        for k, v in pack_gptq(q, s, z, bits_of(name), group_size, v2=not sym).items():
            tensors[f"{name}.{k}"] = v
    # tied embeddings are stored once; drop the alias safetensors would refuse to share
    if config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.update({"quantization_config": config_for(linears), "dtype": "float16"})
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(ctx.source, out)
    return len(targets)


def gptq_quantization_config(spec, skipped_modules=()) -> dict:
    cfg = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq" if spec.sym else "gptq_v2",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": False,
        "sym": spec.sym,
        "lm_head": False,
        "true_sequential": True,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["quantgate-rtn"]},
    }
    if skipped_modules:
        # GPTQModel's "dynamic" rules: a leading '-:' leaves matching modules unquantized
        cfg["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skipped_modules}
    return cfg

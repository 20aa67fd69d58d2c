"""AWQ's clipping search with matrix products: the same search as GPTQModel's, many times faster on CPU.

GPTQModel (7.6) scores each clipping ratio by broadcasting inputs [tokens, groups, group size]
against weights [channels, groups, group size] and summing: a temporary of channels × tokens ×
in-features floats (300 MB per batch of 256 channels at 512 tokens) for every one of ten ratios,
which made the clip search 95% of AWQ's time on a 2-core machine (26 s for one 1536×576 linear
where its 20 forwards take 1 s). The sum over a group is a dot product, so here it is one batched
matmul per group: the same candidates, the same error, the same choice, up to float rounding.
`install()` swaps it in only where the library's method has the signature this mirrors.

Where the CPU has no native bfloat16, torch computes a bfloat16 bmm with a scalar dot-product
fallback (`bf16_dot_with_fp32_arith`): it was 38% of AWQ's CPU time on SmolLM2 (py-spy). There,
`install(float32_products=True)` computes the same bfloat16 values' products in float32 and rounds
each output to bfloat16 once, which is what that fallback does (it accumulates in float32), at
float32 GEMM speed: 3-12x faster per call; outputs differ from it by summation order (one bfloat16
step in ~4 of 100,000).
"""

from __future__ import annotations

import inspect

import torch

EXPECTED_PARAMS = ["self", "w", "input_feat", "n_grid", "max_shrink", "n_sample_token"]
FLOAT32_PRODUCTS = {"on": False}  # set by install(): bfloat16 products computed in float32 (see above)


def _group_outputs(xg: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(x * w).sum(-1) for x [1, t, g, k] and w [c, 1, g, k], as matmuls: xg [g, t, k] → [c, t, g]."""
    wt = w[:, 0].permute(1, 2, 0)
    if FLOAT32_PRODUCTS["on"] and w.dtype is torch.bfloat16 and w.device.type == "cpu":
        return torch.bmm(xg.float(), wt.float()).to(torch.bfloat16).permute(2, 1, 0)
    return torch.bmm(xg, wt).permute(2, 1, 0)


@torch.inference_mode()
def compute_best_clip(self, w: torch.Tensor, input_feat: torch.Tensor, n_grid=20, max_shrink=0.5,
                      n_sample_token=512):
    """Drop-in for AWQProcessor._compute_best_clip (same arguments, same result shape)."""
    assert w.dim() == 2
    co, ci = w.shape
    group_size = self.qcfg.group_size if self.qcfg.group_size > 0 else ci
    x = input_feat.reshape(-1, input_feat.shape[-1])
    x = x[:: max(1, x.shape[0] // n_sample_token)]  # the same token sample as the original
    xg = x.reshape(x.shape[0], -1, group_size).permute(1, 0, 2).contiguous().to(w.device, w.dtype)
    w_all = w.reshape(co, 1, -1, group_size)
    oc_batch = 256 if co % 256 == 0 else 64
    assert co % oc_batch == 0
    scratch_clamp = torch.empty_like(w_all[:oc_batch])
    scratch_quant = torch.empty_like(scratch_clamp)
    best_all = []
    for i_b in range(co // oc_batch):
        wb = w_all[i_b * oc_batch: (i_b + 1) * oc_batch]
        org_max_val = wb.abs().amax(dim=-1, keepdim=True)
        best_max_val = org_max_val.clone()
        min_errs = torch.ones_like(org_max_val) * 1e9
        clamp_slice, quant_slice = scratch_clamp[: wb.shape[0]], scratch_quant[: wb.shape[0]]
        org_out = _group_outputs(xg, wb)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            torch.clamp(wb, -max_val, max_val, out=clamp_slice)
            self._pseudo_quantize_tensor_into(clamp_slice, quant_slice)
            err = (_group_outputs(xg, quant_slice) - org_out).pow(2).mean(dim=1).view(min_errs.shape)
            better = err < min_errs
            min_errs[better] = err[better]
            best_max_val[better] = max_val[better]
        best_all.append(best_max_val)
    return torch.cat(best_all, dim=0).squeeze(1)


def install(float32_products: bool = False) -> bool:
    """Use the matmul clip search in GPTQModel's AWQ; False (and the library's own) if it changed shape.
    `float32_products`: compute bfloat16 products in float32 (kernels.float32_linears says where)."""
    FLOAT32_PRODUCTS["on"] = float32_products
    try:
        from gptqmodel.looper.awq_processor import AWQProcessor
    except ImportError:
        return False
    current = getattr(AWQProcessor, "_compute_best_clip", None)
    if current is compute_best_clip:
        return True
    if current is None or list(inspect.signature(current).parameters) != EXPECTED_PARAMS \
            or not hasattr(AWQProcessor, "_pseudo_quantize_tensor_into"):
        return False
    AWQProcessor._compute_best_clip = compute_best_clip
    return True

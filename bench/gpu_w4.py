"""W4A16 group-wise linears for the GPU benches: quantize a weight, pack it for an int4 kernel, and
pick the kernel that loads on this device (checked against a dequantized reference first).

Kernels, best first (KERNELS):
  int4pack-cuda  torch.ops.aten._weight_int4pack_mm (tinygemm; bf16 activations, CUDA)
  int4pack-cpu   torch.ops.aten._weight_int4pack_mm_for_cpu (the CPU dry run's int4 kernel)
  dequant        dequantizes the 4-bit weight into 16 bits on every call, then a dense matmul:
                 NOT an int4 kernel; only what runs when neither of the above loads, and named so

Quantization is tinygemm's asymmetric scheme, so every kernel computes the same function:
  q = round((w - min) / s) in 0..15, s = (max - min) / 15, zero = min + 8 s, w ≈ (q - 8) s + zero
GPTQModel's Triton kernels are not used here: they need GPTQModel on the machine, and this file
must run with torch alone (the decode bench runs before anything is installed).
"""

from __future__ import annotations

from dataclasses import dataclass

INNER_K_TILES = 8  # tinygemm's widest tiling: K must be a multiple of 8 * 16 = 128
REL_ERR_MAX = 2e-2  # bf16 operands land near 3e-3 against the float32 reference; a wrong packing near 1


@dataclass(frozen=True)
class KernelChoice:
    name: str
    int4: bool  # False for the dequantize-per-call fallback
    check_rel_err: float | None  # ‖kernel − reference‖/‖reference‖ on a random check problem
    why: str  # what was tried before it, or why it was chosen


def quantize_groups(w, group_size: int):
    """(q int32 [N, K] in 0..15, scales [N, K/g], zeros [N, K/g]) in float32, tinygemm's scheme."""
    import torch

    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in-features {k} is not a multiple of group_size {group_size}")
    wg = w.float().reshape(n, k // group_size, group_size)
    mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    s = (mx - mn).clamp(min=1e-6) / 15
    q = ((wg - mn) / s).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, s.squeeze(-1), (mn + 8 * s).squeeze(-1)


def dequantize(q, scales, zeros, group_size: int, dtype):
    n, k = q.shape
    wg = (q.reshape(n, k // group_size, group_size).float() - 8) * scales.unsqueeze(-1) + zeros.unsqueeze(-1)
    return wg.reshape(n, k).to(dtype)


def scales_and_zeros(scales, zeros):
    """tinygemm's [K/g, N, 2] bfloat16 layout of the per-group scale and zero."""
    import torch

    return torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()


def pack(q, kernel: str):
    """The int4 kernel's own weight layout (the CUDA one takes two nibbles a byte, even index high)."""
    import torch

    if kernel == "int4pack-cuda":
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
    if kernel == "int4pack-cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    raise ValueError(f"unknown int4 kernel '{kernel}'")


class W4Linear:
    """y = x @ W.t() with W held as 4-bit groups: 0.5 byte a weight plus 4 bytes a group."""

    def __init__(self, weight, group_size: int, kernel: str):
        import torch

        self.n, self.k = weight.shape
        self.group_size, self.kernel = group_size, kernel
        q, s, z = quantize_groups(weight, group_size)
        self.sz = scales_and_zeros(s, z)
        if kernel == "dequant":
            self.q, self.s, self.z = q.to(torch.uint8), s.to(torch.bfloat16), z.to(torch.bfloat16)
            self.packed = None
        else:
            self.packed = pack(q, kernel)

    @property
    def nbytes(self) -> int:
        """What an int4 kernel reads a call: the 4-bit weights and the bf16 scale and zero per group."""
        return self.n * self.k // 2 + self.sz.numel() * self.sz.element_size()

    def __call__(self, x):
        import torch

        shape = x.shape
        x2 = x.reshape(-1, self.k).to(torch.bfloat16)
        if self.kernel == "int4pack-cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.sz)
        elif self.kernel == "int4pack-cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.sz)
        else:
            w = dequantize(self.q.to(torch.int32), self.s.float(), self.z.float(), self.group_size, torch.bfloat16)
            y = x2 @ w.t()
        return y.reshape(*shape[:-1], self.n)


def candidates(device: str) -> list[str]:
    """The kernels worth trying on a device, best first."""
    return (["int4pack-cuda"] if device == "cuda" else ["int4pack-cpu"]) + ["dequant"]


def check(kernel: str, device: str, n: int = 256, k: int = 512, group_size: int = 128, seed: int = 0) -> float:
    """Relative error of the kernel against float32 arithmetic on the dequantized weight."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(device)
    x = torch.randn(8, k, generator=g).to(device).to(torch.bfloat16)
    lin = W4Linear(w, group_size, kernel)
    q, s, z = quantize_groups(w, group_size)
    ref = x.float() @ dequantize(q, s, z, group_size, torch.float32).t()
    out = lin(x).float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def pick_kernel(device: str, group_size: int = 128) -> KernelChoice:
    """The first kernel of `candidates(device)` that loads and computes the right function."""
    tried = []
    for name in candidates(device):
        try:
            err = check(name, device, group_size=group_size)
        except Exception as exc:  # a missing op or an unsupported device: try the next one
            tried.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            continue
        if err <= REL_ERR_MAX:
            why = "; ".join(tried) if tried else "the first choice for this device"
            return KernelChoice(name, name != "dequant", round(err, 6), why)
        tried.append(f"{name}: relative error {err:.3g} > {REL_ERR_MAX}")
    raise RuntimeError("no W4A16 kernel computes the right function here: " + "; ".join(tried))

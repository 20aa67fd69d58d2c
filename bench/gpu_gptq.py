"""GPTQ time on one Llama-3-8B-shaped decoder layer: 128 calibration windows of 2,048 tokens.

The per-layer step every GPTQ implementation runs (the IST-DASLab reference's contract, which
GPTQModel keeps): forward the calibration windows through the layer while accumulating each
linear's Hessian H = 2 XᵀX / n (q/k/v share one, gate/up another), solve every linear (Cholesky of
the damped H⁻¹, then column blocks of 128 with error feedback; 4-bit, group 128, symmetric
off, no act-order), and forward again with the quantized weights to make the next layer's inputs.
Reported: seconds for the layer and its parts, and × the layer count for the whole model.

The inputs are random hidden states and the weights random (no 8B checkpoint travels), which
changes nothing about the time: the work is the same matmuls and solves.

On CPU the full 8B-shaped step would take most of an hour on two cores, so `--windows` /
`--seq-len` measure fewer tokens and the record extrapolates: the token-proportional part
(Hessians and forwards) scales with tokens, the solve does not (`extrapolated` says so).

    python bench/gpu_gptq.py --device cuda                         # 128 × 2048 on the 8B layer
    python bench/gpu_gptq.py --device cpu --windows 1 --seq-len 512   # measured, then extrapolated
    python bench/gpu_gptq.py --device cpu --shape tiny --windows 2 --seq-len 64   # the dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_decode  # noqa: E402
import gpu_w4  # noqa: E402

FULL_WINDOWS, FULL_SEQ = 128, 2048


def quantize_rows(w, scale, zero, maxq):
    import torch

    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def solve(w, h, bits: int = 4, group_size: int = 128, blocksize: int = 128, damp: float = 0.01):
    """GPTQ on one weight [out, in] with its Hessian [in, in] (float32): the quantized weight."""
    import torch

    w = w.float().clone()
    n_in = w.shape[1]
    maxq = 2 ** bits - 1
    dead = torch.diag(h) == 0
    h = h.clone()
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_in, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qw = torch.zeros_like(w)
    scale = zero = None
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # this group's scale and zero from the error-updated weights
                g = w[:, col:col + group_size]
                mn, mx = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
                scale = ((mx - mn) / maxq).clamp(min=1e-8)
                zero = torch.round(-mn / scale)
            d = hinv1[i, i]
            q = quantize_rows(w1[:, i], scale, zero, maxq)
            qw[:, col] = q
            e = (w1[:, i] - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return qw


class Layer:
    """One decoder layer's weights (fused linears as in gpu_decode) and a plain forward."""

    def __init__(self, shape, device, dtype):
        import torch

        self.shape, self.device, self.dtype = shape, device, dtype
        self.w = {n: torch.randn(o, i, device=device, dtype=dtype) * i ** -0.5 for n, (o, i) in shape.linears().items()}
        self.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, shape.head_dim, 2, device=device).float() / shape.head_dim))

    def forward(self, x, hook=None):
        """x [B, T, H] → [B, T, H]; hook(name, input) sees each linear's input."""
        import torch
        import torch.nn.functional as F

        s, (b, t, _) = self.shape, x.shape
        hd, nq, nkv = s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim

        def lin(name, inp):
            if hook:
                hook(name, inp)
            return F.linear(inp, self.w[name])

        def norm(v):
            return (v.float() * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(self.dtype)

        f = torch.arange(t, device=x.device).float()[:, None] * self.inv_freq[None, :]
        cos, sin = f.cos().to(self.dtype), f.sin().to(self.dtype)

        def rope(v):
            v1, v2 = v[..., 0::2], v[..., 1::2]
            return torch.stack([v1 * cos - v2 * sin, v1 * sin + v2 * cos], dim=-1).flatten(-2)

        q, k, v = lin("qkv", norm(x)).split([nq, nkv, nkv], dim=-1)
        q = rope(q.view(b, t, s.heads, hd).transpose(1, 2))
        k = rope(k.view(b, t, s.kv_heads, hd).transpose(1, 2))
        v = v.view(b, t, s.kv_heads, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + lin("o", a.transpose(1, 2).reshape(b, t, nq))
        g, u = lin("gate_up", norm(x)).chunk(2, dim=-1)
        return x + lin("down", F.silu(g) * u)


def gptq_layer(shape, device: str, windows: int, seq_len: int, batch: int, group_size: int, log=print) -> dict:
    """Seconds for the forward with Hessians, the solves, and the forward with quantized weights."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    layer = Layer(shape, device, dtype)
    xs = [torch.randn(min(batch, windows - i), seq_len, shape.hidden, generator=gen).to(device, dtype)
          for i in range(0, windows, batch)]
    hs = {n: torch.zeros(i, i, device=device, dtype=torch.float32) for n, (_, i) in shape.linears().items()}
    seen = {"n": 0}

    def accumulate(name, inp):
        x2 = inp.reshape(-1, inp.shape[-1]).float()
        hs[name].addmm_(x2.t(), x2, alpha=2.0)
        if name == "qkv":
            seen["n"] += x2.shape[0]

    def timed(fn):
        gpu_decode.synchronize(device)
        t = time.perf_counter()
        out = fn()
        gpu_decode.synchronize(device)
        return out, time.perf_counter() - t

    gpu_decode.reset_peak(device)
    with torch.inference_mode():
        _, t_hess = timed(lambda: [layer.forward(x, accumulate) for x in xs])
        for h in hs.values():
            h /= seen["n"]
        solved = {}
        t_solve = {}
        for name, w in layer.w.items():
            solved[name], t_solve[name] = timed(lambda: solve(w, hs[name], group_size=group_size))
            log(f"  GPTQ {name} {tuple(w.shape)}: {t_solve[name]:.2f} s")
        err = {n: round(float((solved[n] - layer.w[n].float()).norm() / layer.w[n].float().norm()), 4) for n in solved}
        layer.w = {n: q.to(dtype) for n, q in solved.items()}
        _, t_next = timed(lambda: [layer.forward(x) for x in xs])
    return {"tokens": seen["n"], "hessian_forward_s": round(t_hess, 3), "solve_s": {k: round(v, 3) for k, v in t_solve.items()},
            "next_inputs_forward_s": round(t_next, 3), "weight_rel_err": err,
            "peak_memory_mb": gpu_decode.peak_memory_mb(device)}


def extrapolate(m: dict, layers: int, target_tokens: int) -> dict:
    """Per-layer and whole-model seconds at `target_tokens` calibration tokens: the forwards and
    Hessians grow with tokens, the solves do not."""
    per_token = (m["hessian_forward_s"] + m["next_inputs_forward_s"]) / m["tokens"]
    solve = sum(m["solve_s"].values())
    layer_s = per_token * target_tokens + solve
    return {"tokens": target_tokens, "layer_s": round(layer_s, 2), "model_s": round(layer_s * layers, 1),
            "extrapolated": m["tokens"] != target_tokens}


def run(shape, device, windows, seq_len, batch, group_size, log=print) -> dict:
    import torch

    m = gptq_layer(shape, device, windows, seq_len, batch, group_size, log)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"bench": "gpu_gptq", "device": device, "device_name": name, "torch": torch.__version__,
            "shape": shape.name, "windows": windows, "seq_len": seq_len, "group_size": group_size,
            "measured": m, "measured_layer_s": round(m["hessian_forward_s"] + m["next_inputs_forward_s"]
                                                     + sum(m["solve_s"].values()), 3),
            "at_128x2048": extrapolate(m, shape.layers, FULL_WINDOWS * FULL_SEQ)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--shape", choices=sorted(gpu_decode.SHAPES), default="llama3-8b")
    p.add_argument("--windows", type=int, default=FULL_WINDOWS)
    p.add_argument("--seq-len", type=int, default=FULL_SEQ)
    p.add_argument("--batch", type=int, default=8, help="windows a forward (memory, not the result)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    device = gpu_decode.choose_device(a.device)
    rec = run(gpu_decode.SHAPES[a.shape], device, a.windows, a.seq_len, a.batch, a.group_size,
              log=lambda s: print(s, flush=True))
    x = rec["at_128x2048"]
    print(f"GPTQ {a.shape} layer on {rec['device_name']}: measured {rec['measured_layer_s']:.2f} s at "
          f"{rec['measured']['tokens']} tokens; at 128×2048: {x['layer_s']:.1f} s/layer, {x['model_s']:.0f} s "
          f"for {gpu_decode.SHAPES[a.shape].layers} layers{' (extrapolated)' if x['extrapolated'] else ''}")
    if a.out:
        gpu_decode.write_json(a.out, rec)
    return rec


if __name__ == "__main__":
    main()

"""Decode speed of a Llama-3-8B-shaped decoder, FP16 against W4A16 (group 128), in one run.

No 8B checkpoint can travel to the GPU machine, so the weights are random, made on the device:
speed depends on the shapes and the kernels, not on the values. Per variant and batch size
(1, 4, 16, 64): TPOT (ms a decode step), decode tokens/s, the memory-bandwidth floor of a step
(weights + the KV cache it reads, over the device's bandwidth) and the fraction of it reached;
prefill time of 1,024 tokens; peak GPU memory. The ratio W4A16/FP16 is taken in the same run.

On CUDA a decode step is captured once as a CUDA graph and replayed (an 8B decode step is ~1,000
kernel launches: launch gaps would otherwise hide the weight bytes saved); the W4A16 linears run
on the int4 kernel `gpu_w4.pick_kernel` found (its name is in the record). q/k/v and gate/up are
fused, as serving engines do; lm_head stays 16-bit in both variants (quantgate never quantizes it).

    python bench/gpu_decode.py --device cuda                      # the real thing (~1 minute on an H100)
    python bench/gpu_decode.py --device cpu --shape tiny          # the dry run: seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_w4  # noqa: E402  (a sibling script, found as when this file runs as a script)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each fused linear of one layer."""
        hd = self.head_dim
        return {"qkv": ((self.heads + 2 * self.kv_heads) * hd, self.hidden), "o": (self.hidden, self.heads * hd),
                "gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}

    def layer_params(self) -> int:
        return sum(n * k for n, k in self.linears().values())


SHAPES = {
    "llama3-8b": Shape("llama3-8b", 4096, 14336, 32, 32, 8, 128256),
    "tiny": Shape("tiny", 256, 512, 2, 4, 2, 512),
}

# Datasheet HBM bandwidth (bytes/s) by what torch.cuda.get_device_name() contains; first match wins,
# so the PCIe and NVL parts come before the plain H100 (the SXM part, 'NVIDIA H100 80GB HBM3').
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
             ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12)]


def spec_bandwidth(device_name: str | None) -> float | None:
    for key, bw in BANDWIDTH:
        if device_name and key.lower() in device_name.lower():
            return bw
    return None


def choose_device(requested: str) -> str:
    """auto → cuda where torch sees one, else cpu; cuda where there is none is refused, not faked."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device: '{requested}' is not one of auto, cpu, cuda")
    has = torch.cuda.is_available()
    if requested == "cuda" and not has:
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and has) else "cpu"


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    """Peak memory torch allocated on the GPU since the last reset_peak (None on CPU)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy, bytes read plus written per second (None on CPU)."""
    import torch

    if device != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(6):
        synchronize(device)
        t = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * nbytes / statistics.median(times)


class Dense:
    def __init__(self, w):
        self.w = w

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def __call__(self, x):
        import torch.nn.functional as F

        return F.linear(x, self.w)


class Decoder:
    """A Llama decoder (RMSNorm, RoPE, GQA attention over a static KV cache, SwiGLU) on random weights."""

    def __init__(self, shape: Shape, device: str, variant: str, dtype, kernel: str, group_size: int, seed: int = 0):
        import torch

        self.shape, self.device, self.variant = shape, device, variant
        self.act = torch.bfloat16 if variant == "w4a16" else dtype  # the int4 kernels take bf16 activations
        torch.manual_seed(seed)
        s = shape

        def weight(n, k):
            return torch.randn(n, k, device=device, dtype=self.act) * k ** -0.5

        def linear(n, k):
            w = weight(n, k)
            return Dense(w) if variant == "fp16" else gpu_w4.W4Linear(w, group_size, kernel)

        self.emb = torch.randn(s.vocab, s.hidden, device=device, dtype=self.act)
        self.layers = [{name: linear(n, k) for name, (n, k) in s.linears().items()} for _ in range(s.layers)]
        self.lm_head = Dense(weight(s.vocab, s.hidden))
        self.ones = torch.ones(s.hidden, device=device, dtype=self.act)  # RMSNorm weights (all layers alike)
        inv = 1.0 / (500000.0 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        self.inv_freq = inv

    def weight_bytes(self) -> int:
        """What a decode step reads of the weights (one embedding row a sequence is left out)."""
        return self.lm_head.nbytes + sum(lin.nbytes for layer in self.layers for lin in layer.values())

    def _norm(self, x):
        import torch

        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-5)).to(self.act) * self.ones

    def _rope(self, x, positions):
        import torch

        f = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = f.cos().to(x.dtype), f.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def new_cache(self, batch: int, length: int):
        import torch

        s = self.shape
        # random, not zeros: a cache of zeros can run faster than real data (METHOD.md)
        return [(torch.randn(batch, s.kv_heads, length, s.head_dim, device=self.device, dtype=self.act),
                 torch.randn(batch, s.kv_heads, length, s.head_dim, device=self.device, dtype=self.act))
                for _ in range(s.layers)]

    def forward(self, ids, positions, cache, decode: bool):
        """ids [B, T]; positions [T] (decode: [1], the step's position, read on the device)."""
        import torch
        import torch.nn.functional as F

        s = self.shape
        b, t = ids.shape
        x = self.emb[ids]
        nq, nkv, hd = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim
        if decode:
            length = cache[0][0].shape[2]
            visible = (torch.arange(length, device=ids.device) <= positions).view(1, 1, 1, length)
        for layer, (kc, vc) in zip(self.layers, cache):
            h = self._norm(x)
            q, k, v = layer["qkv"](h).split([nq, nkv, nkv], dim=-1)
            q = self._rope(q.view(b, t, s.heads, hd).transpose(1, 2), positions)
            k = self._rope(k.view(b, t, s.kv_heads, hd).transpose(1, 2), positions)
            v = v.view(b, t, s.kv_heads, hd).transpose(1, 2)
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            if decode:
                a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible, enable_gqa=True)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, t, nq))
            g, u = layer["gate_up"](self._norm(x)).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(g) * u)
        return self.lm_head(self._norm(x[:, -1:]))


def measure_prefill(model: Decoder, tokens: int, repeats: int) -> float:
    """Median ms of one forward over `tokens` prompt tokens at batch 1 (after one warm-up)."""
    import torch

    with torch.inference_mode():
        ids = torch.randint(0, model.shape.vocab, (1, tokens), device=model.device)
        pos = torch.arange(tokens, device=model.device)
        cache = model.new_cache(1, tokens)
        times = []
        for i in range(repeats + 1):
            synchronize(model.device)
            t = time.perf_counter()
            model.forward(ids, pos, cache, decode=False)
            synchronize(model.device)
            if i:
                times.append(time.perf_counter() - t)
        del cache
    return 1000 * statistics.median(times)


@dataclass
class DecodeRow:
    batch: int
    context: int
    tpot_ms: float
    tokens_per_s: float
    kv_bytes_per_step: int
    floor_ms: float | None  # (weight + KV bytes) / bandwidth
    fraction_of_bandwidth_limit: float | None
    peak_memory_mb: float | None
    cuda_graph: bool
    note: str = ""


def measure_decode(model: Decoder, batch: int, context: int, steps: int, repeats: int,
                   bandwidth: float | None) -> DecodeRow:
    """TPOT of greedy decode steps at `context` tokens already in the cache, the median of `repeats`."""
    import torch

    device = model.device
    reset_peak(device)
    length = context + steps * (repeats + 2) + 4
    with torch.inference_mode():
        cache = model.new_cache(batch, length)
        tok = torch.randint(0, model.shape.vocab, (batch, 1), device=device)
        pos = torch.tensor([context], device=device)

        def step():
            logits = model.forward(tok, pos, cache, decode=True)
            tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)

        run, graph, note = step, False, ""
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                run, graph = g.replay, True
            except Exception as exc:  # eager then, and the record says so
                note = f"CUDA graph capture failed, eager: {type(exc).__name__}: {str(exc)[:160]}"
        else:
            step()
            step()
        times = []
        for _ in range(repeats):
            synchronize(device)
            t = time.perf_counter()
            for _ in range(steps):
                run()
            synchronize(device)
            times.append((time.perf_counter() - t) / steps)
        peak = peak_memory_mb(device)
        kv_bytes = sum(kc.numel() * kc.element_size() * 2 for kc, _ in cache)
        del cache
    tpot = statistics.median(times)
    floor = (model.weight_bytes() + kv_bytes) / bandwidth if bandwidth else None
    return DecodeRow(batch, context, round(1000 * tpot, 5), round(batch / tpot, 3), kv_bytes,
                     round(1000 * floor, 6) if floor else None, _sig(floor / tpot) if floor else None,
                     peak, graph, note)


def run(shape: Shape, device: str, batches: list[int], *, context: int, prefill_tokens: int, steps: int,
        repeats: int, group_size: int, dtype: str, bandwidth: float | None = None, log=print) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    measured_bw = copy_bandwidth(device)
    bw = bandwidth or spec_bandwidth(name)
    kernel = gpu_w4.pick_kernel(device, group_size)
    log(f"device {name}; W4A16 kernel {kernel.name} (check rel. err {kernel.check_rel_err}); "
        f"bandwidth {bw / 1e12 if bw else '?'} TB/s (datasheet), "
        f"{measured_bw / 1e12 if measured_bw else '?'} TB/s (measured copy)")
    variants = {}
    for variant in ("fp16", "w4a16"):
        reset_peak(device)
        t = time.perf_counter()
        model = Decoder(shape, device, variant, getattr(torch, dtype), kernel.name, group_size)
        synchronize(device)
        built_s = time.perf_counter() - t
        rows = []
        for b in batches:
            rows.append(measure_decode(model, b, context, steps, repeats, bw))
            log(f"  {variant} batch {b}: TPOT {rows[-1].tpot_ms:.3f} ms, {rows[-1].tokens_per_s:.1f} tok/s")
        prefill = measure_prefill(model, prefill_tokens, repeats)
        log(f"  {variant} prefill {prefill_tokens} tokens: {prefill:.2f} ms")
        variants[variant] = {
            "activation_dtype": str(model.act).removeprefix("torch."),
            "kernel": "dense (F.linear)" if variant == "fp16" else kernel.name,
            "weight_bytes": model.weight_bytes(), "build_s": round(built_s, 2),
            "prefill_tokens": prefill_tokens, "prefill_ms": round(prefill, 3),
            "decode": [asdict(r) for r in rows],
        }
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"bench": "gpu_decode", "device": device, "device_name": name, "torch": torch.__version__,
            "shape": asdict(shape), "group_size": group_size, "kernel": asdict(kernel),
            "bandwidth_datasheet_bps": bw, "bandwidth_measured_copy_bps": measured_bw,
            "variants": variants, "ratios": ratios(variants)}


def ratios(variants: dict) -> dict:
    """W4A16 over FP16 in the same run: decode tokens/s per batch, and prefill time (FP16 / W4A16)."""
    fp, w4 = variants["fp16"], variants["w4a16"]
    by_b = {r["batch"]: r for r in fp["decode"]}
    decode = {str(r["batch"]): _sig(r["tokens_per_s"] / by_b[r["batch"]]["tokens_per_s"])
              for r in w4["decode"] if r["batch"] in by_b}
    return {"decode_tokens_per_s_w4a16_over_fp16": decode,
            "prefill_speedup_w4a16_over_fp16": _sig(fp["prefill_ms"] / w4["prefill_ms"]),
            "weight_bytes_fp16_over_w4a16": _sig(fp["weight_bytes"] / w4["weight_bytes"])}


def _sig(x: float, digits: int = 4) -> float:
    """A ratio to `digits` significant digits (a fixed number of decimals loses a small one)."""
    return float(f"{x:.{digits}g}")


def table(rec: dict) -> str:
    lines = [f"{rec['shape']['name']} on {rec['device_name']} — W4A16 kernel {rec['kernel']['name']}",
             f"{'variant':8} {'batch':>5} {'TPOT ms':>9} {'tok/s':>10} {'floor ms':>9} {'of limit':>8} {'peak MB':>9}"]
    for v, d in rec["variants"].items():
        for r in d["decode"]:
            frac = "–" if r["fraction_of_bandwidth_limit"] is None else f"{r['fraction_of_bandwidth_limit']:.0%}"
            floor = "–" if r["floor_ms"] is None else f"{r['floor_ms']:.3f}"
            lines.append(f"{v:8} {r['batch']:>5} {r['tpot_ms']:>9.3f} {r['tokens_per_s']:>10.1f} {floor:>9} "
                         f"{frac:>8} {r['peak_memory_mb'] or '–':>9}")
        lines.append(f"{v:8} prefill {d['prefill_tokens']} tokens: {d['prefill_ms']:.2f} ms")
    r = rec["ratios"]
    lines.append("W4A16/FP16 decode tok/s: " + ", ".join(f"b{b} {x:.2f}x" for b, x in
                                                         r["decode_tokens_per_s_w4a16_over_fp16"].items())
                 + f"; prefill {r['prefill_speedup_w4a16_over_fp16']:.2f}x")
    return "\n".join(lines)


def write_json(path: Path, rec: dict) -> None:
    """The record, written atomically (quantgate's writer: the repository root goes on the path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantgate.util import atomic_write_text

    atomic_write_text(Path(path), json.dumps(rec, indent=1) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda without a GPU is refused)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="default: llama3-8b on cuda, tiny on cpu")
    p.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, help="tokens already in the KV cache at decode (default 1024; tiny 32)")
    p.add_argument("--prefill-tokens", type=int, help="prompt length of the prefill timing (default 1024; tiny 64)")
    p.add_argument("--steps", type=int, default=32, help="decode steps a timing (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure; the median is kept")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16", help="the dense baseline's dtype (float16 | bfloat16)")
    p.add_argument("--bandwidth-tbs", type=float, help="memory bandwidth in TB/s (default: the datasheet "
                   "value for the device's name; none on cpu)")
    p.add_argument("--out", type=Path, help="write the JSON record here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = choose_device(a.device)
    shape = SHAPES[a.shape or ("llama3-8b" if device == "cuda" else "tiny")]
    if device == "cpu" and shape.name != "tiny":
        raise SystemExit(f"--shape {shape.name} on cpu: 16 GB of weights and hours a figure; use --shape tiny")
    tiny = shape.name == "tiny"
    rec = run(shape, device, [int(b) for b in a.batches.split(",")], context=a.context or (32 if tiny else 1024),
              prefill_tokens=a.prefill_tokens or (64 if tiny else 1024), steps=a.steps, repeats=a.repeats,
              group_size=a.group_size, dtype=a.dtype,
              bandwidth=a.bandwidth_tbs * 1e12 if a.bandwidth_tbs else None, log=lambda m: print(m, flush=True))
    print(table(rec))
    if a.out:
        write_json(a.out, rec)
    return rec


if __name__ == "__main__":
    main()

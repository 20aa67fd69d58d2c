"""Which arithmetic a checkpoint runs on in process: the dtype it is loaded in and the quantized-matmul
kernels that then compute — one rule for the evaluation's client and the gateway's local provider,
so a deployment is served on the arithmetic its gates were measured on, and both can say which.

GPTQModel's automatic CPU kernels for GPTQ and AWQ (TorchAtenLinear, TorchAtenAwqLinear: the
int4pack ATen matmul) cast activations and scales to bfloat16 whatever the model's dtype. So when
float32 is asked for on CPU, GPTQ-layout checkpoints (GPTQ, RTN) get GPTQModel's `torch` kernel,
which dequantizes into the model's dtype: float32 then means float32 arithmetic, and a checkpoint's
perplexity agrees with transformers 4.57 + auto-gptq to 0.002% (GPTQ) / 0.03% (RTN)
(tests/e2e/test_interop.py). It keeps the dequantized weights, so those layers run at dense float32
speed, about 3x slower per token than the int4 kernel: the CPU recipes score in bfloat16. AWQ keeps
the automatic kernel (GPTQModel's `torch_awq` dequantizes on every call, ~12x slower).

Layer 1: torch/transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EXACT_CPU_BACKENDS = {"gptq": "torch"}

# CPU flags that give bfloat16 matmuls native instructions; without them (an AVX2-only x86 CPU) torch
# emulates bfloat16 and a dense bfloat16 linear runs 6-7x slower than in float32 (measured on a 2-core
# AMD EPYC with avx/avx2: SmolLM2's 1536x576 linear over 2048 rows, 57 ms float32, 402 ms bfloat16)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(flags: set[str]) -> bool:
    """Pure: whether a CPU with these /proc/cpuinfo flags computes bfloat16 natively."""
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's flags (empty where /proc/cpuinfo is missing or says none: not x86 Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def quantize_dtype(method: str, device: str, flags: set[str]) -> str:
    """Pure: the dtype GPTQModel quantizes `method` in. Its loader picks bfloat16 on every CPU ("CPU +
    Torch Fused"); where the CPU has no native bfloat16 that made GPTQ's per-layer forward replays
    6-7x slower (SmolLM2: 57 s became 440 s), so there GPTQ quantizes in float32 (119 s, and more
    exact: the Hessians and replayed activations keep float32; held-out perplexity 47.69 vs 47.84).
    AWQ keeps bfloat16 (with float32_linears below): GPTQModel 7.6's AWQ in float32 picked scales 10x
    larger for q/k/v and wrote a broken checkpoint (perplexity 3.4e6), measured. GPUs keep its choice."""
    if method == "gptq" and device == "cpu" and not native_bf16(flags):
        return "float32"
    return "auto"


def float32_linears(dtype: str | None, device: str, flags: set[str]) -> bool:
    """Pure: whether bfloat16 linears on this device should be computed by bf16_linears_in_float32."""
    return device == "cpu" and dtype == "bfloat16" and not native_bf16(flags)


# rows at and above which a bfloat16 linear is computed in float32: a prefill or calibration batch;
# a decode step (1 row) stays in bfloat16, where converting the weight would cost more than it saves
FLOAT32_MIN_ROWS = 16


def bf16_linears_in_float32(min_rows: int = FLOAT32_MIN_ROWS) -> bool:
    """Compute this process's bfloat16 linears of `min_rows` rows or more as float32 matmuls of the
    same bfloat16 values, rounded to bfloat16 once: the arithmetic torch's CPU bfloat16 GEMM does
    where the CPU lacks bfloat16 instructions (it accumulates in float32 and rounds the output), at
    float32 speed instead of its emulation's (tests/test_quantize_dtype.py checks the outputs agree
    to one bfloat16 step). Patches torch.nn.functional.linear, which nn.Linear calls; returns whether
    it is installed (idempotent). Call it only where float32_linears says so."""
    import torch
    import torch.nn.functional as F

    if getattr(F.linear, "quantgate_float32", False):
        return True
    plain = F.linear
    bf16 = torch.bfloat16

    def linear(x, weight, bias=None):
        if (x.dtype is bf16 and weight.dtype is bf16 and x.device.type == "cpu"
                and x.dim() and x.numel() >= min_rows * x.shape[-1]):
            return plain(x.float(), weight.float(), None if bias is None else bias.float()).to(bf16)
        return plain(x, weight, bias)

    linear.quantgate_float32 = True
    linear.plain = plain
    F.linear = linear
    return True


def kernel_backend(quant_method: str | None, dtype: str | None, device: str) -> str | None:
    """The GPTQModel backend that computes in `dtype` where the automatic choice would not (else None)."""
    if dtype == "float32" and device == "cpu":
        return EXACT_CPU_BACKENDS.get(quant_method or "")
    return None


def quantization_override(folder: str, dtype: str | None, device: str):
    """A quantization_config for from_pretrained that only picks the kernel (transformers keeps the
    checkpoint's own settings and takes the backend from it), or None to leave the choice alone."""
    try:
        qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    backend = kernel_backend(qc.get("quant_method"), dtype, device)
    if backend is None:
        return None
    from transformers import GPTQConfig

    return GPTQConfig(bits=qc["bits"], backend=backend)


def load_kwargs(folder: str, dtype: str | None, device: str) -> dict:
    """from_pretrained's dtype and kernel arguments for `folder` in `dtype` (None: the checkpoint's own)."""
    import torch

    kw = {"dtype": getattr(torch, dtype) if dtype else "auto"}
    if (override := quantization_override(folder, dtype, device)) is not None:
        kw["quantization_config"] = override
    return kw


def per_module_overrides(folder: str) -> bool:
    """True for a GPTQ-layout checkpoint whose config has GPTQModel `dynamic` rules (a mixed
    candidate's per-module bits, or skipped modules). transformers' GPTQ loader (optimum) builds
    every linear at the config's one width and ignores them (measured: a 4/8/16-bit checkpoint then
    fails to load), so such a folder is loaded through GPTQModel, which applies them."""
    try:
        qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "gptq" and bool(qc.get("dynamic"))


def load_causal_lm(folder: str, dtype: str | None, device: str):
    """The model in `folder` for in-process generation, on the kernels of the rule above: through
    transformers, or through GPTQModel where the checkpoint has per-module overrides."""
    kw = load_kwargs(folder, dtype, device)
    # GPTQModel's torch kernel (its CPU choice for 8-bit layers, and ours for float32 on CPU) dequantizes
    # on every call unless told to keep the result: 34 ms against 0.4 ms for the int4 kernel on one
    # SmolLM2 MLP linear (one token), and an RTN checkpoint in float32 decoded at 354 ms per token
    # against the dense baseline's 59; kept, those layers run as dense matmuls and hold their
    # dequantized copy in memory
    os.environ.setdefault("GPTQ_TORCH_CACHE_WEIGHTS", "1")
    if per_module_overrides(folder):
        from gptqmodel import GPTQModel

        if dtype == "float32":  # GPTQModel.load refuses float32 for its torch kernels (7.6, measured)
            raise ValueError(f"{folder}: a checkpoint with per-module bits loads through GPTQModel, whose "
                                 "kernels compute in float16 or bfloat16; evaluate it in one of those "
                                 "(evaluation.dtype: bfloat16)")
        kw.pop("quantization_config", None)
        model = GPTQModel.load(folder, device=device, **kw).model.eval()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device, **kw).eval()
    return on_cpu_arithmetic(model, device)


def on_cpu_arithmetic(model, device: str):
    """`model`, with this process's bfloat16 linears computed in float32 where the CPU emulates
    bfloat16 (float32_linears): what the evaluation and the gateway's local provider both load."""
    if float32_linears(dtype_of(model), device, cpu_flags()):
        bf16_linears_in_float32()
    return model


def emulation(folder: str) -> str | None:
    """How an in-process load computes a checkpoint whose activations are quantized (compressed-tensors
    W8A8 / FP8), or None: transformers decompresses the weights into the load dtype and quantizes then
    dequantizes each token's activations before a dense matmul — the numerics of W8A8/FP8 (checked
    exact against a per-token reference in tests/test_w8a8_fp8.py), not its INT8/FP8 GEMMs or speed."""
    try:
        qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if qc.get("quant_method") != "compressed-tensors":
        return None
    acts = [g.get("input_activations") for g in (qc.get("config_groups") or {}).values() if g.get("input_activations")]
    if not acts:
        return None
    a = acts[0]
    return (f"emulated: weights dequantized to the load dtype, activations quantized to {a.get('type')}"
            f"{a.get('num_bits')} per {a.get('strategy')} and dequantized before dense matmuls (numerics of "
            "the format, not its kernels: speed figures are not the format's)")


def kernels_of(model) -> dict[str, int]:
    """The classes doing the model's quantized matmuls and how many of each (a dense model: {})."""
    from collections import Counter

    return dict(Counter(type(m).__name__ for m in model.modules() if hasattr(m, "qweight")))


def dtype_of(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def arithmetic_problems(evaluated: dict, served: dict) -> list[str]:
    """Pure: how the arithmetic served ({dtype, kernels}) differs from the one evaluated (empty: none)."""
    out = []
    if evaluated.get("dtype") and served.get("dtype") and evaluated["dtype"] != served["dtype"]:
        out.append(f"dtype {served['dtype']} is served, the gates were measured in {evaluated['dtype']}")
    ek, sk = evaluated.get("kernels"), served.get("kernels")
    if ek is not None and sk is not None and set(ek) != set(sk):
        out.append(f"kernels {', '.join(sorted(sk)) or 'dense'} are served, the gates were measured on "
                   f"{', '.join(sorted(ek)) or 'dense'}")
    return out

"""quantgate's 4-bit checkpoints in the libraries users load them with: transformers 4.57 + optimum 1.24
(+ auto-gptq 0.7.1), in a second venv made by scripts/setup-interop-venv.sh, on the very windows
quantgate's evaluation scored. Two comparisons:
- float32 on both sides (quantgate's own client and perplexity code, with GPTQModel's float32 kernel):
  within the issue's 0.1%. This is where a checkpoint is read wrongly or rightly, with no kernel
  rounding in between.
- the dtype the evaluation record says every candidate was scored in (bfloat16 for the CPU recipes):
  the record's own number, within 0.2% (see below for why bfloat16 allows 2^-9).

Where the old 0.14-0.28% came from: GPTQModel's automatic CPU kernel (TorchAtenLinear, the int4pack
ATen matmul) casts activations and scales to bfloat16 whatever the model's dtype, so quantgate
scored "float32" 4-bit layers in bfloat16 against auto-gptq's float32 dequantization. The dense
baseline is bit-identical in both stacks in float32 and in bfloat16, so the model code agrees; the
difference is the 4-bit kernels' arithmetic alone. Measured on one run's checkpoints (16 windows of
256, `scripts/interop_probe.py` in each venv):

    checkpoint  dtype     GPTQModel kernel                quantgate side   transformers 4.57 + auto-gptq
    rtn-w4g64   float32   TorchAtenLinear (bf16 inside)   43.9586          43.8374   0.28%
    rtn-w4g64   float32   TorchLinear (float32 matmul)    43.8257          43.8374   0.027%
    rtn-w4g64   bfloat16  TorchAtenLinear                 43.8081          43.8239   0.036%
    gptq-w4g64  float32   TorchAtenLinear (bf16 inside)   36.4802          36.5139   0.092%
    gptq-w4g64  float32   TorchLinear (float32 matmul)    36.5131          36.5139   0.002%
    gptq-w4g64  bfloat16  TorchAtenLinear / TorchLinear   36.4613/36.4606  36.5098   0.13%

Per layer (layer 0 q_proj, identical inputs): TorchAtenLinear vs auto-gptq 2.2e-3 relative (bfloat16's
step), GPTQModel's TorchLinear vs auto-gptq 1.2e-4 (its float16 dequantization). So the checkpoints
are read identically (float32 with float32 kernels: 0.03% or better), and what is left in bfloat16
is where each library rounds: auto-gptq rounds the scales to bfloat16 and the dequantized weight
again, GPTQModel keeps float16 scales and rounds once inside its kernel. bfloat16 keeps 8
significant bits, so two such kernels may put each weight half a step apart, 2^-9 = 0.2% relative:
that is the tolerance, and the measured 0.036% / 0.13% sit inside it. (What it still catches: a
wrong rope_theta moved perplexity by 13%, a wrong zero-point convention by far more.) quantgate
scores in bfloat16 because its CPU recipes declare evaluation.dtype: bfloat16 (GPTQModel's
automatic int4 kernels compute in bfloat16 anyway; its float32 kernel for the GPTQ layout made the
RTN evaluation 3x slower, TPOT 152 ms against 41 ms for the float32 baseline, and AWQ's ~12x).

AWQ is not covered: transformers 4.57 loads AWQ only through autoawq (deprecated upstream, "no
longer maintained"), and on CPU only through its IPEX path, which needs intel-extension-for-pytorch
(last release 2.8.0, built for torch 2.8; the venv has torch 2.13). The AWQ case runs where the
venv has autoawq and skips with that reason where it does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from quantgate.kernels import cpu_flags, native_bf16

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

SCRIPT = r'''
import collections, json, math, sys
import torch
from transformers import AutoModelForCausalLM
job = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(job["folder"], device_map="cpu",
                                             torch_dtype=getattr(torch, job["dtype"])).eval()
kernels = dict(collections.Counter(type(m).__name__ for m in model.modules() if hasattr(m, "qweight")))
nll, n = 0.0, 0
for i in range(0, len(job["windows"]), 4):
    ids = torch.tensor(job["windows"][i:i + 4])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[:, :-1], dim=-1)
    tok = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    nll += tok.sum().item(); n += tok.numel()
import transformers
print(json.dumps({"perplexity": math.exp(nll / n), "rope_theta": getattr(model.config, "rope_theta", None),
                  "transformers": transformers.__version__, "dtype": str(model.dtype), "kernels": kernels}))
'''


BF16_EMULATED = ("this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag): transformers 4.57 + auto-gptq "
                 "score a checkpoint in emulated bfloat16 for over 11 minutes (measured, gptq-w4g64, 16 windows); "
                 "the float32 comparison above still checks the checkpoint is read the same")


def interop_python() -> Path | None:
    home = Path(os.environ.get("QUANTGATE_ENGINES_HOME") or Path.home() / ".cache" / "quantgate" / "engines")
    py = home / "interop-venv" / "bin" / "python"
    return py if py.is_file() else None


AWQ_UNAVAILABLE = ("transformers 4.57 loads AWQ only through autoawq (deprecated, unmaintained), and on CPU only via "
                   "intel-extension-for-pytorch, whose last release (2.8.0) is built for torch 2.8, not this venv's torch")


def reference_perplexity(py: Path, tmp_path: Path, folder: str, windows: list, dtype: str) -> dict:
    """The checkpoint's perplexity on `windows` in the interop venv (transformers 4.57 + auto-gptq)."""
    job = tmp_path / f"job-{dtype}.json"
    job.write_text(json.dumps({"folder": folder, "windows": windows, "dtype": dtype}))
    script = tmp_path / "ppl.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([str(py), str(script), str(job)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rope_theta"] == 100000.0  # 10000 (what 4.57 read before) moves perplexity by more than 10%
    assert got["dtype"] == f"torch.{dtype}"
    return got


@pytest.mark.parametrize("name", ["gptq-w4g64", "rtn-w4g64"])
def test_checkpoint_in_float32_gives_the_same_perplexity_within_0_1_percent(smollm2_run, tmp_path, name):
    """Like with like at full precision: quantgate's own client and perplexity code in float32 (GPTQModel's
    float32 kernel, see quantgate.kernels.kernel_backend) against transformers 4.57 + auto-gptq in
    float32, on the windows quantgate's evaluation scored. This is where the checkpoint is read, with no
    kernel rounding in between: the issue's 0.1%."""
    py = interop_python()
    if py is None:
        pytest.skip("no interop venv: run scripts/setup-interop-venv.sh (transformers 4.57, optimum 1.24, auto-gptq 0.7.1)")
    from quantgate.evaluate.clients.transformers_local import TransformersClient
    from quantgate.evaluate.quality import perplexity, perplexity_windows

    folder = smollm2_run["quantized"][name]["artifact"]
    client = TransformersClient(folder, device="cpu", dtype="float32")
    asyncio.run(client.start())
    assert set(client.kernels()) == {"TorchLinear"}  # float32 arithmetic, not the bfloat16 int4 kernel
    windows = perplexity_windows(client.tokenizer, smollm2_run["recipe"].evaluation.perplexity)
    ours = perplexity(client.model, windows).perplexity
    del client
    got = reference_perplexity(py, tmp_path, folder, windows, "float32")
    print(f"\n{name} in float32: quantgate {ours:.4f}, transformers {got['transformers']} {got['perplexity']:.4f} "
          f"({got['kernels']}), {abs(got['perplexity'] / ours - 1):.4%} apart")
    assert got["perplexity"] == pytest.approx(ours, rel=1e-3)


@pytest.mark.parametrize("name", ["gptq-w4g64", "rtn-w4g64", "awq-w4g64"])
def test_checkpoint_gives_the_same_perplexity_in_transformers_4_57(smollm2_run, tmp_path, name):
    py = interop_python()
    if py is None:
        pytest.skip("no interop venv: run scripts/setup-interop-venv.sh (transformers 4.57, optimum 1.24, auto-gptq 0.7.1)")
    if name.startswith("awq") and subprocess.run([str(py), "-c", "import awq"], capture_output=True).returncode:
        pytest.skip(AWQ_UNAVAILABLE)
    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import perplexity_windows
    from quantgate.recipe import stable_hash

    folder = smollm2_run["quantized"][name]["artifact"]
    record = json.loads((smollm2_run["run_dir"] / "evaluate" / f"{name}.json").read_text())
    ours = record["quality"]["perplexity"]
    assert record["dtype"] == smollm2_run["recipe"].evaluation_dtype  # what quantgate scored it in
    if record["dtype"] == "bfloat16" and not native_bf16(cpu_flags()):
        pytest.skip(BF16_EMULATED)
    windows = perplexity_windows(AutoTokenizer.from_pretrained(folder), smollm2_run["recipe"].evaluation.perplexity)
    assert stable_hash(windows)[:16] == ours["protocol"]["windows_hash"]  # the very windows quantgate scored
    got = reference_perplexity(py, tmp_path, folder, windows, record["dtype"])
    print(f"\n{name} in {record['dtype']}: quantgate {ours['perplexity']:.4f} ({record.get('kernels')}), "
          f"transformers {got['transformers']} {got['perplexity']:.4f} ({got['kernels']}), "
          f"{abs(got['perplexity'] / ours['perplexity'] - 1):.3%} apart")
    # half a bfloat16 step (2^-9); float32 scoring would allow 0.1% (see the module docstring)
    assert got["perplexity"] == pytest.approx(ours["perplexity"], rel=2e-3 if record["dtype"] == "bfloat16" else 1e-3)

"""Which dtype GPTQModel quantizes in, by CPU: float32 for GPTQ where bfloat16 is emulated, and the
checkpoint then stored as GPTQModel's default would store it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantgate.kernels import cpu_flags, native_bf16, quantize_dtype
from quantgate.quantize.gptqmodel_backend import downcast_dense

AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
SAPPHIRE = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_bf16_is_native_only_with_avx512_bf16_or_amx():
    assert not native_bf16(AVX2)
    assert not native_bf16(AVX2 | {"avx512f", "avx512bw"})  # AVX-512 without its bf16 extension
    assert native_bf16(AVX2 | {"avx512_bf16"})
    assert native_bf16(AVX2 | {"amx_bf16"})


@pytest.mark.parametrize("method,device,flags,expected", [
    ("gptq", "cpu", AVX2, "float32"),      # emulated bfloat16: 6-7x slower forward replays
    ("gptq", "cpu", SAPPHIRE, "auto"),     # GPTQModel's bfloat16 is the fast choice there
    ("gptq", "cuda", AVX2, "auto"),        # the host CPU does not matter on a GPU
    ("awq", "cpu", AVX2, "auto"),          # GPTQModel 7.6's float32 AWQ wrote a broken checkpoint
])
def test_quantize_dtype_by_method_device_and_cpu(method, device, flags, expected):
    assert quantize_dtype(method, device, flags) == expected


def test_cpu_flags_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx avx2 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx", "avx2"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_downcast_keeps_packed_tensors_and_scales_and_says_bfloat16(tmp_path):
    dense = torch.randn(8, 4)
    tensors = {"model.embed_tokens.weight": dense, "model.layers.0.q.qweight": torch.arange(8, dtype=torch.int32),
               "model.layers.0.q.scales": torch.rand(2, 4).half()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    downcast_dense(tmp_path, "bfloat16")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(got["model.embed_tokens.weight"], dense.to(torch.bfloat16))
    assert torch.equal(got["model.layers.0.q.qweight"], tensors["model.layers.0.q.qweight"])
    assert got["model.layers.0.q.scales"].dtype == torch.float16
    assert torch.equal(got["model.layers.0.q.scales"], tensors["model.layers.0.q.scales"])
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("dtype,device,flags,expected", [
    ("bfloat16", "cpu", AVX2, True),
    ("bfloat16", "cpu", SAPPHIRE, False),
    ("float32", "cpu", AVX2, False),
    ("bfloat16", "cuda", AVX2, False),
])
def test_float32_linears_only_for_bfloat16_on_a_cpu_that_emulates_it(dtype, device, flags, expected):
    from quantgate.kernels import float32_linears

    assert float32_linears(dtype, device, flags) is expected


def test_bf16_linears_in_float32_round_like_bfloat16_and_leave_the_rest_alone(monkeypatch):
    import torch.nn.functional as F

    from quantgate.kernels import FLOAT32_MIN_ROWS, bf16_linears_in_float32

    plain = getattr(F.linear, "plain", F.linear)  # an earlier bfloat16 load in this process may have installed it
    monkeypatch.setattr(F, "linear", plain)  # restored after the test
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 384).to(torch.bfloat16)
    batch = torch.randn(2, 64, 576).to(torch.bfloat16)
    step = torch.randn(1, 1, 576).to(torch.bfloat16)
    wide = torch.randn(64, 576)
    expected, expected_step = plain(batch, lin.weight, lin.bias), plain(step, lin.weight, lin.bias)
    expected_wide = plain(wide, lin.weight.float(), lin.bias.float())
    assert bf16_linears_in_float32() and bf16_linears_in_float32()  # idempotent
    assert F.linear is not plain and F.linear.plain is plain
    got = lin(batch)  # nn.Linear goes through the patched F.linear
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # both accumulate in float32 and round once: nearly all outputs are bit-identical, the rest one
    # bfloat16 step apart or within float32's summation-order error of the terms' size (near-zero sums)
    diff = (got.float() - expected.float()).abs()
    terms = batch.float().abs() @ lin.weight.float().abs().T + lin.bias.float().abs()
    assert (diff == 0).float().mean() > 0.99
    assert (diff <= torch.finfo(torch.bfloat16).eps * expected.float().abs() + 1e-4 * terms).all()
    assert not torch.equal(got.float(), plain(batch.float(), lin.weight.float(), lin.bias.float()))  # rounded
    assert step.numel() < FLOAT32_MIN_ROWS * 576 and torch.equal(lin(step), expected_step)  # decode: plain
    assert torch.equal(F.linear(wide, lin.weight.float(), lin.bias.float()), expected_wide)  # float32: plain

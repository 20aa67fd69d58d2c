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

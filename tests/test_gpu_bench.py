"""The GPU benches' logic on CPU: the W4A16 kernel computes the right function and is named, the
device choice refuses a GPU that is not there, memory is read from torch.cuda when present, the
bandwidth table, and tiny-shape runs of the decode and GPTQ benches (seconds, no GPU)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("gpu_w4", "gpu_decode", "gpu_gptq"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield lambda name: importlib.import_module(name)
    for name in ("gpu_w4", "gpu_decode", "gpu_gptq"):
        sys.modules.pop(name, None)


def test_the_cpu_int4_kernel_computes_the_dequantized_matmul(bench):
    w4 = bench("gpu_w4")
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 256, generator=g), torch.randn(5, 256, generator=g).to(torch.bfloat16)
    q, s, z = w4.quantize_groups(w, 64)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    ref = x.float() @ w4.dequantize(q, s, z, 64, torch.float32).t()
    for kernel in ("int4pack-cpu", "dequant"):
        y = w4.W4Linear(w, 64, kernel)(x).float()
        assert (y - ref).norm() / ref.norm() < 1e-2, kernel
    # the 4-bit weight is close to the original: one step of 16 over each group's range
    assert (w4.dequantize(q, s, z, 64, torch.float32) - w).abs().max() <= (s.max() / 2) * 1.01


def test_a_kernel_that_computes_the_wrong_function_is_not_picked(bench, monkeypatch):
    w4 = bench("gpu_w4")
    assert w4.pick_kernel("cpu").name == "int4pack-cpu"
    real_pack = w4.pack
    monkeypatch.setattr(w4, "pack", lambda q, kernel: real_pack(15 - q, kernel))  # nibbles flipped
    choice = w4.pick_kernel("cpu")
    assert choice.name == "dequant" and not choice.int4
    assert "int4pack-cpu: relative error" in choice.why


def test_cuda_is_tried_first_and_a_missing_op_is_named(bench, monkeypatch):
    w4 = bench("gpu_w4")
    assert w4.candidates("cuda")[0] == "int4pack-cuda"

    def no_cuda(kernel, device, **kw):
        if kernel == "int4pack-cuda":
            raise RuntimeError("Could not run '_convert_weight_to_int4pack' with arguments from the 'CPU' backend")
        return 0.001

    monkeypatch.setattr(w4, "check", no_cuda)
    choice = w4.pick_kernel("cuda")
    assert choice.name == "dequant" and "int4pack-cuda: RuntimeError" in choice.why


def test_device_choice_never_fakes_a_gpu(bench, monkeypatch):
    dec = bench("gpu_decode")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dec.choose_device("auto") == "cpu"
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        dec.choose_device("cuda")
    with pytest.raises(SystemExit, match="not one of"):
        dec.choose_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dec.choose_device("auto") == "cuda" and dec.choose_device("cpu") == "cpu"


def test_peak_memory_comes_from_torch_cuda_when_there_is_one(bench, monkeypatch):
    dec = bench("gpu_decode")
    assert dec.peak_memory_mb("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    assert dec.peak_memory_mb("cuda") == 3072.0


def test_bandwidth_by_device_name(bench):
    dec = bench("gpu_decode")
    assert dec.spec_bandwidth("NVIDIA H200") == 4.8e12
    assert dec.spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12  # the SXM part
    assert dec.spec_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert dec.spec_bandwidth("cpu") is None and dec.spec_bandwidth(None) is None


def test_the_8b_shape_reads_16_gb_in_fp16_and_about_a_third_in_w4(bench):
    s = bench("gpu_decode").SHAPES["llama3-8b"]
    fp16 = 2 * (s.layers * s.layer_params() + s.vocab * s.hidden)  # + lm_head
    assert 14.5e9 < fp16 < 15.5e9  # + the embedding table (not read a step): the 16 GB of the issue
    w4 = s.layers * (s.layer_params() // 2 + s.layer_params() // 128 * 4) + 2 * s.vocab * s.hidden
    assert 2.9 < fp16 / w4 < 3.3  # the bound on the W4A16 speed-up at batch 1


def test_the_decode_dry_run_measures_both_variants_and_their_ratio(bench, tmp_path):
    dec = bench("gpu_decode")
    rec = dec.main(["--device", "cpu", "--batches", "1,4", "--steps", "2", "--repeats", "1",
                    "--bandwidth-tbs", "0.05", "--out", str(tmp_path / "d.json")])
    assert rec["kernel"]["name"] == "int4pack-cpu" and rec["variants"]["w4a16"]["kernel"] == "int4pack-cpu"
    fp, w4 = rec["variants"]["fp16"], rec["variants"]["w4a16"]
    assert [r["batch"] for r in w4["decode"]] == [1, 4]
    assert fp["weight_bytes"] > 2.5 * w4["weight_bytes"] - fp["weight_bytes"] * 0.2  # lm_head stays 16-bit
    for r in fp["decode"] + w4["decode"]:
        assert r["tpot_ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["tpot_ms"] * 1000, rel=1e-3)
        assert r["fraction_of_bandwidth_limit"] == pytest.approx(r["floor_ms"] / r["tpot_ms"], rel=1e-2)
    got = rec["ratios"]["decode_tokens_per_s_w4a16_over_fp16"]["1"]
    assert got == pytest.approx(w4["decode"][0]["tokens_per_s"] / fp["decode"][0]["tokens_per_s"], rel=1e-2)
    assert (tmp_path / "d.json").is_file()


def test_gptq_lowers_the_output_error_below_round_to_nearest(bench):
    gq, w4 = bench("gpu_gptq"), bench("gpu_w4")
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=g)
    x = torch.randn(2048, 128, generator=g) @ mix  # correlated inputs: where GPTQ's error feedback pays
    w = torch.randn(64, 128, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    q = gq.solve(w, h, group_size=32)
    qi, s, z = w4.quantize_groups(w, 32)
    rtn = w4.dequantize(qi, s, z, 32, torch.float32)
    assert (x @ (q - w).t()).norm() < 0.8 * (x @ (rtn - w).t()).norm()


def test_the_gptq_dry_run_times_every_part_and_extrapolates_only_the_tokens(bench):
    gq = bench("gpu_gptq")
    rec = gq.run(bench("gpu_decode").SHAPES["tiny"], "cpu", windows=2, seq_len=32, batch=1, group_size=64,
                 log=lambda s: None)
    m = rec["measured"]
    assert m["tokens"] == 64 and set(m["solve_s"]) == {"qkv", "o", "gate_up", "down"}
    x = rec["at_128x2048"]
    assert x["extrapolated"] and x["tokens"] == 128 * 2048
    per_token = (m["hessian_forward_s"] + m["next_inputs_forward_s"]) / 64
    assert x["layer_s"] == pytest.approx(per_token * 128 * 2048 + sum(m["solve_s"].values()), rel=1e-2, abs=0.01)
    assert x["model_s"] == pytest.approx(x["layer_s"] * 2, rel=1e-2)

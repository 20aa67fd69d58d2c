"""W8A8 (SmoothQuant + GPTQ, INT8) and FP8-dynamic candidates through llm-compressor: the recipe they
ask for, the checkpoints they write on CPU, how the in-process evaluation computes them (emulated,
and said so), and what the format table says about serving them."""

from __future__ import annotations

import pytest

from quantgate.formats import Artifact, expected
from quantgate.quantize.llmcompressor_backend import modifiers
from quantgate.recipe import FP8Spec, W8A8Spec


def test_w8a8_smooths_before_gptq_and_fp8_needs_no_calibration():
    w = W8A8Spec(name="w", method="w8a8", smoothing_strength=0.7)
    assert [n for n, _ in modifiers(w)] == ["SmoothQuantModifier", "GPTQModifier"]
    assert modifiers(w)[0][1] == {"smoothing_strength": 0.7}
    assert modifiers(w)[1][1]["scheme"] == "W8A8" and modifiers(w)[1][1]["ignore"] == ["lm_head"]
    f = FP8Spec(name="f", method="fp8")
    assert modifiers(f) == [("QuantizationModifier", {"scheme": "FP8_DYNAMIC", "targets": ["Linear"],
                                                      "ignore": ["lm_head"]})]
    assert w.calibrated and not f.calibrated


def test_the_table_says_fp8_needs_a_gpu_and_w8a8_on_cpu_depends_on_avx512():
    fp8 = Artifact("f", "/x", "compressed-tensors", method="fp8")
    w8 = Artifact("w", "/x", "compressed-tensors", method="w8a8")
    assert expected("vllm", fp8, "cpu").status == "no" and "GPU" in expected("vllm", fp8, "cpu").reason
    assert expected("vllm", fp8, "cuda").status == "yes"
    assert expected("vllm", w8, "cpu").status == "maybe" and "AVX-512" in expected("vllm", w8, "cpu").reason
    assert "emulated" in expected("transformers", w8, "cpu").kernel


@pytest.mark.parametrize("spec", [W8A8Spec(name="w", method="w8a8"), FP8Spec(name="f", method="fp8")],
                         ids=["w8a8", "fp8"])
def test_in_process_evaluation_emulates_the_format_exactly_and_says_so(spec, tmp_path, tiny_model):
    """Each linear's output is its dequantized weights times per-token quantized activations (INT8 with
    compressed-tensors' scale amax/127.5, FP8 E4M3 with amax/448), and the record's note says emulated."""
    pytest.importorskip("llmcompressor")
    import torch

    from quantgate.kernels import emulation, load_causal_lm
    from quantgate.quantize.base import QuantizeContext
    from quantgate.quantize.llmcompressor_backend import LLMCompressorQuantizer

    windows = [[(5 * i + j) % 200 + 3 for j in range(32)] for i in range(4)]
    out = tmp_path / "out"
    out.mkdir()
    outcome = LLMCompressorQuantizer().quantize(spec, QuantizeContext(tiny_model, windows if spec.calibrated else None), out)
    assert outcome.format == "compressed-tensors"
    assert emulation(str(out)).startswith("emulated:") and emulation(str(tiny_model)) is None
    model = load_causal_lm(str(out), "float32", "cpu")
    q = model.model.layers[1].self_attn.q_proj
    got = {}
    q.register_forward_pre_hook(lambda mod, args: got.update(w=mod.weight.detach().clone()))
    q.register_forward_hook(lambda mod, i, o: got.update(x=i[0].detach()[0], y=o.detach()[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([windows[0][:12]]))
    x, y, w = got["x"], got["y"], got["w"]
    if spec.method == "w8a8":
        s = x.abs().amax(-1, keepdim=True) / 127.5
        xq = (x / s).round().clamp(-128, 127) * s
    else:
        s = x.abs().amax(-1, keepdim=True) / 448
        xq = (x / s).to(torch.float8_e4m3fn).float() * s
    assert (y - xq @ w.T).norm() / y.norm() < 1e-5  # the activations really were quantized per token
    assert (y - x @ w.T).norm() / y.norm() > 1e-4  # and that is visible (not a dense matmul)

"""CUDA-specific decisions that need no GPU: the device choice, the kernel a record names, the
comparison's word when candidates ran on different arithmetic, peak GPU memory, cost per GPU-hour."""

from __future__ import annotations

import sys
import types

import pytest

from quantgate.evaluate.compare import compare
from quantgate.evaluate.cost import cost_metrics
from quantgate.evaluate.report import arithmetic, kernel_label
from quantgate.pipeline import resolve_device
from quantgate.recipe import CostSpec


def _fake_torch(monkeypatch, cuda: bool, peak_bytes: int = 0):
    fake = types.SimpleNamespace(__version__="9.9", cuda=types.SimpleNamespace(
        is_available=lambda: cuda, max_memory_allocated=lambda: peak_bytes))
    monkeypatch.setitem(sys.modules, "torch", fake)
    return fake


def test_auto_takes_the_gpu_only_where_torch_sees_one(monkeypatch):
    _fake_torch(monkeypatch, cuda=True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"
    _fake_torch(monkeypatch, cuda=False)
    assert resolve_device("auto") == "cpu"


def test_an_explicit_cuda_is_passed_on_for_a_worker_that_may_have_the_gpu(monkeypatch):
    _fake_torch(monkeypatch, cuda=False)  # a Ray head without a GPU, its worker node with one
    assert resolve_device("cuda") == "cuda"


def test_peak_gpu_memory_is_read_from_torch_cuda_when_present(monkeypatch):
    from quantgate.evaluate import memory

    _fake_torch(monkeypatch, cuda=True, peak_bytes=5 * 2**30)
    assert memory.process_peak()["peak_cuda_mb"] == 5120
    _fake_torch(monkeypatch, cuda=False)
    assert "peak_cuda_mb" not in memory.process_peak()


def test_a_record_names_the_kernel_classes_its_matmuls_ran_on():
    from quantgate.evaluate.clients.transformers_local import TransformersClient

    class TritonV2QuantLinear:  # what GPTQModel's CUDA path loads (a class with a qweight)
        qweight = object()

    class Linear:
        pass

    client = TransformersClient("unused", device="cuda")
    client.model = types.SimpleNamespace(modules=lambda: [Linear(), TritonV2QuantLinear(), TritonV2QuantLinear()])
    assert client.kernels() == {"TritonV2QuantLinear": 2}
    client.model = types.SimpleNamespace(modules=lambda: [Linear()])
    assert client.kernels() == {}


def _rows(kernels):
    return [{"name": n, "method": "x", "metrics": {"perplexity": 10.0 + i}, "dtype": "float16", "kernels": k}
            for i, (n, k) in enumerate(kernels.items())]


def test_the_comparison_says_when_candidates_ran_on_different_arithmetic():
    same = compare(_rows({"base": {}, "gptq": {"TritonV2QuantLinear": 210}, "awq": {"TritonV2QuantLinear": 210}}),
                   "base", [])
    assert arithmetic(same) == ""
    mixed = compare(_rows({"base": {}, "gptq": {"TorchQuantLinear": 210}, "awq": {"AwqTorchLinear": 210}}), "base", [])
    note = arithmetic(mixed)
    assert "different arithmetic" in note and "gptq TorchQuantLinear" in note and "awq AwqTorchLinear" in note
    assert "base" not in note  # the baseline is dense by definition
    old = compare(_rows({"base": None, "gptq": {"TorchQuantLinear": 1}, "awq": None}), "base", [])
    assert arithmetic(old) == ""  # records from before the field say nothing, rather than a false alarm
    assert kernel_label({}) == "dense" and kernel_label({"B": 1, "A": 2}) == "A + B" and kernel_label(None) is None


def test_cost_per_gpu_hour_charges_wall_time():
    m = cost_metrics(CostSpec(usd_per_hour=2.50), requests_per_s=2.0, output_tokens_per_s=500.0,
                     mean_tokens_in=256, mean_tokens_out=250)
    assert m["usd_per_1m_output_tokens"] == pytest.approx(2.50 / 3600 / 500 * 1e6)  # 1.389 $/1M
    assert m["usd_per_request"] == pytest.approx(2.50 / 3600 / 2.0)
    # twice the tokens a second on the same GPU-hour: half the price a token
    faster = cost_metrics(CostSpec(usd_per_hour=2.50), requests_per_s=4.0, output_tokens_per_s=1000.0,
                          mean_tokens_in=256, mean_tokens_out=250)
    assert faster["usd_per_1m_output_tokens"] == pytest.approx(m["usd_per_1m_output_tokens"] / 2)
    assert cost_metrics(CostSpec(usd_per_hour=2.50), requests_per_s=0, output_tokens_per_s=0, mean_tokens_in=0,
                        mean_tokens_out=0)["usd_per_1m_output_tokens"] == float("inf")

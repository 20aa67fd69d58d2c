"""quantgate's AWQ clip search picks exactly what GPTQModel's own search picks."""

import types

import pytest
import torch

from quantgate.quantize import awq_clip

AWQProcessor = pytest.importorskip("gptqmodel.looper.awq_processor").AWQProcessor


@pytest.mark.parametrize("sym", [False, True])
def test_matmul_clip_search_matches_the_library(sym):
    orig = AWQProcessor._compute_best_clip
    if orig is awq_clip.compute_best_clip:
        pytest.skip("already installed in this process")
    proc = object.__new__(AWQProcessor)
    proc.qcfg = types.SimpleNamespace(group_size=32, bits=4, sym=sym, zero_point=not sym)
    torch.manual_seed(0)
    w, x = torch.randn(128, 96), torch.randn(300, 96)
    assert torch.equal(awq_clip.compute_best_clip(proc, w, x, n_sample_token=128), orig(proc, w, x, n_sample_token=128))


def test_install_only_replaces_the_shape_it_knows(monkeypatch):
    monkeypatch.setattr(AWQProcessor, "_compute_best_clip", lambda self, w, input_feat: None)
    assert awq_clip.install() is False


@pytest.fixture
def float32_products():
    yield awq_clip.FLOAT32_PRODUCTS.update(on=True)
    awq_clip.FLOAT32_PRODUCTS.update(on=False)


def test_float32_products_are_the_bfloat16_products_rounded_once(float32_products):
    """Where the CPU has no native bfloat16 the clip search's products run in float32: each output is the
    exact sum of the bfloat16 values' products, rounded to bfloat16 once (within one bfloat16 step, plus
    float32's accumulation error where a sum cancels to almost nothing)."""
    torch.manual_seed(1)
    xg, w = torch.randn(9, 200, 64).bfloat16(), torch.randn(64, 1, 9, 64).bfloat16()
    got = awq_clip._group_outputs(xg, w)
    assert got.dtype is torch.bfloat16 and got.shape == (64, 200, 9)
    wt = w[:, 0].permute(1, 2, 0).double()
    exact = torch.bmm(xg.double(), wt).permute(2, 1, 0)
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)  # bfloat16: 8 bits of mantissa
    accumulation = 64 * 2.0 ** -24 * torch.bmm(xg.double().abs(), wt.abs()).permute(2, 1, 0)
    assert ((got.double() - exact).abs() <= step + accumulation).all()
    awq_clip.FLOAT32_PRODUCTS.update(on=False)
    plain = awq_clip._group_outputs(xg, w)  # torch's own bfloat16 bmm: the same values but for summation order
    assert (plain != got).float().mean() < 1e-3


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_products_pick_the_clips_the_bfloat16_search_picks(sym, seed, float32_products):
    """The same choices as the bfloat16 matmul search; both near GPTQModel's own bfloat16 search, which
    rounds every product to bfloat16 before it sums them (an arithmetic of its own)."""
    orig = AWQProcessor._compute_best_clip
    if orig is awq_clip.compute_best_clip:
        pytest.skip("already installed in this process")
    proc = object.__new__(AWQProcessor)
    proc.qcfg = types.SimpleNamespace(group_size=32, bits=4, sym=sym, zero_point=not sym)
    torch.manual_seed(seed)
    w, x = torch.randn(128, 96).bfloat16(), torch.randn(300, 96).bfloat16()
    ours = awq_clip.compute_best_clip(proc, w, x, n_sample_token=128)
    awq_clip.FLOAT32_PRODUCTS.update(on=False)
    assert torch.equal(ours, awq_clip.compute_best_clip(proc, w, x, n_sample_token=128))
    assert (ours == orig(proc, w, x, n_sample_token=128)).float().mean() >= 0.95  # measured 0.97-0.99


def test_install_sets_whether_products_run_in_float32(monkeypatch):
    monkeypatch.setattr(AWQProcessor, "_compute_best_clip", AWQProcessor._compute_best_clip)  # restored after
    monkeypatch.setitem(awq_clip.FLOAT32_PRODUCTS, "on", False)
    assert awq_clip.install(float32_products=True) and awq_clip.FLOAT32_PRODUCTS["on"]
    assert AWQProcessor._compute_best_clip is awq_clip.compute_best_clip
    assert awq_clip.install() and not awq_clip.FLOAT32_PRODUCTS["on"]

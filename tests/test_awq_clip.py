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

import pytest
import torch

from quantgate.errors import QuantgateError
from quantgate.quantize.rtn import dequantize, fake_quantize, pack_gptq, pack_rows, quantize_weight, unpack_gptq, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_error_is_at_most_half_a_step(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(24, 64)
    q, scale, zero = quantize_weight(w, bits, group_size, sym)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    err = (dequantize(q, scale, zero, group_size) - w).abs()
    g = 64 if group_size == -1 else group_size
    step = scale.repeat_interleave(g, dim=1)
    assert (err <= step / 2 + 1e-6).all()


def test_more_bits_means_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    errs = [(fake_quantize(w, b, 32, False) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] / 100


def test_smaller_groups_mean_less_error():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)  # columns of very different ranges
    e_group = (fake_quantize(w, 4, 32, True) - w).pow(2).mean()
    e_channel = (fake_quantize(w, 4, -1, True) - w).pow(2).mean()
    assert e_group < e_channel


def test_values_on_the_grid_are_exact():
    scale = 0.25
    codes = torch.randint(0, 16, (8, 32)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # pin the range so the grid is recovered exactly
    w = (codes - 0) * scale
    assert torch.allclose(fake_quantize(w, 4, 32, False), w)


def test_symmetric_zero_point_is_mid_range():
    _, _, zero = quantize_weight(torch.randn(4, 32), 4, 32, True)
    assert (zero == 8).all()


def test_group_size_must_divide_width():
    with pytest.raises(QuantgateError, match="does not divide"):
        quantize_weight(torch.randn(4, 96), 4, 64, True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    v = torch.randint(0, 2**bits, (64, 10), dtype=torch.int32)
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 10)
    assert torch.equal(unpack_rows(packed, bits), v)


def test_pack_layout_matches_gptq_lowest_bits_first():
    v = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]], dtype=torch.int32)
    word = pack_rows(v, 4).item() & 0xFFFFFFFF
    assert word == 0xF7654321


@pytest.mark.parametrize("v2", [False, True])
def test_gptq_tensors_round_trip_codes_and_zeros(v2):
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    q, scale, zero = quantize_weight(w, 4, 32, sym=not v2)
    t = pack_gptq(q, scale, zero, 4, 32, v2=v2)
    assert t["qweight"].shape == (8, 16) and t["qzeros"].shape == (2, 2)
    assert t["scales"].shape == (2, 16) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [0] * 32 + [1] * 32
    q2, zero2 = unpack_gptq(t, 4, v2=v2)
    assert torch.equal(q2, q) and torch.equal(zero2, zero.to(torch.int32))

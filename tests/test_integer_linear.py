"""The integer spiking linear: exact integer products, thresholds folded in, W8A8 on the same kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snn_research.hybrid.adapter import weighted_levels
from snn_research.hybrid.integer import (
    IntegerWeight,
    encode_int8,
    float_reference,
    fold_thresholds,
    integer_linear,
    levels_as_int8,
    quantize_spiking_linear,
    quantize_weight,
    w8a8_linear,
)


def site(tokens: int, inputs: int, outputs: int, time_steps: int, seed: int = 0):
    """A consumer of a weighted-code site: activations with heavy channels, thresholds, weight, levels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inputs, generator=generator) * torch.rand(inputs, generator=generator).mul(3).exp()
    threshold = x.abs().quantile(0.99, dim=0).clamp_min(1e-3)
    weight = torch.randn(outputs, inputs, generator=generator) / inputs ** 0.5
    levels = weighted_levels(x, threshold, time_steps)
    return x, threshold, weight, levels


@pytest.mark.parametrize("bits,group_size,time_steps", [(8, None, 5), (8, None, 7), (4, 128, 5), (4, 64, 7)])
def test_the_integer_path_equals_the_float_path_on_the_same_integers_bit_for_bit(bits, group_size, time_steps):
    _, threshold, weight, levels = site(96, 1024, 384, time_steps)
    integer = quantize_spiking_linear(weight, threshold, time_steps, bits, group_size)
    assert integer.q.dtype == torch.int8 and int(integer.q.abs().max()) == 2 ** (bits - 1) - 1
    bias = torch.randn(384)
    exact = integer_linear(levels, integer, bias)
    assert exact.dtype == torch.float32 and exact.shape == (96, 384)
    assert torch.equal(exact, float_reference(levels, integer, bias))
    # the integer sums themselves: int32 through _int_mm against a hand loop in Python integers on a few entries
    rows = levels_as_int8(levels)
    for token, out in ((0, 0), (17, 200), (95, 383)):
        total = 0.0
        for g in range(integer.groups):
            part = sum(int(rows[token, c]) * int(integer.q[out, c])
                       for c in range(g * integer.group_size, (g + 1) * integer.group_size))
            total = total + float(torch.tensor(float(part), dtype=torch.float32) * integer.scale[out, g])
        assert float(exact[token, out] - bias[out]) == pytest.approx(total, rel=1e-6, abs=1e-6)


# The folded columns carry the thresholds' spread (20x across channels here), so a row's scale is set by its
# heavy columns and the light ones get a coarse step: the error is the weights' rounding, but at that spread
@pytest.mark.parametrize("bits,group_size,bound", [(8, None, 0.02), (4, 64, 0.2)])
def test_folding_the_thresholds_computes_the_consumer_of_the_decoded_levels(bits, group_size, bound):
    _, threshold, weight, levels = site(64, 512, 256, 5, seed=1)
    decoded = levels * threshold / (2 ** 5 - 1)  # what the float hybrid's consumer multiplies
    reference = F.linear(decoded, weight)
    integer = quantize_spiking_linear(weight, threshold, 5, bits, group_size)
    got = integer_linear(levels, integer)
    # exactly the levels times the folded weight the integers stand for (float rounding only)
    assert torch.allclose(got, F.linear(levels, integer.dequantized()), rtol=1e-5, atol=1e-4)
    error = float((got - reference).norm() / reference.norm())
    assert error < bound, error
    unfolded = integer_linear(levels, quantize_weight(weight, bits, group_size))  # thresholds forgotten
    assert float((unfolded - reference).norm() / reference.norm()) > 0.5


def test_the_output_is_the_same_at_one_and_two_threads():
    _, threshold, weight, levels = site(128, 2048, 640, 5, seed=2)
    integer = quantize_spiking_linear(weight, threshold, 5, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = integer_linear(levels, integer)
        torch.set_num_threads(2)
        two = integer_linear(levels, integer)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_w8a8_quantises_each_token_and_each_output_channel():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -4.0]])
    weight = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 0.1]])
    integer = quantize_weight(weight, 8)
    # by hand: token scales 1/127 and 4/127; weight scales 1/127 and 2/127
    qx = [[127, -64, 32], [0, 64, -127]]  # round(-63.5) = -64 (half to even), round(31.75) = 32
    qw = [[64, 127, -127], [127, 0, 6]]  # round(63.5) = 64, round(6.35) = 6
    sx, sw = [1 / 127, 4 / 127], [1 / 127, 2 / 127]
    hand = [[sum(qx[t][c] * qw[o][c] for c in range(3)) * sx[t] * sw[o] for o in range(2)] for t in range(2)]
    assert integer.q.tolist() == qw
    assert w8a8_linear(x, integer).flatten().tolist() == pytest.approx([value for line in hand for value in line], rel=1e-6)
    _, _, big_w, _ = site(1, 1024, 256, 5, seed=3)
    big_x = torch.randn(32, 1024)
    reference = F.linear(big_x, big_w)
    error = float((w8a8_linear(big_x, quantize_weight(big_w, 8)) - reference).norm() / reference.norm())
    assert error < 0.02, error


def test_bad_inputs_are_refused_by_name():
    _, threshold, weight, levels = site(4, 64, 8, 5)
    with pytest.raises(ValueError, match="T <= 7"):
        integer_linear(weighted_levels(torch.randn(4, 64), threshold, 8).mul(2), quantize_weight(weight, 8))
    with pytest.raises(ValueError, match="whole numbers"):
        integer_linear(levels + 0.5, quantize_weight(weight, 8))
    with pytest.raises(ValueError, match="must be 4 or 8"):
        quantize_weight(weight, 3)
    with pytest.raises(ValueError, match="group_size 48 must divide the 64"):
        quantize_weight(weight, 4, 48)
    with pytest.raises(ValueError, match="threshold has 3 channels"):
        fold_thresholds(weight, torch.ones(3), 5)
    with pytest.raises(ValueError, match="one weight scale per output channel"):
        w8a8_linear(torch.randn(2, 64), quantize_weight(weight, 4, 32))
    zero = quantize_weight(torch.zeros(2, 8), 8)
    assert torch.equal(zero.q, torch.zeros(2, 8, dtype=torch.int8)) and torch.equal(zero.scale, torch.ones(2, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("time_steps", [1, 5, 7])
def test_encode_int8_gives_the_weighted_codes_levels(time_steps, dtype):
    x, threshold, _, _ = site(64, 256, 8, time_steps, seed=4)
    x, threshold = x.to(dtype), threshold.to(dtype)
    # zero, both signs, clamped at L, and (T = 7, float64) a charge a hair below a rounding edge that float32
    # would cross
    x[0, :5] = torch.tensor([0.0, -0.0, 1e9, -1e9, (9.5 - 1e-9) / 127], dtype=torch.float64).to(dtype)
    threshold[4] = 1.0
    expected = weighted_levels(x, threshold, time_steps)
    got = encode_int8(x, threshold, time_steps)
    assert got.dtype == torch.int8 and torch.equal(got.to(torch.float64), expected.to(torch.float64))
    assert int(got.abs().max()) == 2 ** time_steps - 1
    with pytest.raises(ValueError, match="T <= 7"):
        encode_int8(x, threshold, 8)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        encode_int8(x, threshold, time_steps)


def test_levels_and_weights_out_of_range_are_refused():
    weight = quantize_weight(torch.randn(4, 8), 8)
    with pytest.raises(ValueError, match="-128 does not fit"):
        integer_linear(torch.full((2, 8), -128, dtype=torch.int8), weight)
    with pytest.raises(ValueError, match="must be finite"):
        integer_linear(torch.tensor([[float("inf")] + [0.0] * 7]), weight)
    with pytest.raises(ValueError, match="beyond \\+-7"):
        IntegerWeight(q=torch.full((4, 8), 8, dtype=torch.int8), scale=torch.ones(4, 1), bits=4, group_size=8)
    with pytest.raises(ValueError, match="need \\(4, 2\\)"):
        IntegerWeight(q=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4, 1), bits=4, group_size=4)

"""The weighted code with signed digits: the same levels as the binary code, spelled with fewer spikes."""

from __future__ import annotations

import pytest
import torch
from test_converter import converted

from snn_research.config import ConversionParams
from snn_research.conversion.ann_to_snn_converter import load_hybrid, save_hybrid
from snn_research.evaluation.energy import measure_energy
from snn_research.hybrid.adapter import (
    AnalogToSpikes,
    naf_bound,
    popcount,
    signed_digit_count,
    signed_digit_spike_train,
    step_weights,
    weighted_levels,
)
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps


def naf(value: int) -> list[int]:
    """The non-adjacent form, least significant digit first, by the textbook rule (written apart from the code):
    an odd value takes the digit 2 - (value mod 4), which leaves a multiple of 4."""
    digits = []
    while value:
        digit = 2 - (value % 4) if value % 2 else 0
        digits.append(digit)
        value = (value - digit) // 2
    return digits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("time_steps", [1, 2, 3, 5, 8, 12, 16])
def test_the_signed_digit_train_spells_the_binary_codes_level(time_steps, dtype):
    torch.manual_seed(0)
    x = torch.randn(5000, 7, dtype=dtype) * 1.3  # a third of the values beyond the thresholds: clipped
    threshold = torch.rand(7, dtype=dtype) + 0.2
    train = signed_digit_spike_train(x, threshold, time_steps)
    assert set(train.unique().tolist()) <= {-1.0, 0.0, 1.0}
    level = torch.tensordot(step_weights("weighted", time_steps).to(dtype), train, dims=1)
    expected = weighted_levels(x, threshold, time_steps)
    assert torch.equal(level, expected)
    assert torch.equal(train.abs().sum(0), signed_digit_count(expected, time_steps))


@pytest.mark.parametrize("time_steps", [1, 2, 3, 4, 5, 8, 10])
def test_signed_digits_are_the_non_adjacent_form_wherever_it_fits_in_t_steps(time_steps):
    counts = signed_digit_count(torch.arange(2**time_steps).float(), time_steps)
    bits = popcount(torch.arange(2**time_steps).float(), time_steps)
    levels = 2**time_steps - 1
    values = torch.arange(-levels, levels + 1, dtype=torch.float64)
    trains = signed_digit_spike_train(values / levels, torch.ones((), dtype=torch.float64), time_steps)
    for value, digits in zip(values.long().tolist(), trains.t().long().tolist()):  # most significant step first
        assert sum(d * 2 ** (time_steps - 1 - i) for i, d in enumerate(digits)) == value
        assert counts[abs(value)] == sum(map(abs, digits)) <= bits[abs(value)]
        reference = naf(value)
        if len(reference) <= time_steps:  # |value| <= M_T: exactly the NAF, which is never adjacent
            assert abs(value) <= naf_bound(time_steps)
            assert digits[::-1] == reference + [0] * (time_steps - len(reference))
            assert not any(a and b for a, b in zip(digits, digits[1:]))
        else:  # the NAF needs T + 1 digits; T steps reach these levels only with adjacent top digits
            assert abs(value) > naf_bound(time_steps)
    if time_steps >= 4:
        assert counts.mean() < bits.mean()


def test_the_encoder_with_signed_digits_gives_the_same_levels_and_gradient_and_fewer_spikes():
    torch.manual_seed(1)
    x = torch.randn(4000, 6) * 0.5
    binary = AnalogToSpikes(6, 5, kind="weighted", threshold=torch.ones(6), learnable_threshold=True)
    signed = AnalogToSpikes(6, 5, kind="weighted", threshold=torch.ones(6), learnable_threshold=True,
                            digits="signed")
    grads = []
    for encoder in (binary, signed):
        xs = x.clone().requires_grad_(True)
        (encoder(xs) * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append((xs.grad, encoder.log_threshold.grad))
    assert torch.equal(binary(x), signed(x))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    counts = signed.spike_count(signed(x)).abs()
    assert torch.equal(counts, signed.spike_train(x).abs().sum(0))
    assert bool((counts <= binary.spike_count(binary(x)).abs()).all())
    assert counts.sum() < binary.spike_count(binary(x)).abs().sum()


def test_signed_digits_are_refused_where_they_do_nothing():
    with pytest.raises(ValueError, match="'weighted' encoder only"):
        AnalogToSpikes(4, 5, kind="if", digits="signed")
    with pytest.raises(ValueError, match="digits"):
        HybridPlan(encoder="if", digits="signed")
    with pytest.raises(ValueError, match="digits"):
        ConversionParams(encoder="rate", time_steps=8, digits="signed")
    with pytest.raises(ValueError, match="digits must be one of"):
        AnalogToSpikes(4, 5, kind="weighted", digits="ternary")


def test_a_signed_digit_hybrid_equals_the_binary_one_reloads_as_signed_and_counts_fewer_spikes(tmp_path, input_ids):
    _, binary, _, _ = converted("llama", HybridPlan(time_steps=5, encoder="weighted"))
    _, signed, metadata, _ = converted("llama", HybridPlan(time_steps=5, encoder="weighted", digits="signed"))
    assert metadata.plan.digits == "signed"
    assert {site.parameters["digits"] for site in metadata.sites} == {"signed"}
    save_hybrid(signed, None, metadata, tmp_path / "signed")
    loaded = load_hybrid(tmp_path / "signed")
    assert {block.product_encoder.digits for block in spiking_mlps(loaded)} == {"signed"}
    with torch.no_grad():
        logits = binary(input_ids).logits
        assert torch.equal(signed(input_ids).logits, logits)
        assert torch.equal(loaded(input_ids).logits, logits)
        # the step-by-step reference decodes the signed trains to the same output
        block = next(spiking_mlps(loaded))
        x = torch.randn(2, 3, block.input_encoder.channels)
        torch.testing.assert_close(block.forward_per_step(x), block(x), rtol=1e-5, atol=1e-6)
    fewer, more = measure_energy(loaded, input_ids), measure_energy(binary, input_ids)
    assert fewer.summary()["spike_rate"] < more.summary()["spike_rate"]
    assert fewer.summary()["ffn_energy_ratio"] < more.summary()["ffn_energy_ratio"]

"""The binary-weighted and LIF encoders: closed form against simulation, decoding, gradients, spike counts."""

import pytest
import torch

from snn_research.hybrid.adapter import (
    AnalogToSpikes,
    SpikesToAnalog,
    popcount,
    step_weights,
    weighted_levels,
    weighted_spike_train,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("time_steps", [1, 3, 5, 8, 12, 16])
def test_weighted_closed_form_equals_the_simulation(time_steps, dtype):
    torch.manual_seed(0)
    x = torch.randn(5000, 7, dtype=dtype) * 1.3
    threshold = torch.rand(7, dtype=dtype) + 0.2
    train = weighted_spike_train(x, threshold, time_steps)
    assert set(train.unique().tolist()) <= {-1.0, 0.0, 1.0}
    level_from_train = torch.tensordot(step_weights("weighted", time_steps).to(dtype), train, dims=1)
    torch.testing.assert_close(level_from_train, weighted_levels(x, threshold, time_steps), rtol=0, atol=0)
    # every spike of a neuron has the sign of its input
    assert bool(((train * torch.sign(x)) >= 0).all())


def test_weighted_code_rounds_to_two_to_the_t_levels():
    threshold = torch.tensor([1.0])
    time_steps = 4  # L = 15: grid 1/15
    x = torch.tensor([[0.0], [1 / 15 * 0.49], [1 / 15 * 0.51], [-7.4 / 15], [7.6 / 15], [0.999], [-3.0]])
    decoded = SpikesToAnalog()(weighted_levels(x, threshold, time_steps), threshold, 15)
    expected = torch.tensor([[0.0], [0.0], [1 / 15], [-7 / 15], [8 / 15], [1.0], [-1.0]])
    torch.testing.assert_close(decoded, expected)
    # the error of the weighted code at T steps is that of a 2^T-level grid: far below the IF code's
    torch.manual_seed(1)
    values = torch.rand(20000, 1) * 2 - 1
    weighted = AnalogToSpikes(1, 6, kind="weighted", threshold=threshold)
    integrate = AnalogToSpikes(1, 6, kind="if", threshold=threshold)
    err_w = (SpikesToAnalog()(weighted(values), threshold, weighted.levels) - values).abs().max()
    err_if = (SpikesToAnalog()(integrate(values), threshold, integrate.levels) - values).abs().max()
    assert err_w <= 0.5 / 63 + 1e-6 and err_if > 0.5 / 7 - 1e-6


def test_weighted_spike_count_is_the_number_of_set_bits():
    encoder = AnalogToSpikes(1, 4, kind="weighted", threshold=torch.ones(1))
    x = torch.tensor([[0.0], [1 / 15], [3 / 15], [-7 / 15], [8 / 15], [1.0]])
    levels = encoder(x)
    torch.testing.assert_close(levels.flatten(), torch.tensor([0.0, 1.0, 3.0, -7.0, 8.0, 15.0]))
    counts = encoder.spike_count(levels)
    torch.testing.assert_close(counts.flatten(), torch.tensor([0.0, 1.0, 2.0, -3.0, 1.0, 4.0]))
    torch.testing.assert_close(counts.abs(), encoder.spike_train(x).abs().sum(0))
    assert popcount(torch.tensor([255.0]), 8).item() == 8


def test_popcount_counts_the_set_bits_of_every_level():
    """The table lookup against a count written independently: the binary digits of each integer."""
    for time_steps in (1, 5, 12):
        values = torch.arange(-(2**time_steps) + 1, 2**time_steps)
        expected = torch.tensor([bin(abs(int(v))).count("1") for v in values], dtype=torch.float32)
        torch.testing.assert_close(popcount(values.float(), time_steps), expected, rtol=0, atol=0)


def test_weighted_gradient_is_the_straight_through_slope():
    x = torch.tensor([[0.3, -0.2, 2.0, -3.0]], requires_grad=True)
    encoder = AnalogToSpikes(4, 5, kind="weighted", threshold=torch.ones(4), learnable_threshold=True)
    decoded = SpikesToAnalog()(encoder(x), encoder.threshold, encoder.levels)
    decoded.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    levels = weighted_levels(x.detach(), torch.ones(4), 5)[0]
    inside = x.detach()[0].abs() <= 1
    expected = torch.where(inside, levels / 31 - x.detach()[0], torch.sign(x.detach()[0]))
    torch.testing.assert_close(encoder.log_threshold.grad, expected)
    # the train's per-step gradient adds up to the same slope
    x2 = x.detach().clone().requires_grad_(True)
    train = encoder.spike_train(x2)
    SpikesToAnalog().from_train(train, encoder.threshold.detach(), encoder.step_weights()).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)


def test_weighted_encoder_refuses_more_steps_than_it_can_represent():
    with pytest.raises(ValueError, match="time_steps <= 16"):
        AnalogToSpikes(4, 17, kind="weighted")
    encoder = AnalogToSpikes(4, 8, kind="weighted")
    with pytest.raises(ValueError, match="time_steps <= 16"):
        encoder.set_time_steps(20)


def test_lif_encoder_is_simulated_and_leaks():
    torch.manual_seed(2)
    x = torch.rand(200, 3) * 1.8 - 0.9
    integrate = AnalogToSpikes(3, 8, kind="lif", threshold=torch.ones(3), neuron_options={"beta": 1.0})
    leaky = AnalogToSpikes(3, 8, kind="lif", threshold=torch.ones(3), neuron_options={"beta": 0.8})
    # with beta = 1 it is the IF encoder started at zero (floor); a leak loses charge, so never more spikes
    zero_start = AnalogToSpikes(3, 8, kind="if", threshold=torch.ones(3), membrane_init="zero")
    torch.testing.assert_close(integrate(x), zero_start(x), rtol=0, atol=0)
    assert bool((leaky(x).abs() <= integrate(x).abs()).all()) and not torch.equal(leaky(x), integrate(x))
    torch.testing.assert_close(leaky.spike_train(x).sum(0), leaky(x))


def test_lif_encoder_trains_threshold_and_leak_by_surrogate_gradient():
    torch.manual_seed(3)
    x = (torch.rand(64, 3) * 1.8 - 0.9).requires_grad_(True)
    encoder = AnalogToSpikes(3, 8, kind="lif", threshold=torch.ones(3), learnable_threshold=True,
                             neuron_options={"beta": 0.9, "learnable_leak": True})
    SpikesToAnalog()(encoder(x), encoder.threshold, encoder.levels).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert encoder.neurons.log_threshold.grad.abs().sum() > 0 and encoder.neurons.beta.grad.abs().sum() > 0


def test_neuron_options_are_refused_for_closed_form_encoders():
    with pytest.raises(ValueError, match="'lif' encoder only"):
        AnalogToSpikes(4, 8, kind="if", neuron_options={"beta": 0.9})


def test_rate_encoder_is_unbiased_on_an_asymmetric_input():
    """E[count] = T x / theta per value: a bias that is symmetric in sign would pass a symmetric input."""
    values = torch.tensor([-0.7, -0.2, 0.05, 0.3, 0.55, 0.95])
    x = values.repeat(40000, 1)
    encoder = AnalogToSpikes(6, 8, kind="rate", threshold=torch.ones(6), seed=11)
    counts = encoder(x)
    mean = counts.mean(0)
    expected = values * 8
    # binomial standard error of the mean count: sqrt(T p (1 - p) / n); allow 5 of them
    p = values.abs()
    tolerance = 5 * torch.sqrt(8 * p * (1 - p) / x.shape[0]) + 1e-6
    assert bool(((mean - expected).abs() <= tolerance).all()), (mean, expected, tolerance)

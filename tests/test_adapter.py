import pytest
import torch

from snn_research.hybrid.adapter import AnalogToSpikes, SpikesToAnalog, if_spike_counts, if_spike_train


@pytest.mark.parametrize("membrane_init", ["zero", "half", "symmetric"])
@pytest.mark.parametrize("time_steps", [1, 4, 8, 33])
def test_if_closed_form_counts_equal_the_simulation(membrane_init, time_steps):
    torch.manual_seed(0)
    x = torch.randn(4000, 7, dtype=torch.float64) * 1.3
    threshold = torch.rand(7, dtype=torch.float64) + 0.2
    simulated = if_spike_train(x, threshold, time_steps, membrane_init)
    assert set(simulated.unique().tolist()) <= {-1.0, 0.0, 1.0}
    counts = if_spike_counts(x, threshold, time_steps, membrane_init)
    torch.testing.assert_close(simulated.sum(0), counts, rtol=0, atol=0)


def test_symmetric_start_rounds_and_zero_start_floors():
    threshold = torch.tensor([1.0])
    x = torch.tensor([[0.30], [-0.30], [0.99], [-2.0]])
    decoder = SpikesToAnalog()
    rounded = decoder(if_spike_counts(x, threshold, 4, "symmetric"), threshold, 4)
    floored = decoder(if_spike_counts(x, threshold, 4, "zero"), threshold, 4)
    torch.testing.assert_close(rounded, torch.tensor([[0.25], [-0.25], [1.0], [-1.0]]))
    torch.testing.assert_close(floored, torch.tensor([[0.25], [-0.25], [0.75], [-1.0]]))
    # the literal theta/2 start is asymmetric: -0.3 needs 1.5 theta of charge for its first spike
    half = decoder(if_spike_counts(x, threshold, 4, "half"), threshold, 4)
    torch.testing.assert_close(half, torch.tensor([[0.25], [0.0], [1.0], [-1.0]]))


def test_decoded_if_rate_error_shrinks_as_one_over_t():
    torch.manual_seed(1)
    x = torch.rand(10000, 3) * 2 - 1
    threshold = torch.ones(3)
    for time_steps in (4, 16, 64):
        encoder = AnalogToSpikes(3, time_steps, threshold=threshold)
        decoded = SpikesToAnalog()(encoder(x), encoder.threshold, time_steps)
        assert (decoded - x).abs().max() <= 0.5 / time_steps + 1e-6


def test_rate_encoder_is_seeded_and_unbiased():
    torch.manual_seed(2)
    x = torch.rand(20000, 4) * 1.6 - 0.8
    encoder = AnalogToSpikes(4, 8, kind="rate", threshold=torch.ones(4), seed=7)
    first = encoder(x)
    assert not torch.equal(encoder(x), first)  # every call is a new draw
    encoder.reset_noise()  # the draws restart: the seed fixes the sequence
    torch.testing.assert_close(encoder(x), first, rtol=0, atol=0)
    encoder.noise_step = 1
    assert not torch.equal(encoder(x), first)
    other_seed = AnalogToSpikes(4, 8, kind="rate", threshold=torch.ones(4), seed=8)
    assert not torch.equal(other_seed(x), first)
    mean_rate = (first / 8).mean(0)
    torch.testing.assert_close(mean_rate, x.mean(0), atol=0.01, rtol=0)


def test_train_and_counts_agree_for_both_encoders():
    torch.manual_seed(3)
    x = torch.randn(50, 6)
    for kind in ("if", "rate"):
        encoder = AnalogToSpikes(6, 8, kind=kind, threshold=torch.full((6,), 0.9), seed=3)
        train = encoder.spike_train(x)
        encoder.reset_noise()  # the rate encoder's next call would draw anew
        torch.testing.assert_close(train.sum(0), encoder(x), rtol=0, atol=0)


def test_straight_through_gradient_of_the_decoded_rate():
    x = torch.tensor([[0.3, -0.2, 2.0, -3.0]], requires_grad=True)
    encoder = AnalogToSpikes(4, 8, threshold=torch.ones(4), learnable_threshold=True)
    decoded = SpikesToAnalog()(encoder(x), encoder.threshold, 8)
    decoded.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    # learned step size: n/T - x/theta inside the clip range, sign(x) outside; times theta for log(theta)
    counts = torch.tensor([2.0, -2.0, 8.0, -8.0])
    expected = torch.where(x.detach().abs()[0] <= 1, counts / 8 - x.detach()[0], torch.sign(x.detach()[0]))
    torch.testing.assert_close(encoder.log_threshold.grad, expected)


@pytest.mark.parametrize("time_steps", [0, -3, 2.5])
def test_time_steps_below_one_are_refused(time_steps):
    with pytest.raises(ValueError, match="time_steps"):
        AnalogToSpikes(4, time_steps)


def test_bad_encoder_options_are_refused():
    with pytest.raises(ValueError, match="encoder kind"):
        AnalogToSpikes(4, 8, kind="poisson")
    with pytest.raises(ValueError, match="membrane_init"):
        AnalogToSpikes(4, 8, membrane_init="random")
    with pytest.raises(ValueError, match="positive"):
        AnalogToSpikes(4, 8, threshold=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="channels"):
        AnalogToSpikes(4, 8)(torch.zeros(2, 5))

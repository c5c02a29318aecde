"""The in-place encoder and its straight-through backward against the plain formulas they replaced."""

import pytest
import torch

from snn_research.hybrid.adapter import AnalogToSpikes, if_spike_counts


def reference_counts(x, threshold, time_steps, membrane_init):
    charge = x.abs() * (time_steps / threshold)
    if membrane_init == "zero":
        magnitude = torch.floor(charge)
    elif membrane_init == "symmetric":
        magnitude = torch.floor(charge + 0.5)
    else:
        negative = torch.floor(charge - 0.5).clamp_(min=0.0)
        negative = torch.where(x.abs() >= 1.5 * threshold, negative, negative.clamp(max=time_steps - 1.0))
        magnitude = torch.where(x >= 0, torch.floor(charge + 0.5), negative)
    return torch.sign(x) * magnitude.clamp_(max=float(time_steps))


def reference_gradients(x, threshold, counts, grad_counts, slope):
    inside = (x.abs() <= threshold).to(grad_counts.dtype)
    grad_x = grad_counts * inside * (slope / threshold)
    per_element = -grad_counts * inside * x * (slope / threshold.square())
    flat = per_element.reshape(-1, per_element.shape[-1]).sum(0)
    return grad_x, flat if threshold.numel() == flat.numel() else flat.sum().reshape(threshold.shape)


@pytest.mark.parametrize("membrane_init", ["zero", "half", "symmetric"])
def test_in_place_counts_equal_the_plain_formula(membrane_init):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=generator) * 2
    x[0, :3] = torch.tensor([0.0, -0.0, 1e9])
    threshold = torch.rand(33, generator=generator) + 0.3
    torch.testing.assert_close(if_spike_counts(x, threshold, 8, membrane_init),
                               reference_counts(x, threshold, 8, membrane_init), rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("as_train", [False, True])
def test_straight_through_backward_equals_the_plain_formula(per_channel, as_train):
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 7, 33, generator=generator) * 2).requires_grad_()
    threshold = torch.rand(33 if per_channel else 1, generator=generator) + 0.3
    encoder = AnalogToSpikes(33, 8, threshold=threshold, per_channel=per_channel, learnable_threshold=True)
    upstream = torch.randn((8, 5, 7, 33) if as_train else (5, 7, 33), generator=generator)
    out = encoder.spike_train(x) if as_train else encoder(x)
    grad_x, grad_log_threshold = torch.autograd.grad((out * upstream).sum(), [x, encoder.log_threshold])
    grad_counts, slope = (upstream.sum(0), 1.0) if as_train else (upstream, 8.0)
    theta = encoder.threshold.detach()
    expected_x, expected_threshold = reference_gradients(x.detach(), theta, out, grad_counts, slope)
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_log_threshold, expected_threshold * theta)  # d/dlog(theta) = theta d/dtheta

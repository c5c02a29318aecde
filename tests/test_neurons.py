import pytest
import snntorch
import torch

from snn_research.hybrid.neurons import MultiStepNeuron
from snn_research.hybrid.surrogate import SURROGATES


class _SurrogateStep(torch.autograd.Function):
    """Reference spike: exact step forward, surrogate backward, for autograd-built BPTT."""

    @staticmethod
    def forward(ctx, z, name, sharpness):
        ctx.save_for_backward(z)
        ctx.name, ctx.sharpness = name, sharpness
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * SURROGATES[ctx.name](z, ctx.sharpness), None, None


def reference_neuron(x, threshold, beta, signed, reset, leak_reset, surrogate, sharpness):
    """The dynamics of the module docstring written naively with autograd (reset detached)."""
    carry = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        u = carry + x[t]
        s = _SurrogateStep.apply(u / threshold - 1.0, surrogate, sharpness)
        if signed:
            s = s - _SurrogateStep.apply(-u / threshold - 1.0, surrogate, sharpness)
        sd = s.detach()
        if reset == "zero":
            carry = beta * u * (1 - sd.abs())
        elif leak_reset:
            carry = beta * (u - threshold * sd)
        else:
            carry = beta * u - threshold * sd
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("beta", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_spike_trains_match_snntorch_leaky(beta, reset):
    torch.manual_seed(0)
    time_steps, batch, channels = 24, 16, 32
    currents = torch.randn(time_steps, batch, channels) * 0.8
    peer = snntorch.Leaky(beta=beta, threshold=1.0, reset_mechanism=reset)
    membrane = torch.zeros(batch, channels)
    expected = []
    for t in range(time_steps):
        spikes, membrane = peer(currents[t], membrane)
        expected.append(spikes)
    expected = torch.stack(expected)
    ours = MultiStepNeuron(channels, kind="if" if beta == 1.0 else "lif", beta=beta, reset=reset, leak_reset=False)
    assert expected.sum() > 50  # the comparison is not vacuous
    torch.testing.assert_close(ours(currents), expected, rtol=0, atol=0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("reset,leak_reset", [("subtract", True), ("subtract", False), ("zero", True)])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid", "triangle"])
def test_hand_written_bptt_equals_autograd_reference(signed, reset, leak_reset, surrogate):
    torch.manual_seed(1)
    x = (torch.randn(6, 3, 5, dtype=torch.float64) * 1.5).requires_grad_()
    threshold = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    beta = (torch.rand(5, dtype=torch.float64) * 0.4 + 0.5).requires_grad_()
    upstream = torch.randn(6, 3, 5, dtype=torch.float64)

    neuron = MultiStepNeuron(5, kind="lif", signed=signed, reset=reset, leak_reset=leak_reset, surrogate=surrogate,
                             sharpness=3.0, learnable_threshold=True, learnable_leak=True).double()
    with torch.no_grad():
        neuron.log_threshold.copy_(threshold.log())
        neuron.beta.copy_(beta)
    out = neuron(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, neuron.log_threshold, neuron.beta])

    ref = reference_neuron(x, threshold, beta, signed, reset, leak_reset, surrogate, 3.0)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, threshold, beta])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1] * threshold)  # d/dlog(theta) = theta d/dtheta
    torch.testing.assert_close(grads[2], ref_grads[2])
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


def test_signed_neuron_is_ternary_and_symmetric():
    torch.manual_seed(2)
    x = torch.randn(10, 50, 8)
    neuron = MultiStepNeuron(8, kind="if", signed=True)
    spikes = neuron(x)
    assert set(spikes.unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(neuron(-x), -spikes)


def test_no_state_survives_between_calls():
    torch.manual_seed(3)
    x = torch.randn(8, 4, 16)
    neuron = MultiStepNeuron(16, kind="lif", beta=0.8)
    first = neuron(x)
    neuron(torch.randn(8, 4, 16) * 5)
    torch.testing.assert_close(neuron(x), first, rtol=0, atol=0)


def test_per_layer_threshold_gradient_is_a_scalar():
    neuron = MultiStepNeuron(16, kind="if", per_channel=False, threshold=0.5, learnable_threshold=True)
    x = torch.randn(8, 4, 16, requires_grad=True)
    neuron(x).sum().backward()
    assert neuron.log_threshold.shape == (1,)
    assert torch.isfinite(neuron.log_threshold.grad).all() and neuron.log_threshold.grad.abs().item() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "gif"}, "neuron kind"),
        ({"reset": "hard"}, "reset"),
        ({"kind": "if", "learnable_leak": True}, "no leak"),
        ({"beta": 1.5}, "beta"),
        ({"surrogate": "erf"}, "surrogate"),
        ({"sharpness": 0.0}, "sharpness"),
    ],
)
def test_bad_neuron_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiStepNeuron(4, **kwargs)

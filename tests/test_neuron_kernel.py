"""The compiled neuron kernel against the eager loop it replaces, and its fallback."""

import os

import pytest
import torch

from snn_research.hybrid import neuron_kernel
from snn_research.hybrid.neurons import MultiStepNeuron

needs_compiler = pytest.mark.skipif(
    neuron_kernel._compiler() is None or os.environ.get(neuron_kernel.KERNEL_ENV, "").lower() == "eager",
    reason="no C++ compiler, or the kernel is switched off",
)


@pytest.fixture
def fresh_kernel():
    """Forget the loaded library before and after, so a test's monkeypatching cannot leak."""
    neuron_kernel.reset()
    yield
    neuron_kernel.reset()


def _run(neuron, currents, upstream, use_kernel):
    neuron.use_kernel = use_kernel
    x = currents.clone().requires_grad_()
    spikes = neuron(x)
    if use_kernel:  # or the comparisons below would compare the eager loop with itself
        assert neuron_kernel.load() is not None, "the kernel did not build or load (see the warning)"
        assert spikes.grad_fn is not None and len(spikes.grad_fn.saved_tensors) == 3
    params = [p for p in (neuron.log_threshold, neuron.beta) if p.requires_grad]
    grads = torch.autograd.grad((spikes * upstream).sum(), [x, *params])
    return spikes, grads


def _neuron(channels, dtype, **options):
    torch.manual_seed(7)
    neuron = MultiStepNeuron(channels, kind="lif", sharpness=3.0, **options).to(dtype)
    with torch.no_grad():
        neuron.log_threshold.copy_((torch.rand(neuron.log_threshold.shape, dtype=dtype) + 0.5).log())
        neuron.beta.copy_(torch.rand(neuron.beta.shape, dtype=dtype) * 0.4 + 0.5)
    return neuron


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("reset,leak_reset", [("subtract", True), ("subtract", False), ("zero", True)])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid", "triangle"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_kernel_equals_the_eager_loop(dtype, signed, reset, leak_reset, surrogate, per_channel):
    # 300 channels: one full tile of 256 and a ragged one; 2 x 9 rows: enough elements to run threaded
    generator = torch.Generator().manual_seed(0)
    currents = torch.randn(7, 2, 9, 300, generator=generator, dtype=dtype) * 1.5
    upstream = torch.randn(7, 2, 9, 300, generator=generator, dtype=dtype)
    neuron = _neuron(300, dtype, signed=signed, reset=reset, leak_reset=leak_reset, surrogate=surrogate,
                     per_channel=per_channel, learnable_threshold=True, learnable_leak=True)
    fast_spikes, fast_grads = _run(neuron, currents, upstream, use_kernel=True)
    eager_spikes, eager_grads = _run(neuron, currents, upstream, use_kernel=False)
    assert fast_spikes.abs().sum() > 100
    torch.testing.assert_close(fast_spikes, eager_spikes, rtol=0, atol=0)
    for fast, eager in zip(fast_grads, eager_grads):
        torch.testing.assert_close(fast, eager)


@needs_compiler
def test_kernel_is_used_for_float_cpu_tensors_and_keeps_one_tensor(fresh_kernel):
    neuron = MultiStepNeuron(16, kind="lif", learnable_threshold=True)
    x = torch.randn(8, 4, 16, requires_grad=True)
    spikes = neuron(x)
    assert neuron_kernel.load() is not None
    saved = spikes.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(8, 4, 16), (16,), (16,)]  # currents, threshold, leak
    assert torch.equal(saved[0], x.detach())


@needs_compiler
def test_kernel_reads_non_contiguous_currents():
    base = torch.randn(4, 8, 6, 32)
    currents = base.transpose(0, 2)  # (6, 8, 4, 32): time axis strided
    neuron = _neuron(32, torch.float32, learnable_threshold=True)
    upstream = torch.randn(6, 8, 4, 32)
    fast_spikes, fast_grads = _run(neuron, currents, upstream, use_kernel=True)
    eager_spikes, eager_grads = _run(neuron, currents, upstream, use_kernel=False)
    torch.testing.assert_close(fast_spikes, eager_spikes, rtol=0, atol=0)
    for fast, eager in zip(fast_grads, eager_grads):
        torch.testing.assert_close(fast, eager)


def test_failed_build_falls_back_to_the_eager_loop(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv(neuron_kernel.CACHE_ENV, str(tmp_path))  # nothing cached there
    monkeypatch.setattr(neuron_kernel, "_compiler", lambda: "false")  # a 'compiler' that always fails
    currents = torch.randn(8, 4, 16)
    neuron = MultiStepNeuron(16, kind="lif", beta=0.8)
    with pytest.warns(RuntimeWarning, match="eager loop"):
        spikes = neuron(currents)
    assert neuron_kernel.load() is None
    neuron.use_kernel = False
    torch.testing.assert_close(spikes, neuron(currents), rtol=0, atol=0)


def test_environment_switch_turns_the_kernel_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv(neuron_kernel.KERNEL_ENV, "eager")
    assert neuron_kernel.load() is None
    x = torch.randn(8, 4, 16, requires_grad=True)
    spikes = MultiStepNeuron(16, kind="if")(x)
    assert not torch.equal(spikes.grad_fn.saved_tensors[0], x.detach())  # the eager loop keeps membranes


def test_bfloat16_and_empty_inputs_take_the_eager_path():
    assert not neuron_kernel.supports(torch.zeros(8, 4, 16, dtype=torch.bfloat16))
    assert not neuron_kernel.supports(torch.zeros(8, 0, 16))
    neuron = MultiStepNeuron(16, kind="lif", signed=True)
    spikes = neuron(torch.randn(8, 4, 16, dtype=torch.bfloat16) * 2)
    assert spikes.dtype == torch.bfloat16 and set(spikes.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert neuron(torch.zeros(8, 0, 16)).shape == (8, 0, 16)


@needs_compiler
def test_backward_with_create_graph_takes_the_eager_ops():
    neuron = MultiStepNeuron(8, kind="lif", learnable_threshold=True).double()
    x = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(neuron(x).sum(), x, create_graph=True)
    neuron.use_kernel = False
    (eager_grad,) = torch.autograd.grad(neuron(x).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, eager_grad)

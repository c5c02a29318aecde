"""The binding benchmark compares like with like: same kernel entry point, same numerics flags, and routes whose
spikes are the kernel's and the eager neuron's.

Building a route as the benchmark does (``kernel_binding.load_extension``) compiles the kernel's source again
inside each extension: on the 2-core CI machine about 20 s for the op route and 36 s for the pybind one, on top
of the kernel itself. So the op route is built here from the benchmark's own wrapper text and flags, linked
against the kernel library the ctypes route loads (the same source and flags, which the test on the flags
pins): its marshalling of tensors into ``snn_neuron_forward`` is then what is compared, in about 5 s. The
pybind route is not built (its ``torch/extension.h`` alone takes about 20 s); its wrapper is held to be the op
route's very ``lif_forward`` code, with only the registration differing.
"""

import os
import re

import pytest
import torch

from benchmarks import kernel_binding
from snn_research.hybrid import neuron_kernel
from snn_research.hybrid.neurons import MultiStepNeuron

needs_kernel = pytest.mark.skipif(
    neuron_kernel._compiler() is None or os.environ.get(neuron_kernel.KERNEL_ENV, "").lower() == "eager",
    reason="no C++ compiler, or the kernel is switched off",
)


def _declaration(text: str) -> str:
    match = re.search(r'extern "C" int snn_neuron_forward\((.*?)\)', text, re.S)
    assert match, "no extern \"C\" snn_neuron_forward"
    return " ".join(match.group(1).split())


def test_wrappers_declare_the_kernels_forward():
    defined = _declaration(neuron_kernel.SOURCE_FILE.read_text())
    for route, wrapper in kernel_binding.WRAPPERS.items():
        assert _declaration(wrapper) == defined, route


def test_extension_flags_keep_the_kernels_numerics():
    flags = kernel_binding.EXTENSION_CFLAGS
    for flag in ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", *neuron_kernel.NATIVE_FLAGS):
        assert flag in flags
    assert not {"-shared", "-fPIC"} & set(flags)
    assert not any(flag.startswith("-std=") for flag in flags)  # cpp_extension sets its own standard
    assert kernel_binding.EXTENSION_LDFLAGS == ["-fopenmp"]


def _lif_forward(wrapper: str) -> str:
    """The wrapper's ``lif_forward`` definition, whitespace collapsed."""
    match = re.search(r"at::Tensor lif_forward\(.*?\n}\n", wrapper, re.S)
    assert match, "no lif_forward definition"
    return " ".join(match.group(0).split())


def test_both_extension_routes_run_the_same_forward_code():
    op, pybind = kernel_binding.WRAPPERS["op"], kernel_binding.WRAPPERS["pybind"]
    assert _lif_forward(op) == _lif_forward(pybind)
    assert 'm.impl("lif_forward", &lif_forward)' in op and 'm.def("lif_forward", &lif_forward)' in pybind


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """The benchmark's ctypes route (as ``build_ctypes`` loads it, from the usual kernel cache) and, where ninja
    is found, its op route (the benchmark's wrapper, linked against that same library)."""
    from torch.utils import cpp_extension

    library = kernel_binding.build_ctypes(neuron_kernel._cache_dir())
    assert library is not None, "the kernel did not build or load (see the warning)"
    found = {"ctypes": lambda x, th, be, signed, reset: neuron_kernel.forward(library, x, th, be, signed, reset)}
    if kernel_binding.ninja_available():
        folder = tmp_path_factory.mktemp("binding")
        wrapper = folder / "op_binding.cpp"
        wrapper.write_text(kernel_binding.WRAPPERS["op"])
        cpp_extension.load(name="snn_kernel_op_test", sources=[str(wrapper)],
                           extra_cflags=kernel_binding.EXTENSION_CFLAGS,
                           extra_ldflags=[*kernel_binding.EXTENSION_LDFLAGS, library._name],
                           build_directory=str(folder), is_python_module=False, verbose=False)
        op = getattr(torch.ops, kernel_binding.OP_NAMESPACE).lif_forward
        found["op"] = lambda x, th, be, signed, reset: op(x, th, be, int(signed), reset)
    return found


def route_of(routes, name: str):
    if name not in routes:
        pytest.skip("ninja not found (pip install ninja): torch extensions cannot build")
    return routes[name]


@needs_kernel
@pytest.mark.parametrize("route", ["ctypes", "op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_route_computes_the_eager_neurons_spikes(routes, route, dtype):
    forward = route_of(routes, route)
    generator = torch.Generator().manual_seed(3)
    currents = torch.randn(5, 3, 7, 300, generator=generator, dtype=dtype) * 1.5  # a full tile and a ragged one
    for signed in (False, True):
        for reset, leak_reset in (("subtract", True), ("subtract", False), ("zero", True)):
            neuron = MultiStepNeuron(300, kind="lif", signed=signed, reset=reset, leak_reset=leak_reset).to(dtype)
            neuron.use_kernel = False
            with torch.no_grad():  # per-channel thresholds and leaks: a route that swaps them gets other spikes
                neuron.log_threshold.copy_((torch.rand(300, generator=generator, dtype=dtype) + 0.5).log())
                neuron.beta.copy_(torch.rand(300, generator=generator, dtype=dtype) * 0.4 + 0.5)
                expected = neuron(currents)
                threshold, beta = neuron.threshold.contiguous(), neuron.beta.detach().contiguous()
            assert 0.05 < float(expected.abs().mean()) < 0.95  # neither silent nor saturated
            spikes = forward(currents, threshold, beta, signed, neuron_kernel.reset_kind(reset == "zero", leak_reset))
            assert spikes.dtype == dtype
            assert torch.equal(spikes, expected), (signed, reset, leak_reset)


@needs_kernel
@pytest.mark.parametrize("route", ["ctypes", "op"])
def test_the_benchmarks_input_gives_the_default_lif_neurons_spikes(routes, route):
    forward = route_of(routes, route)
    x, threshold, beta = kernel_binding._inputs(kernel_binding.SMALL, seed=1)
    neuron = MultiStepNeuron(x.shape[-1], kind="lif", beta=kernel_binding.BETA, threshold=kernel_binding.THRESHOLD)
    neuron.use_kernel = False
    with torch.no_grad():
        expected = neuron(x)
    reset = neuron_kernel.reset_kind(False, True)  # the benchmark's: subtract the threshold, then leak
    assert torch.equal(forward(x, threshold, beta, False, reset), expected)

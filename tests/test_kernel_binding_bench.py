"""The binding benchmark compares like with like: same kernel entry point, same numerics flags, and routes whose
spikes are the kernel's and the eager neuron's.

Building a route as the benchmark does (``kernel_binding.load_extension``) compiles the kernel's source again
inside each extension: on the 2-core CI machine about 20 s for the op route and 36 s for the pybind one, on top
of the kernel itself. So the op route is built here from the benchmark's own wrapper text and flags, linked
against the kernel library the ctypes route loads: its marshalling of tensors into ``snn_neuron_forward`` is
then what is compared, in about 5 s. The kernel's source compiled with the extension's flags is tested on its
own, once per machine (about 20 s, then cached like the kernel): it must fire exactly where the eager neuron
does on inputs where a fused multiply-add would not. The pybind route is not built (its ``torch/extension.h``
alone takes about 20 s); its wrapper is held to be the op route's very ``lif_forward`` code, with only the
registration differing.
"""

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
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
    match = re.search(r'extern "C" int snn_neuron_forward\((.*?)\)', text, re.DOTALL)
    assert match, "no extern \"C\" snn_neuron_forward"
    return " ".join(match.group(1).split())


def test_wrappers_declare_the_kernels_forward():
    defined = _declaration(neuron_kernel.SOURCE_FILE.read_text())
    for route, wrapper in kernel_binding.WRAPPERS.items():
        assert _declaration(wrapper) == defined, route


def _kernel_with_extension_flags():
    """The kernel's source compiled with the benchmark's ``EXTENSION_CFLAGS`` and the flags cpp_extension adds to
    make a shared library (``-shared -fPIC``; the language standard here is the kernel's own, ``-std=c++17``),
    loaded with ctypes. Cached beside the kernel, keyed by source, compiler, flags and CPU."""
    compiler = neuron_kernel._compiler()
    flags = [*kernel_binding.EXTENSION_CFLAGS, "-shared", "-fPIC", "-std=c++17"]
    source = neuron_kernel.SOURCE_FILE.read_text()
    key = hashlib.sha256("\0".join([source, compiler, *flags, neuron_kernel._cpu_fingerprint()]).encode())
    target = neuron_kernel._cache_dir() / f"binding-flags-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            copy = Path(tmp) / neuron_kernel.SOURCE_FILE.name
            copy.write_text(source)
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(copy), "-o", str(built)], capture_output=True, text=True,
                                    timeout=600, check=False)
            assert result.returncode == 0, result.stderr[-2000:]
            os.replace(built, target)
    return neuron_kernel._open(target)


def _threshold_edge_inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps of currents (2, 1, C) and leaks (C,) for a threshold-1 neuron reset by subtraction after the leak
    (carry = u beta - s): the first step (u in [1, 2)) fires; the second brings the membrane to exactly 1 when
    u beta is rounded before the subtraction, as the eager loop does, and to below 1 when one fused multiply-add
    rounds ``u beta - 1`` once."""
    rng = np.random.default_rng(0)
    one = np.float32(1.0)
    first, betas, second = [], [], []
    while len(first) < channels:
        u, beta = np.float32(rng.uniform(1.0, 2.0)), np.float32(rng.uniform(0.6, 0.99))
        carry = np.float32(u * beta) - one  # float32 products and differences: two roundings
        fused = np.float32(np.float64(u) * np.float64(beta) - 1.0)  # exact in float64, then one rounding
        current = one - carry
        if carry + current == one and fused + current < one:
            first.append(u)
            betas.append(beta)
            second.append(current)
    return torch.tensor(np.array([first, second]))[:, None, :], torch.tensor(np.array(betas))


@needs_kernel
def test_extension_flags_keep_the_kernels_numerics():
    currents, beta = _threshold_edge_inputs(64)
    neuron = MultiStepNeuron(64, kind="lif", threshold=1.0, reset="subtract", leak_reset=False)
    neuron.use_kernel = False
    with torch.no_grad():
        neuron.beta.copy_(beta)
        expected = neuron(currents)
        threshold = neuron.threshold.contiguous()
    assert expected.eq(1).all()  # both steps fire in the eager loop; with a fused multiply-add the second would not
    spikes = neuron_kernel.forward(_kernel_with_extension_flags(), currents, threshold, beta, False,
                                   neuron_kernel.reset_kind(False, False))
    assert torch.equal(spikes, expected)


def _lif_forward(wrapper: str) -> str:
    """The wrapper's ``lif_forward`` definition, whitespace collapsed."""
    match = re.search(r"at::Tensor lif_forward\(.*?\n}\n", wrapper, re.DOTALL)
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

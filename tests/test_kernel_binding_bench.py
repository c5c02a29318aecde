"""The binding benchmark compares like with like: same kernel entry point, same numerics flags (nothing is built)."""

import re

from benchmarks import kernel_binding
from snn_research.hybrid import neuron_kernel


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

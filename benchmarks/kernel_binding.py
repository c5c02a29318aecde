"""Kernel binding: the neuron kernel through ctypes (as shipped) against the same source as a torch extension.

``neuron_kernel.cpp`` needs no torch headers and is loaded with ctypes. The
alternative binds the very same translation unit into a torch extension
(``torch.utils.cpp_extension.load``: ninja, a build lock, torch headers), with
a thin wrapper that takes ``at::Tensor`` and calls the same
``extern "C" snn_neuron_forward``. Two wrappers are built:

- ``op``: a ``TORCH_LIBRARY`` custom operator (``torch/library.h`` only, no
  pybind11), called as ``torch.ops.snn_kernel_bench.lif_forward``: the route
  to dispatcher integration (torch.compile with a fake kernel, autocast, a
  CUDA implementation under the same name);
- ``pybind``: a ``torch/extension.h`` module function, the classic
  ``load_inline`` style.

Measured in one run, all with the compiler flags of ``neuron_kernel.FLAGS``
(plus ``-march=native``) so that the machine code is comparable:

1. cold build, each into a fresh temporary folder: wall seconds and CPU
   seconds (compiler processes included; ninja runs its jobs in parallel);
2. warm load from that folder in a fresh interpreter (after ``import torch``):
   what every process pays once the build is cached;
3. per-call time of an LIF forward on a small (8, 64, 64) and a large
   (8, 4096, 2048) float32 tensor, best of N interleaved, with the spikes of
   all routes asserted identical.

Every row informs (INFO): the rows are the evidence for the binding choice
discussed in ``neuron_kernel.py``. Without ninja (``pip install ninja``, or
the system package) the extension rows read SKIP.

    python -m benchmarks.kernel_binding [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import ROOT, Row, interleaved, print_rows, row
from snn_research.hybrid import neuron_kernel

NAME = "kernel_binding"
SMALL = (8, 64, 64)
LARGE = (8, 4096, 2048)
SMALL_CALLS = 2000  # calls per timed sample on the small tensor
BETA, THRESHOLD = 0.5, 1.0
OP_NAMESPACE = "snn_kernel_bench"
ROUTES = ("op", "pybind")

# The kernel's own flags, less those cpp_extension sets itself (-shared, -fPIC, -std).
EXTENSION_CFLAGS = [flag for flag in neuron_kernel.FLAGS if flag not in ("-shared", "-fPIC", "-std=c++17")]
EXTENSION_CFLAGS += neuron_kernel.NATIVE_FLAGS
EXTENSION_LDFLAGS = ["-fopenmp"]

_FORWARD = r"""
extern "C" int snn_neuron_forward(int dtype, const void* x, void* spikes, const void* threshold, const void* beta,
                                  int64_t steps, int64_t rows, int64_t channels, int is_signed, int reset,
                                  int threads);

at::Tensor lif_forward(const at::Tensor& x, const at::Tensor& threshold, const at::Tensor& beta, int64_t is_signed,
                       int64_t reset) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2, "contiguous CPU currents (T, ..., C)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 currents");
  const int64_t steps = x.size(0), channels = x.size(-1);
  TORCH_CHECK(threshold.scalar_type() == x.scalar_type() && threshold.is_contiguous() &&
                  threshold.numel() == channels, "threshold: contiguous (C,) of the currents' dtype");
  TORCH_CHECK(beta.scalar_type() == x.scalar_type() && beta.is_contiguous() && beta.numel() == channels,
              "beta: contiguous (C,) of the currents' dtype");
  at::Tensor spikes = at::empty_like(x);
  const int status = snn_neuron_forward(x.scalar_type() == at::kFloat ? 0 : 1, x.const_data_ptr(),
                                        spikes.mutable_data_ptr(), threshold.const_data_ptr(),
                                        beta.const_data_ptr(), steps, x.numel() / (steps * channels), channels,
                                        static_cast<int>(is_signed), static_cast<int>(reset),
                                        at::get_num_threads());
  TORCH_CHECK(status == 0, "neuron kernel refused its arguments (status ", status, ")");
  return spikes;
}
"""

WRAPPERS = {
    "op": r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
""" + _FORWARD + f"""
TORCH_LIBRARY({OP_NAMESPACE}, m) {{
  m.def("lif_forward(Tensor x, Tensor threshold, Tensor beta, int is_signed, int reset) -> Tensor");
}}

TORCH_LIBRARY_IMPL({OP_NAMESPACE}, CPU, m) {{ m.impl("lif_forward", &lif_forward); }}
""",
    "pybind": r"""
#include <torch/extension.h>
""" + _FORWARD + r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lif_forward", &lif_forward); }
""",
}


def ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the compilers, ninja)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def _timed(into: dict[str, float]):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    into["wall"], into["cpu"] = time.perf_counter() - wall, _cpu_seconds() - cpu


def load_extension(route: str, build_dir: Path):
    """Build (or load from ``build_dir``) the extension: the op's callable, or the pybind module's function."""
    from torch.utils import cpp_extension

    source_dir = build_dir / "sources"
    source_dir.mkdir(parents=True, exist_ok=True)
    wrapper = source_dir / f"{route}_binding.cpp"
    if not wrapper.is_file() or wrapper.read_text() != WRAPPERS[route]:
        wrapper.write_text(WRAPPERS[route])
    loaded = cpp_extension.load(name=f"snn_kernel_{route}", sources=[str(neuron_kernel.SOURCE_FILE), str(wrapper)],
                                extra_cflags=EXTENSION_CFLAGS, extra_ldflags=EXTENSION_LDFLAGS,
                                build_directory=str(build_dir), is_python_module=route == "pybind", verbose=False)
    if route == "pybind":
        return loaded.lif_forward
    return getattr(torch.ops, OP_NAMESPACE).lif_forward


def build_ctypes(cache: Path):
    """The shipped route, cold: ``neuron_kernel.load()`` with its cache folder pointed at an empty ``cache``."""
    previous = os.environ.get(neuron_kernel.CACHE_ENV)
    os.environ[neuron_kernel.CACHE_ENV] = str(cache)
    try:
        neuron_kernel.reset()
        return neuron_kernel.load()  # stays loaded (from the temporary file) for the timings below
    finally:
        if previous is None:
            del os.environ[neuron_kernel.CACHE_ENV]
        else:
            os.environ[neuron_kernel.CACHE_ENV] = previous


_WARM_SCRIPT = """
import sys, time
from pathlib import Path
import torch
from benchmarks import kernel_binding
route, folder = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
if route == "ctypes":
    from snn_research.hybrid import neuron_kernel
    assert neuron_kernel.load() is not None
elif route == "op-library":  # the op's built library opened directly, without cpp_extension
    torch.ops.load_library(str(folder / "snn_kernel_op.so"))
else:
    kernel_binding.load_extension(route, folder)
print(time.perf_counter() - start)
"""


def warm_load_seconds(route: str, folder: Path, repeats: int) -> float:
    """Best-of-``repeats`` seconds to load an already built library in a fresh interpreter (torch imported)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           neuron_kernel.CACHE_ENV: str(folder)}
    best = float("inf")
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", _WARM_SCRIPT, route, str(folder)], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"warm load of the {route} route failed:\n{result.stderr[-2000:]}")
        best = min(best, float(result.stdout.strip().splitlines()[-1]))
    return best


def _inputs(shape: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    currents = torch.randn(*shape, generator=generator) * 0.8 + 0.2
    channels = shape[-1]
    return currents, torch.full((channels,), THRESHOLD), torch.full((channels,), BETA)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def measure(repeats: int = 7, load_repeats: int = 3) -> list[Row]:
    if neuron_kernel._compiler() is None:
        return [Row(NAME, "ctypes kernel", "", float("nan"), "", "SKIP", "no C++ compiler")]
    rows: list[Row] = []
    have_ninja = ninja_available()
    reset = neuron_kernel.reset_kind(False, True)  # the default LIF: subtract the threshold, then leak
    with tempfile.TemporaryDirectory(prefix="snn-binding-") as scratch:
        scratch = Path(scratch)
        # 1. cold builds, one after the other (never two compilers competing)
        builds: dict[str, dict[str, float]] = {"ctypes": {}}
        with _timed(builds["ctypes"]):
            library = build_ctypes(scratch / "ctypes")
        if library is None:
            return [Row(NAME, "ctypes kernel", "", float("nan"), "", "SKIP", "the kernel did not build (warning)")]
        forwards = {"ctypes": lambda x, th, be: neuron_kernel.forward(library, x, th, be, False, reset)}
        if have_ninja:
            for route in ROUTES:
                builds[route] = {}
                with _timed(builds[route]):
                    function = load_extension(route, scratch / route)
                forwards[route] = lambda x, th, be, function=function: function(x, th, be, 0, reset)

        # 2. warm loads from the built folders, each in a fresh interpreter
        warm = {route: warm_load_seconds(route, scratch / route, load_repeats) for route in forwards}
        if "op" in warm:
            warm["op-library"] = warm_load_seconds("op-library", scratch / "op", load_repeats)

        base = builds["ctypes"]
        baseline = f"ctypes g++ {base['wall']:.1f} s wall, {base['cpu']:.1f} s CPU"
        for route in ROUTES:
            metric = f"cold build, {route} ext / ctypes (wall)"
            if route not in builds:
                rows.append(Row(NAME, metric, "", float("nan"), baseline, "SKIP",
                                "ninja not found (pip install ninja): torch extensions cannot build"))
                continue
            built = builds[route]
            rows.append(row(NAME, metric, "", built["wall"] / base["wall"], baseline,
                            f"{route} {built['wall']:.1f} s wall, {built['cpu']:.1f} s CPU "
                            f"(CPU ratio {built['cpu'] / base['cpu']:.2f}); {os.cpu_count()} cores"))
        how = {"op": "cpp_extension.load, cached build", "pybind": "cpp_extension.load, cached build",
               "op-library": "torch.ops.load_library of the built .so, no cpp_extension"}
        for route in (*ROUTES, "op-library"):
            if route in warm:
                rows.append(row(NAME, f"warm load, {route} / ctypes", "", warm[route] / warm["ctypes"],
                                f"ctypes {warm['ctypes'] * 1e3:.1f} ms",
                                f"{route} {warm[route] * 1e3:.1f} ms; fresh interpreter, torch imported; {how[route]}"))

        # 3. per-call time, small and large
        neuron = None
        for label, shape, calls in (("small", SMALL, SMALL_CALLS), ("large", LARGE, 1)):
            x, th, be = _inputs(shape, seed=1)
            reference = forwards["ctypes"](x, th, be)
            for route, forward in forwards.items():
                if not torch.equal(forward(x, th, be), reference):
                    raise AssertionError(f"{route} spikes differ from the ctypes route on {shape}")
            candidates = {}
            for route, forward in forwards.items():
                def sample(forward=forward, x=x, th=th, be=be):
                    for _ in range(calls):
                        forward(x, th, be)
                candidates[route] = sample
            if label == "small":  # the whole module call, for scale: the binding is one part of it
                from snn_research.hybrid.neurons import MultiStepNeuron

                neuron = MultiStepNeuron(shape[-1], kind="lif", beta=BETA, threshold=THRESHOLD)
                if not torch.equal(neuron(x).detach(), reference):
                    raise AssertionError("MultiStepNeuron spikes differ from the ctypes route")

                def module_sample(x=x):
                    with torch.no_grad():
                        for _ in range(calls):
                            neuron(x)
                candidates["module"] = module_sample
            best = interleaved(candidates, repeats)
            per_call = {name: seconds / calls for name, seconds in best.items()}
            spike_rate = float(reference.mean())
            unit, scale = ("us", 1e6) if label == "small" else ("ms", 1e3)
            for route in ROUTES:
                if route not in per_call:
                    rows.append(Row(NAME, f"{label} {_shape_text(shape)} fwd, {route} / ctypes", "", float("nan"),
                                    "", "SKIP", "ninja not found"))
                    continue
                note = (f"{route} {per_call[route] * scale:.1f} {unit}/call; identical spikes "
                        f"(rate {spike_rate:.3f})")
                if label == "large":
                    gbytes = 2 * x.numel() * x.element_size() / 1e9  # currents read once, spikes written once
                    note += (f"; {gbytes / per_call[route]:.1f} vs {gbytes / per_call['ctypes']:.1f} GB/s, "
                             f"{torch.get_num_threads()} threads")
                rows.append(row(NAME, f"{label} {_shape_text(shape)} fwd, {route} / ctypes", "",
                                per_call[route] / per_call["ctypes"],
                                f"ctypes {per_call['ctypes'] * scale:.1f} {unit}/call", note))
            if label == "small":
                rows.append(row(NAME, f"small {_shape_text(shape)} module fwd / ctypes", "",
                                per_call["module"] / per_call["ctypes"],
                                f"ctypes {per_call['ctypes'] * 1e6:.1f} us/call",
                                f"MultiStepNeuron no_grad {per_call['module'] * 1e6:.1f} us/call (ctypes inside)"))
            del x, th, be, reference, candidates
            gc.collect()
    neuron_kernel.reset()  # the temporary library goes; the next load() uses the usual cache
    return rows


def run(repeats: int = 7) -> list[Row]:
    return measure(repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (best of)")
    parser.add_argument("--load-repeats", type=int, default=3, help="fresh interpreters per warm-load figure")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = measure(args.repeats, args.load_repeats)
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in rows]))
    else:
        print_rows(rows)


if __name__ == "__main__":
    sys.exit(main())

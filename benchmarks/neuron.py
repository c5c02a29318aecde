"""Neuron kernel: our multi-step LIF against snnTorch 1.0 and SpikingJelly 2.0, side by side.

Input (T=8, 4096, 2048) float32, threshold 1, beta 0.5 (tau 2, so SpikingJelly's
``v - v / tau`` and our ``beta * v`` round identically), ATan surrogate of
sharpness 2 (both peers' default shape). Each peer is compared with our neuron
in its own configuration:

- snnTorch ``Leaky`` (reset_delay, subtract), looped over T  ==  ours with ``leak_reset=False``
- SpikingJelly ``LIFNode(decay_input=False, v_reset=None, detach_reset=True, step_mode='m')``
  ==  ours with the default ``leak_reset=True``

and the spike trains are asserted identical in the same run. The currents are
random odd multiples of 2^-12 (|x| < 3): with beta = 1/2 every membrane is then
an odd multiple of 2^-(12 + t), so every sum is exact in float32 whatever the
order of operations (snnTorch adds the input before subtracting the reset, we
after) and no membrane ever equals the threshold (snnTorch fires on ``>``, we and
SpikingJelly on ``>=``). With plain Gaussian currents a few spikes in 10^7 flip
on such rounding. Timed: forward +
backward (surrogate BPTT with a random upstream gradient), and forward alone
under ``no_grad``. Target: forward + backward at least 2x faster than the
faster peer.

SpikingJelly is not a project dependency: ``make bench`` installs it into
``.bench-venv``, and when this interpreter lacks it the benchmark runs itself
there (``python -m benchmarks.neuron --json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

from benchmarks.common import ROOT, Row, interleaved, row

STEPS, ROWS, CHANNELS = 8, 4096, 2048
BETA, THRESHOLD, SHARPNESS = 0.5, 1.0, 2.0
TARGET = ">= 2.0"
PEER_PYTHON = ROOT / ".bench-venv" / "bin" / "python"


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gaussian = (torch.randn(STEPS, ROWS, CHANNELS, generator=generator) * 0.8 + 0.2).clamp_(-2.9, 2.9)
    currents = (torch.floor(gaussian * 2**11) * 2 + 1) / 2**12  # odd multiples of 2^-12
    upstream = torch.randn(STEPS, ROWS, CHANNELS, generator=generator)
    return currents, upstream


def _ours(leak_reset: bool, use_kernel: bool = True):
    from snn_research.hybrid.neurons import MultiStepNeuron

    neuron = MultiStepNeuron(CHANNELS, kind="lif", beta=BETA, threshold=THRESHOLD, surrogate="atan",
                             sharpness=SHARPNESS, leak_reset=leak_reset)
    neuron.use_kernel = use_kernel
    return neuron


def _snntorch():
    import snntorch

    leaky = snntorch.Leaky(beta=BETA, threshold=THRESHOLD, reset_mechanism="subtract",
                           spike_grad=snntorch.surrogate.atan(alpha=SHARPNESS))

    def run(currents: torch.Tensor) -> torch.Tensor:
        membrane = torch.zeros_like(currents[0])
        spikes = []
        for t in range(currents.shape[0]):
            spike, membrane = leaky(currents[t], membrane)
            spikes.append(spike)
        return torch.stack(spikes)

    return run


def _spikingjelly():
    from spikingjelly.activation_based import functional, neuron, surrogate

    node = neuron.LIFNode(tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=THRESHOLD, v_reset=None,
                          surrogate_function=surrogate.ATan(alpha=SHARPNESS), detach_reset=True, step_mode="m")

    def run(currents: torch.Tensor) -> torch.Tensor:
        functional.reset_net(node)
        return node(currents)

    return run


def _fwd_bwd(fn, currents: torch.Tensor, upstream: torch.Tensor):
    def step():
        x = currents.detach().requires_grad_()
        fn(x).backward(upstream)
        return x.grad

    return step


def _fwd(fn, currents: torch.Tensor):
    def step():
        with torch.no_grad():
            return fn(currents)

    return step


def measure(repeats: int = 3) -> list[Row]:
    currents, upstream = _inputs()
    peers = {"snntorch": _snntorch()}
    have_jelly = importlib.util.find_spec("spikingjelly") is not None
    if have_jelly:
        peers["spikingjelly"] = _spikingjelly()
    ours = {"snntorch": _ours(leak_reset=False), "spikingjelly": _ours(leak_reset=True)}
    eager = _ours(leak_reset=True, use_kernel=False)

    rows: list[Row] = []
    # identical spikes (and gradients to rounding) in each peer's configuration
    grad_note = {}
    for name, peer in peers.items():
        x_ours, x_peer = currents.clone().requires_grad_(), currents.clone().requires_grad_()
        spikes_ours, spikes_peer = ours[name](x_ours), peer(x_peer)
        mismatched = int((spikes_ours != spikes_peer).sum())
        spikes_ours.backward(upstream)
        spikes_peer.backward(upstream)
        grad_diff = float((x_ours.grad - x_peer.grad).abs().max())
        grad_note[name] = f"spike rate {float(spikes_ours.detach().mean()):.3f}, max |grad diff| {grad_diff:.1e}"
        if mismatched:
            raise AssertionError(f"{mismatched} of {spikes_ours.numel()} spikes differ from {name}")
        del x_ours, x_peer, spikes_ours, spikes_peer

    both = {f"ours[{name}]": _fwd_bwd(ours[name], currents, upstream) for name in peers}
    both.update({name: _fwd_bwd(peer, currents, upstream) for name, peer in peers.items()})
    both["ours-eager"] = _fwd_bwd(eager, currents, upstream)
    train = interleaved(both, repeats)
    forward = interleaved({**{f"ours[{name}]": _fwd(ours[name], currents) for name in peers},
                           **{name: _fwd(peer, currents) for name, peer in peers.items()},
                           "ours-eager": _fwd(eager, currents)}, repeats)

    shape = f"T={STEPS} x {ROWS} x {CHANNELS} fp32"
    for label, times in (("fwd+bwd", train), ("forward", forward)):
        fastest = min(peers, key=lambda name: times[name])
        slowest_ours = max(times[f"ours[{name}]"] for name in peers)
        missing = "" if have_jelly else "spikingjelly not installed (make bench installs it): snnTorch only"
        rows.append(row("neuron", f"LIF {label} speed-up vs fastest peer", TARGET if label == "fwd+bwd" else "",
                        times[fastest] / slowest_ours, f"{fastest} {times[fastest] * 1e3:.0f} ms",
                        f"ours {slowest_ours * 1e3:.0f} ms, {shape}" + (f"; {missing}" if missing else "")))
        for name in peers:
            rows.append(row("neuron", f"LIF {label} speed-up vs {name}", "", times[name] / times[f"ours[{name}]"],
                            f"{name} {times[name] * 1e3:.0f} ms",
                            f"ours {times[f'ours[{name}]'] * 1e3:.0f} ms; identical spikes; "
                            + grad_note[name] if label == "fwd+bwd" else f"ours {times[f'ours[{name}]'] * 1e3:.0f} ms"))
        rows.append(row("neuron", f"LIF {label} speed-up vs our eager loop", "",
                        times["ours-eager"] / times["ours[snntorch]"], f"eager {times['ours-eager'] * 1e3:.0f} ms",
                        "the reference path the kernel replaces"))
    return rows


def run(repeats: int = 3) -> list[Row]:
    """Measure here, or in .bench-venv when this interpreter has no SpikingJelly."""
    if importlib.util.find_spec("spikingjelly") is None and PEER_PYTHON.exists():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
        result = subprocess.run([str(PEER_PYTHON), "-m", "benchmarks.neuron", "--json", "--repeats", str(repeats)],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"neuron benchmark in {PEER_PYTHON} failed:\n{result.stderr[-3000:]}")
        return [Row(**r) for r in json.loads(result.stdout.strip().splitlines()[-1])]
    return measure(repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line (for run.py)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = measure(args.repeats)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        from benchmarks.common import print_rows

        print_rows(rows)


if __name__ == "__main__":
    sys.exit(main())

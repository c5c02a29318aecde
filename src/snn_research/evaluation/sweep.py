"""Points of a training-free sweep over spike codings and T, one JSON file per point.

A point is a converted hybrid (or a peer's converted model) scored against the teacher on the test
split: perplexity, bits per byte, top-1 agreement, full KL, and its FFN energy against the FP32 and
INT8 teacher. ``pipelines/sweep-t`` writes one point per (coding, T) and one per T of the peer, then
``snn-research frontier`` joins them into a CSV and a plot.

The peer is SpikingJelly 2.0's Qwen2 ANN-to-SNN recipe (``peer_qwen2.py``). Its FFN energy is counted
here with this project's rules, from the spikes its MLP encoder emits into ``down_proj``: see
``peer_ffn_energy``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snn_research.errors import format_validation_error
from snn_research.evaluation.baselines import Prices
from snn_research.io import atomic_write_text

PEER_SERIES = "spikingjelly-qwen2"


class SweepPoint(BaseModel):
    """One point of the sweep: what was converted, how well it predicts, what it costs."""

    model_config = ConfigDict(extra="forbid")

    series: str = Field(description="the coding (if | weighted | rate | lif) or the peer's name")
    encoder: str
    time_steps: int = Field(ge=1)
    levels: int = Field(ge=1, description="largest spike count of one sign per neuron and token")
    clipping: str = Field(description="how thresholds were set: percentile | search | the peer's quantile")
    test_tokens: int = Field(ge=1)
    teacher_ppl: float = Field(gt=0)
    ppl: float = Field(gt=0)
    ppl_ratio: float = Field(gt=0)
    bpb: float = Field(ge=0)
    agreement_top1: float = Field(ge=0, le=1)
    kl_full_to_teacher: float = Field(ge=0)
    spike_rate: float = Field(ge=0, description="FFN spikes per neuron per time step")
    ffn_energy_ratio: float = Field(gt=0, description="FFN energy / the FP32 teacher's FFN energy")
    ffn_energy_ratio_int8: float = Field(gt=0, description="FFN energy / the INT8 teacher's FFN energy")
    ffn_energy_ratio_lowbit: float | None = Field(default=None, gt=0)
    ffn_memory_ratio_per_token: float | None = Field(default=None, gt=0)
    model_energy_ratio: float | None = Field(default=None, gt=0)


def write_point(point: SweepPoint, path: Path) -> None:
    """The point as JSON, floats to 6 significant digits (stable text for DVC diffs), written atomically."""
    values = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in point.model_dump().items()}
    atomic_write_text(Path(path), json.dumps(values, indent=2) + "\n")


def read_point(path: Path) -> SweepPoint:
    """A point file, validated; ValueError naming the file and the field otherwise."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such sweep point (run its sweep-point or sweep-peer stage)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON sweep point ({error})") from None
    try:
        return SweepPoint.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path}: invalid sweep point\n{format_validation_error(error)}") from None


def peer_ffn_energy(hidden: int, intermediate: int, elementwise_per_channel: int, time_steps: int,
                    spikes_per_token: list[float], prices: Prices) -> dict[str, float]:
    """FFN energy of the peer's gated FFN against the teacher's, per this project's pricing rules.

    Per layer and token, with d = ``hidden``, f = ``intermediate``, e = ``elementwise_per_channel``:

    - teacher: 3 d f MACs (gate, up, down) + e f MACs (activation, gating multiply);
    - peer: gate and up read the analog normalised hidden state, 2 d f MACs, priced like the teacher's
      (the parts both share sit on the baseline's table, as in ``baselines.compare``); e f analog MACs;
      the signed encoder of the product site is a pair of IF neurons per channel (one per sign), each
      integrating its input at every step (2 f T ACs); every spike into ``down_proj`` is d synaptic ACs;
      d MACs rescale the output (as this project's decoders do).

    ``spikes_per_token`` holds one entry per layer: both signs, summed over the T steps. The spike rate is
    per neuron and step over the 2 f neurons of each layer's encoder (the mean of SpikingJelly's positive
    and negative spike rates).
    """
    if not spikes_per_token:
        raise ValueError("no layers: spikes_per_token is empty")
    d, f, e = hidden, intermediate, elementwise_per_channel
    neurons = 2 * f  # one IF neuron per sign and channel
    out: dict[str, float] = {}
    for name, mac in (("", prices.e_mac_pj), ("_int8", prices.e_mac_int8_pj)):
        teacher = peer = 0.0
        for spikes in spikes_per_token:
            shared = 2 * d * f * mac
            teacher += shared + (d * f + e * f) * mac
            peer += shared + (e * f + d) * prices.e_mac_pj + (neurons * time_steps + spikes * d) * prices.e_ac_pj
        out[f"ffn_energy_ratio{name}"] = peer / teacher
    out["spike_rate"] = sum(spikes_per_token) / (len(spikes_per_token) * neurons * time_steps)
    return out

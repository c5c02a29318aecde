"""Research track: spikes into the attention projections and the LM head, for a training-free trial.

``SpikingInput`` wraps a linear map so that it reads its input as spikes: the input is encoded by the
pipeline's own encoder (``hybrid/adapter.py``'s ``AnalogToSpikes``, the weighted code by default) with
per-channel thresholds, decoded, and fed to the unchanged linear map, exactly as the spiking FFN sites do.
Thresholds come from ``percentile_thresholds``: the chosen percentile of |input| per channel over
calibration tokens, as ``calibrate`` computes it for the FFN sites (here in memory, exactly, not with the
streaming histogram). Sites: the q, k and v projections (on the block's normed input), the o projection
(on the attention output) and the LM head (on the final normed hidden state); tied embeddings stay tied.

This is a measuring device, not yet a pipeline site: the converter, calibration, metadata, energy model and
distillation know only the FFN sites. It counts spikes per wrapped map so that a trial can report the
spike rate; the energy of these sites is not priced here.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from snn_research.hybrid.adapter import AnalogToSpikes, SpikesToAnalog
from snn_research.research.operators import observe_inputs

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class SpikingInput(nn.Module):
    """``linear(decode(encode(x)))``: a linear map that reads its input as spikes."""

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor, time_steps: int, encoder: str = "weighted") -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"only nn.Linear maps can read spikes here (got {type(linear).__name__})")
        self.linear = linear
        self.encoder = AnalogToSpikes(linear.in_features, time_steps, kind=encoder, threshold=threshold,
                                      per_channel=True, learnable_threshold=False)
        self.decoder = SpikesToAnalog()
        self.spikes = 0.0
        self.neuron_steps = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.encoder(x)
        self.spikes += float(self.encoder.spike_count(levels).abs().sum())
        self.neuron_steps += float(x.numel() * self.encoder.time_steps)
        return self.linear(self.decoder(levels, self.encoder.threshold, self.encoder.levels).to(x.dtype))


def projection_paths(model: nn.Module, sites: Iterable[str]) -> list[str]:
    """Module paths of the chosen sites: ``attention`` (q, k, v, o of every block) and/or ``lm_head``."""
    sites = set(sites)
    unknown = sites - {"attention", "lm_head"}
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; choose from ['attention', 'lm_head']")
    paths = []
    if "attention" in sites:
        paths += [name for name, module in model.named_modules()
                  if name.rsplit(".", 1)[-1] in ATTENTION and isinstance(module, nn.Linear)]
        if not paths:
            raise ValueError("the model has no q/k/v/o_proj linear maps (GPT-2's fused c_attn is not supported)")
    if "lm_head" in sites:
        head = getattr(model, "lm_head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError("the model has no nn.Linear lm_head")
        paths.append("lm_head")
    return paths


def percentile_thresholds(model: nn.Module, paths: list[str], batches: Iterable[torch.Tensor],
                          percentile: float = 99.9) -> dict[str, torch.Tensor]:
    """Per path, the ``percentile`` of |input| per input channel over the ``batches`` (token ids)."""
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    observe_inputs(model, paths, batches, lambda path, module, x: seen[path].append(x.abs().flatten(0, -2).float()))
    thresholds = {}
    for path, chunks in seen.items():
        values = torch.cat(chunks)
        thresholds[path] = torch.quantile(values, percentile / 100.0, dim=0).clamp_min(1e-6)
    return thresholds


def spike_projections(model: nn.Module, thresholds: dict[str, torch.Tensor], time_steps: int,
                      encoder: str = "weighted") -> list[SpikingInput]:
    """Replace each calibrated linear map of ``model`` in place by its ``SpikingInput``."""
    wrapped = []
    for path, threshold in thresholds.items():
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = SpikingInput(getattr(owner, child), threshold, time_steps, encoder)
        setattr(owner, child, module)
        wrapped.append(module)
    return wrapped


def spike_rate(wrapped: list[SpikingInput]) -> float:
    """Spikes per neuron per time step over every wrapped map since it was made."""
    steps = sum(w.neuron_steps for w in wrapped)
    return sum(w.spikes for w in wrapped) / steps if steps else float("nan")

"""Quantised ANNs a user would deploy instead of the hybrid, scored for quality beside it.

Two baselines, each the teacher with its FFN linears quantised and everything else as it was:

- ``w8a8``: the standard deployment. Weights: symmetric 8-bit integers, one scale per output channel.
  Activations: symmetric 8-bit, one scale per token computed at run time (the token's largest magnitude
  over 127), as dynamic per-token INT8 kernels do.
- ``w8ab``: 8-bit weights and the hybrid's own activation quantiser: static per-channel thresholds (the
  converted hybrid's, so the calibration and the clipping search) and the weighted code's 2^T - 1 levels
  per sign, rounded as its encoder rounds (``weighted_levels``). Its weights are quantised with each input
  channel's step folded in (``hybrid.integer.fold_quantize``), as an integer kernel with per-channel static
  activation scales needs them. With float weights (``weight_bits=None``) this ANN computes exactly what
  the float hybrid computes, and with 8 bits what a hybrid with ``weight_bits: 8`` computes (both tested to
  float rounding): its quality is what the spikes cost against the quantised ANN they equal.

Both are fake-quantised: integers times scales held in float32, the forward in float, so the figures are
the quantised model's quality, not an integer kernel's speed.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from snn_research.hybrid.adapter import AnalogToSpikes, weighted_levels
from snn_research.hybrid.integer import fold_quantize
from snn_research.hybrid.integer import quantize_weight as integer_weight
from snn_research.models.hybrid_transformer import SpikingGatedMLP, find_mlps, mlp_family, spiking_mlps

Mode = Literal["w8a8", "w8ab"]


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integers, one scale per output channel (``hybrid.integer.quantize_weight``), given back in float."""
    return integer_weight(weight, bits).dequantized().to(weight.dtype)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric ``bits``-bit activations, one scale per token (its largest magnitude over 2^(b-1) - 1)."""
    limit = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / limit
    return (x / scale).round().clamp(-limit, limit) * scale


class QuantizedLinear(nn.Module):
    """``y = W_q x_q + b``: an ``nn.Linear`` or GPT-2 ``Conv1D`` with quantised weights and input."""

    def __init__(self, linear: nn.Module, weight_bits: int | None, activation: str, activation_bits: int = 8,
                 threshold: torch.Tensor | None = None, time_steps: int | None = None) -> None:
        super().__init__()
        if isinstance(linear, Conv1D):  # stores (in, out): y = x W + b
            weight = linear.weight.detach().t()
        elif isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        else:
            raise ValueError(f"{type(linear).__name__} is not a linear map to quantise")
        if activation not in ("per_token", "static"):
            raise ValueError(f"activation must be 'per_token' or 'static' (got {activation!r})")
        if activation == "static" and (threshold is None or time_steps is None):
            raise ValueError("static activations need the hybrid's thresholds and T")
        if weight_bits is None:
            quantized = weight
        elif activation == "static":  # the input's per-channel step folded in, as an integer kernel needs it
            step = threshold.detach().to(weight.dtype) / (2 ** time_steps - 1)
            quantized = fold_quantize(weight, step, weight_bits).detach()
        else:
            quantized = quantize_weight(weight.float(), weight_bits).to(weight.dtype)
        self.register_buffer("weight", quantized.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.activation, self.activation_bits, self.time_steps = activation, activation_bits, time_steps
        self.register_buffer("threshold", None if threshold is None else threshold.detach().clone())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "per_token":
            return quantize_per_token(x, self.activation_bits)
        threshold = self.threshold.to(x.dtype)
        levels = 2 ** self.time_steps - 1
        return weighted_levels(x, threshold, self.time_steps) * threshold / levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)


def _threshold(encoder: AnalogToSpikes) -> tuple[torch.Tensor, int]:
    if encoder.kind != "weighted":
        raise ValueError(f"the W8Ab baseline takes the weighted code's quantiser; this hybrid's encoder is "
                         f"{encoder.kind!r}")
    return encoder.threshold.detach(), encoder.time_steps


def quantized_ann(teacher: nn.Module, mode: Mode, hybrid: nn.Module | None = None,
                  weight_bits: int | None = 8) -> nn.Module:
    """A copy of ``teacher`` whose FFN linears are quantised as ``mode`` says (see the module docstring).

    ``w8ab`` reads the static thresholds and T of ``hybrid``'s spiking FFNs, layer by layer, and quantises
    only the FFNs that spike there; ``w8a8`` quantises every FFN that ``hybrid`` spikes (all, without one).
    """
    model = copy.deepcopy(teacher)
    units = {} if hybrid is None else {unit.path: unit for unit in spiking_mlps(hybrid)}
    if mode == "w8ab" and not units:
        raise ValueError("the W8Ab baseline needs the converted hybrid: its thresholds are the activation quantiser")
    for location in find_mlps(model):
        if units and location.path not in units:
            continue
        mlp = location.module
        family = mlp_family(mlp)
        if mode == "w8a8":
            names = ("gate_proj", "up_proj", "down_proj") if family == "gated" else ("c_fc", "c_proj")
            for name in names:
                setattr(mlp, name, QuantizedLinear(getattr(mlp, name), weight_bits, "per_token"))
            continue
        unit = units[location.path]
        if not isinstance(unit, SpikingGatedMLP):
            raise ValueError(f"{location.path}: the W8Ab baseline is built for gated FFNs (the weighted code)")
        (input_threshold, steps), (product_threshold, product_steps) = (_threshold(unit.input_encoder),
                                                                        _threshold(unit.product_encoder))
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, QuantizedLinear(getattr(mlp, name), weight_bits, "static",
                                               threshold=input_threshold, time_steps=steps))
        mlp.down_proj = QuantizedLinear(mlp.down_proj, weight_bits, "static", threshold=product_threshold,
                                        time_steps=product_steps)
    return model.eval()

"""Integer spiking linears: a weighted-code consumer computed as spike levels times integer weights.

A weighted-code site hands its consumer, per input channel c, a signed level n_c in [-L, L] (L = 2^T - 1),
which stands for n_c * theta_c / L (``adapter.weighted_levels``). The consumer's product is then

    y_o = sum_c W_oc * theta_c / L * n_c.

Folding theta_c / L into the weight's columns and quantising the result symmetrically, with one scale per
output channel (8 bits) or per output channel and group of ``group_size`` input channels (4 bits), gives

    y_o = sum_g s_og * sum_{c in g} Q_oc * n_c,

an exact integer product (int8 levels times int8 weights, accumulated in int32 by ``torch._int_mm``, which
runs on the CPU in the pinned torch) followed by one floating-point scale per output channel and group.
Levels fit int8 while T <= 7 (L = 127); a larger T is refused, not wrapped.

``float_reference`` computes the same integers through a float64 matmul (exact below 2^53) and then the
same float operations, so the integer path equals it bit for bit: a test of the kernel, not an
approximation of it. ``w8a8_linear`` is the quantised ANN the hybrid is compared with: per-token dynamic
int8 activations, per-channel int8 weights, on the same integer kernel.

This module is the kernel and the quantiser; which sites use it is the conversion's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_INT8_LEVELS = 127  # |level| of a weighted code at T = 7; int8 holds it, T = 8 does not


@dataclass(frozen=True)
class IntegerWeight:
    """A linear's weight as integers: ``q`` (out, in) int8 in [-qmax, qmax] and ``scale`` (out, groups) float32."""

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        top = qmax(self.bits)
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor (got {self.q.dtype}, shape {tuple(self.q.shape)})")
        if self.q.numel() and int(self.q.to(torch.int16).abs().max()) > top:  # int8's abs() wraps -128
            raise ValueError(f"q holds a value beyond +-{top}, the range of {self.bits}-bit weights")
        groups = -(-self.q.shape[1] // self.group_size)
        if tuple(self.scale.shape) != (self.q.shape[0], groups):
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}; {self.q.shape[0]} outputs in groups of "
                             f"{self.group_size} need ({self.q.shape[0]}, {groups})")

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def dequantized(self) -> torch.Tensor:
        """The float weight it stands for: (out, in) float32."""
        expanded = self.scale.repeat_interleave(self.group_size, dim=1)[:, :self.q.shape[1]]
        return self.q.to(torch.float32) * expanded


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8 (got {bits})")
    return 2 ** (bits - 1) - 1


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> IntegerWeight:
    """Symmetric integer weights: one scale per output channel, or per output channel and group of
    ``group_size`` input channels (``None``: the whole row, one group). The scale is the group's largest
    |w| over qmax, so no weight clips; an all-zero group gets scale 1 (its integers are 0)."""
    if weight.dim() != 2:
        raise ValueError(f"a linear's weight is (out, in); got shape {tuple(weight.shape)}")
    top = qmax(bits)
    out_features, in_features = weight.shape
    size = in_features if group_size is None else int(group_size)
    if size < 1 or in_features % size:
        raise ValueError(f"group_size {group_size} must divide the {in_features} input channels")
    grouped = weight.detach().to(torch.float32).reshape(out_features, in_features // size, size)
    scale = grouped.abs().amax(dim=2) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(grouped / scale.unsqueeze(2)).clamp_(-top, top).to(torch.int8)
    return IntegerWeight(q=q.reshape(out_features, in_features), scale=scale.contiguous(), bits=bits,
                         group_size=size)


def fold_thresholds(weight: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
    """W_oc * theta_c / L: the weight that multiplies a weighted-code level directly (float32)."""
    levels = 2 ** time_steps - 1
    theta = threshold.detach().to(torch.float32).reshape(-1)
    if theta.numel() not in (1, weight.shape[1]):
        raise ValueError(f"threshold has {theta.numel()} channels; the weight has {weight.shape[1]} inputs")
    return weight.detach().to(torch.float32) * (theta / levels)


def quantize_spiking_linear(weight: torch.Tensor, threshold: torch.Tensor, time_steps: int, bits: int,
                            group_size: int | None = None) -> IntegerWeight:
    """The integer weight of a consumer of a weighted-code site: thresholds folded in, then quantised."""
    return quantize_weight(fold_thresholds(weight, threshold, time_steps), bits, group_size)


def encode_int8(x: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
    """A weighted-code site's levels as int8, straight from its input: the expression of
    ``adapter.weighted_levels`` (charge |x| L / theta + 1/2, floored, clamped at L, signed) without the float
    tensor in between. T <= 7."""
    from snn_research.hybrid.adapter import _float32_charge  # the encoder's own expression, float64 kept

    levels = 2 ** time_steps - 1
    if levels > MAX_INT8_LEVELS:
        raise ValueError(f"T = {time_steps} gives levels up to {levels}, which do not fit int8: the integer path "
                         f"needs T <= 7")
    charge = _float32_charge(x, threshold, float(levels))
    if not bool(torch.isfinite(charge).all()):
        raise ValueError("the site's charge is not finite (a NaN or infinite input, or a zero threshold): "
                         "it has no integer level")
    return charge.floor_().clamp_(max=levels).copysign_(x.to(charge.dtype)).to(torch.int8)


def levels_as_int8(levels: torch.Tensor) -> torch.Tensor:
    """Weighted-code levels (float or integer, whole numbers in [-127, 127]) as int8; a level out of range
    (T > 7) or not whole is refused rather than wrapped or rounded."""
    if levels.is_floating_point():
        if not bool(torch.isfinite(levels).all()):
            raise ValueError("levels must be finite (got a NaN or infinite level)")
        if not torch.equal(levels, levels.round()):
            raise ValueError("levels must be whole numbers (a weighted code's levels)")
    if levels.dtype == torch.int8:
        if bool((levels == -128).any()):  # the one int8 value beyond the code's range
            raise ValueError(f"a level of -128 does not fit the code: levels lie in [-{MAX_INT8_LEVELS}, "
                             f"{MAX_INT8_LEVELS}]")
        return levels
    peak = int(levels.abs().max()) if levels.numel() else 0
    if peak > MAX_INT8_LEVELS:
        raise ValueError(f"a level of {peak} does not fit int8: the integer path needs T <= 7 "
                         f"(2^T - 1 <= {MAX_INT8_LEVELS})")
    return levels.to(torch.int8)


def _grouped_accumulate(rows: torch.Tensor, weight: IntegerWeight, matmul) -> torch.Tensor:
    """sum_g s_og * (rows_g @ Q_g^T), each group's integer sum turned into float32 before its scale, groups
    added in order: (N, out) float32. ``matmul(a, b)`` returns the exact integer product."""
    size = weight.group_size
    out = None
    for g in range(weight.groups):
        part = matmul(rows[:, g * size:(g + 1) * size], weight.q[:, g * size:(g + 1) * size].t())
        term = part.to(torch.float32) * weight.scale[:, g]
        out = term if out is None else out.add_(term)
    return out


def _int_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a.contiguous(), b)  # int8 x int8 -> int32, exact


def _float64_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.to(torch.float64) @ b.to(torch.float64)  # exact for sums below 2^53


def integer_linear(levels: torch.Tensor, weight: IntegerWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) levels -> (..., out) float32: int8 levels times int8 weights, int32 sums, float scales."""
    rows = levels_as_int8(levels).reshape(-1, levels.shape[-1])
    _check_accumulator(weight.bits, weight.group_size)
    out = _grouped_accumulate(rows, weight, _int_product)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*levels.shape[:-1], weight.q.shape[0])


def float_reference(levels: torch.Tensor, weight: IntegerWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same integers through a float64 matmul, then the same float operations as ``integer_linear``."""
    rows = levels_as_int8(levels).reshape(-1, levels.shape[-1])
    out = _grouped_accumulate(rows, weight, _float64_product)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*levels.shape[:-1], weight.q.shape[0])


def _check_accumulator(bits: int, group_size: int) -> None:
    """int32 holds any group's sum: |sum| <= 127 * qmax * group_size < 2^31 (q's range is checked when an
    IntegerWeight is made)."""
    worst = MAX_INT8_LEVELS * qmax(bits) * group_size
    if worst >= 2 ** 31:
        raise ValueError(f"a group of {group_size} inputs could overflow the int32 accumulator")


def w8a8_linear(x: torch.Tensor, weight: IntegerWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The quantised ANN's linear: each token's activations quantised to int8 with its own scale (largest
    |x| / 127), per-channel int8 weights, int32 sums on the same kernel, then both scales."""
    if weight.groups != 1:
        raise ValueError("W8A8 takes one weight scale per output channel (group_size None)")
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    token_scale = rows.abs().amax(dim=1, keepdim=True) / 127.0
    token_scale = torch.where(token_scale > 0, token_scale, torch.ones_like(token_scale))
    q = torch.round(rows / token_scale).clamp_(-127, 127).to(torch.int8)
    _check_accumulator(8, weight.q.shape[1])  # one group: the whole row
    out = _int_product(q, weight.q.t()).to(torch.float32) * token_scale * weight.scale[:, 0]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*x.shape[:-1], weight.q.shape[0])


def fold_quantize(weight: torch.Tensor, step: torch.Tensor, bits: int, group_size: int | None = None,
                  quantized: IntegerWeight | None = None) -> torch.Tensor:
    """The float weight a consumer of decoded levels multiplies by: the integer weight of ``weight``, with each
    input channel's step (theta / L) folded in, unfolded again, W_eff = Q(W diag(step)) diag(1 / step).

    ``decoded @ W_eff^T`` is then ``levels @ (scale * Q)^T``: what ``integer_linear`` computes. The rounding is
    ``quantize_weight``'s (or ``quantized``, the integer weight already made from the same weight and step);
    its gradient passes straight through to the float master weight (training).
    """
    step = step.to(weight.dtype)
    folded = weight * step
    if quantized is None:
        quantized = quantize_weight(folded.detach(), bits, group_size)
    dequantized = quantized.dequantized().to(weight.dtype)
    return (folded + (dequantized - folded).detach()) / step


class CachedIntegerWeight:
    """A consumer's ``IntegerWeight``, rebuilt only when its float master weight or the site's thresholds
    change (their version counters), so inference does not requantise every call.

    ``pin`` sets the integers a checkpoint stored for the current weight and thresholds: a loaded hybrid then
    runs on exactly the saved integers, not on a requantisation of the float weight rebuilt from them (which
    could differ in a scale's last bit). A change of weight, thresholds, T or device drops the pin.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: IntegerWeight | None = None

    @staticmethod
    def _key(weight: torch.Tensor, log_threshold: torch.Tensor, time_steps: int, bits: int,
             group_size: int | None) -> tuple:
        return (weight.data_ptr(), weight._version, log_threshold.data_ptr(), log_threshold._version, time_steps,
                weight.device, bits, group_size)

    def get(self, weight: torch.Tensor, log_threshold: torch.Tensor, threshold: torch.Tensor,
            time_steps: int, bits: int = 8, group_size: int | None = None) -> IntegerWeight:
        key = self._key(weight, log_threshold, time_steps, bits, group_size)
        if key != self.key:
            self.weight = quantize_spiking_linear(weight, threshold, time_steps, bits, group_size)
            self.key = key
        return self.weight

    def pin(self, weight: torch.Tensor, log_threshold: torch.Tensor, time_steps: int,
            integer: IntegerWeight) -> None:
        group_size = None if integer.group_size == weight.shape[1] else integer.group_size
        self.key = self._key(weight, log_threshold, time_steps, integer.bits, group_size)
        self.weight = integer

"""Integer weights for spike-consuming linears: the input's step size folded in, then quantised.

A spiking linear receives, per input channel c, an integer level n_c (a spike count, or the weighted
code's binary level) times the channel's step s_c = threshold_c / L. So

    y_o = sum_c W_oc (s_c n_c) = sum_c (W_oc s_c) n_c.

Folding the steps into the weights (W' = W diag(s)) and quantising W' symmetrically, one scale a_o per
output channel (or per group of ``group`` inputs), gives W' ~ a_o q_oc with integers q, and

    y_o = a_o sum_c q_oc n_c:

an integer product of spike levels and integer weights, then one floating-point scale per output channel
(per group: one per group, summed). ``fold_quantize`` returns the float weight W_eff = (a q) diag(1/s)
that the float path multiplies the decoded input (s n) by, which is the same product; ``integer_parts``
returns q and a for an integer kernel. Training keeps W as the float master and passes the rounding's
gradient straight through.
"""

from __future__ import annotations

import torch


def _scales(folded: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Per output channel (or per output channel and input group) scale, broadcastable to ``folded``."""
    limit = 2 ** (bits - 1) - 1
    if group is None:
        return folded.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / limit
    rows, columns = folded.shape
    if columns % group:
        raise ValueError(f"weight_group {group} does not divide the {columns} inputs")
    per_group = folded.detach().reshape(rows, columns // group, group).abs().amax(dim=2, keepdim=True)
    return (per_group.clamp_min(1e-30) / limit).expand(rows, columns // group, group).reshape(rows, columns)


def integer_parts(weight: torch.Tensor, step: torch.Tensor, bits: int,
                  group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): integer weights (int8 values, in int64) and their scales, with W diag(step) ~ scales * q."""
    folded = weight.detach() * step.detach().to(weight.dtype)
    scales = _scales(folded, bits, group)
    limit = 2 ** (bits - 1) - 1
    return (folded / scales).round().clamp(-limit, limit).to(torch.int64), scales


def fold_quantize(weight: torch.Tensor, step: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """W_eff = Q(W diag(step)) diag(1 / step), with the straight-through gradient of the rounding."""
    step = step.to(weight.dtype)
    folded = weight * step
    scales = _scales(folded, bits, group)
    limit = 2 ** (bits - 1) - 1
    quantized = (folded / scales).round().clamp(-limit, limit) * scales
    return (folded + (quantized - folded).detach()) / step


class IntegerWeights:
    """A linear's int8 weights (transposed, for ``torch._int_mm``) and per-output scales, rebuilt only when the
    float master weight or the input's thresholds change (their version counters)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.q_t: torch.Tensor | None = None  # (in, out) int8
        self.scales: torch.Tensor | None = None  # (out,) float32

    def get(self, weight: torch.Tensor, step_source: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (weight.data_ptr(), weight._version, step_source.data_ptr(), step_source._version, weight.device)
        if key != self.key:
            q, scales = integer_parts(weight, step, 8)
            self.q_t = q.to(torch.int8).t().contiguous()
            self.scales = scales[:, 0].to(torch.float32).contiguous()
            self.key = key
        return self.q_t, self.scales


def integer_linear(levels: torch.Tensor, q_t: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``levels`` (integer values, |level| <= 127) times int8 weights, accumulated in int32 by ``torch._int_mm``,
    then one float scale per output (and the bias): the spiking linear as integer hardware would run it."""
    shape = levels.shape
    flat = levels.reshape(-1, shape[-1]).to(torch.int8)
    out = torch._int_mm(flat, q_t).to(torch.float32) * scales
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*shape[:-1], q_t.shape[1])

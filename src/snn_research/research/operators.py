"""Research track: spike-friendly stand-ins for the operators a hybrid keeps analog (softmax, RMSNorm/LayerNorm).

Each operator has its analog reference beside it, and a bound on how far it may be from it, which
``tests/test_research_operators.py`` checks on random inputs. None of them is used by the pipeline stages;
``benchmarks/full_spike_trial.py`` swaps them into a teacher to measure what they cost in perplexity.

Power-of-two softmax (after Sorbet, ICML 2025). With z_i = (x_i - max_j x_j) * log2(e), the exponentials
become e_i = 2^round(z_i): a shift of 1 in an integer datapath, no exp unit. The row sum S = sum_i e_i is
normalised by a shift too: p_i = e_i * 2^-round(log2 S). Bound: each rounding is off by at most a factor
2^0.5, and three meet in p_i (the numerator, the sum through all numerators, the normaliser), so
p_i / softmax_i lies in [2^-1.5, 2^1.5], and a row sums to within [2^-0.5, 2^0.5] of 1.

Shift norm (after Sorbet's bit-shift norm). RMSNorm computes x / rms(x) * gain; the shift norm multiplies
by 2^-round(log2 rms(x)) instead, a power of two a leading-one detector finds without a square root or a
division. LayerNorm the same with the standard deviation, after the mean is subtracted. Bound: the output is
the analog output times a per-token factor in [2^-0.5, 2^0.5]. With ``fraction_bits`` b > 0 the exponent is
rounded to a multiple of 2^-b instead (the divisor is a power of two times one of 2^b mantissas from a table:
a shift and b shift-adds), and the factor lies in [2^-0.5/2^b, 2^0.5/2^b].

Fixed-scale norm (a norm folded into calibrated scales). The per-token rms is replaced by one constant per
norm module, its mean rms over calibration tokens, so the norm is a fixed per-channel scale that folds into
the next linear map. No bound holds per token: its error is what the calibration tokens do not predict,
and the trial measures it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

LOG2_E = 1.0 / math.log(2.0)


def power_of_two_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax with every exponential and the normaliser rounded to powers of two (computed in float32)."""
    x = x.float()
    z = (x - x.amax(dim=dim, keepdim=True)) * LOG2_E
    e = torch.exp2(torch.round(z))  # -inf (masked) -> 0
    total = e.sum(dim=dim, keepdim=True)
    return e * torch.exp2(-torch.round(torch.log2(total)))


SOFTMAXES = {"analog": lambda x, dim: torch.softmax(x.float(), dim=dim), "power_of_two": power_of_two_softmax}


def _expand_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, kv_heads, L, D) -> (B, heads, L, D): grouped-query attention's shared keys and values."""
    repeat = heads // states.shape[1]
    return states if repeat == 1 else states.repeat_interleave(repeat, dim=1)


def make_attention(softmax: str):
    """An attention function for transformers' ``AttentionInterface``: eager attention with ``softmax``."""
    normalise = SOFTMAXES[softmax]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(getattr(module, "config", None), "attn_logit_softcapping", None):
            raise ValueError("attention logit soft-capping is not supported by the research attention")
        key, value = _expand_heads(key, query.shape[1]), _expand_heads(value, query.shape[1])
        scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask[..., : key.shape[-2]]
        probs = normalise(scores, -1).to(query.dtype)
        output = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return output, probs

    return attention


def use_attention(model: nn.Module, softmax: str) -> str:
    """Switch ``model``'s attention to eager attention with ``softmax`` ("analog" or "power_of_two")."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if softmax not in SOFTMAXES:
        raise ValueError(f"softmax {softmax!r}: choose one of {sorted(SOFTMAXES)}")
    name = f"research_{softmax}"
    AttentionInterface.register(name, make_attention(softmax))
    AttentionMaskInterface.register(name, eager_mask)  # always materialised (sdpa's may be None: is_causal)
    model.set_attn_implementation(name)
    return name


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _spread(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The per-token quantity the analog norm divides by: rms (RMSNorm) or the standard deviation (LayerNorm)."""
    x = x.float()
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6
    if isinstance(module, nn.LayerNorm):
        return torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + eps)
    return torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def _bias(module: nn.Module) -> torch.Tensor | float:
    bias = getattr(module, "bias", None)
    return 0.0 if bias is None else bias.float()


class ShiftNorm(nn.Module):
    """The wrapped norm with its per-token divisor rounded to a power of two (to 2^-b of an octave)."""

    def __init__(self, norm: nn.Module, fraction_bits: int = 0) -> None:
        super().__init__()
        if not 0 <= fraction_bits <= 8:
            raise ValueError(f"fraction_bits must lie in 0..8 (got {fraction_bits})")
        self.norm = norm
        self.fraction_bits = fraction_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = _spread(self.norm, x)
        grid = 2.0 ** self.fraction_bits
        rounded = torch.round(torch.log2(spread) * grid) / grid
        factor = spread * torch.exp2(-rounded)  # analog divisor / rounded divisor
        bias = _bias(self.norm)
        return ((self.norm(x).float() - bias) * factor + bias).to(x.dtype)


class FixedScaleNorm(nn.Module):
    """The wrapped norm with its per-token divisor replaced by the calibrated constant ``scale``."""

    def __init__(self, norm: nn.Module, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"a fixed-scale norm needs a positive calibrated scale (got {scale})")
        self.norm = norm
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = _spread(self.norm, x) / self.scale
        bias = _bias(self.norm)
        return ((self.norm(x).float() - bias) * factor + bias).to(x.dtype)


def norm_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_norm(module) and name]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def observe_inputs(model: nn.Module, paths: list[str], batches: Iterable[torch.Tensor], observe) -> None:
    """Run ``model`` on ``batches`` (token ids), calling ``observe(path, module, input)`` at each module's input."""
    handles = [model.get_submodule(path).register_forward_hook(
        lambda module, args, output, path=path: observe(path, module, args[0].detach())) for path in paths]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def calibrate_norm_scales(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean per-token divisor of every norm over the calibration ``batches`` (token ids)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def observe(path, module, x):
        spread = _spread(module, x)
        sums[path] = sums.get(path, 0.0) + float(spread.sum())
        counts[path] = counts.get(path, 0) + spread.numel()

    observe_inputs(model, norm_paths(model), batches, observe)
    return {path: sums[path] / counts[path] for path in sums}


def replace_norms(model: nn.Module, kind: str, scales: dict[str, float] | None = None, fraction_bits: int = 0) -> int:
    """Wrap every RMSNorm/LayerNorm in ``ShiftNorm`` ("shift", to ``fraction_bits``) or ``FixedScaleNorm``
    ("fixed", needs ``scales``); returns how many were replaced."""
    paths = norm_paths(model)
    if kind == "fixed" and scales is None:
        raise ValueError("kind 'fixed' needs calibrated scales (calibrate_norm_scales)")
    for path in paths:
        norm = model.get_submodule(path)
        if kind == "shift":
            _set(model, path, ShiftNorm(norm, fraction_bits))
        elif kind == "fixed":
            _set(model, path, FixedScaleNorm(norm, scales[path]))
        else:
            raise ValueError(f"norm kind {kind!r}: choose 'shift' or 'fixed'")
    return len(paths)

"""Adapters between the analog and the spiking parts of a hybrid block.

``AnalogToSpikes`` turns a signed analog activation ``x`` (..., C) into a
ternary spike train (T, ..., C) with values in {-1, 0, +1}; ``SpikesToAnalog``
turns a train (or its per-neuron spike counts) back into an analog value:
the time average, rescaled by the threshold.

Two encoders:

- ``"if"``: deterministic signed integrate-and-fire with reset by subtraction.
  The analog value is injected as a constant current every step; a spike of
  sign +-1 fires when the membrane reaches +-threshold. ``membrane_init``
  chooses where the membrane starts:

  - ``"zero"``: at 0; the decoded value floors ``x`` to the grid ``theta / T``.
  - ``"half"``: at ``+theta/2``, the literal textbook choice; it rounds positive
    inputs but needs ``1.5 theta`` of negative charge for the first -1 spike.
  - ``"symmetric"`` (default): at ``sign(x) * theta / 2``; the decoded value
    rounds ``x`` to the nearest multiple of ``theta / T`` for either sign.

- ``"rate"``: stochastic signed rate coding: at each step a spike of sign
  ``sign(x)`` fires with probability ``min(|x| / theta, 1)``, drawn from a
  generator seeded by ``seed`` (and ``noise_step``, which a training loop
  advances), so a given input and seed always give the same train.

Both saturate at one spike per step (|decoded value| <= theta).

Spike counts. The input of an encoder is constant over the T steps, so the
count of the IF encoder has a closed form, ``n = sign(x) * min(floor(T |x| /
theta + c), T)`` with ``c`` = 0, 1/2 (and the ``"half"`` start's asymmetric
variant). ``spike_counts`` uses it; ``spike_train`` runs the T-step dynamics
and is the reference the closed form is tested against.

Gradient. The decoded rate ``theta * n / T`` is a uniform quantiser of ``x``
clipped at ``+-theta``, so both encoders back-propagate the quantiser's
straight-through gradient: slope 1 inside the clip range and 0 outside for
``x``, and for the threshold the step-size gradient of learned step-size
quantisation (``n / T - x / theta`` inside the range, ``sign(x)`` outside).
BPTT through T steps of a constant-input encoder with a surrogate would only
approximate this same slope, at T times the cost.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

EncoderKind = Literal["if", "rate"]
MembraneInit = Literal["zero", "half", "symmetric"]


def _check_time_steps(time_steps: int) -> int:
    if int(time_steps) != time_steps or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1 (got {time_steps!r})")
    return int(time_steps)


def if_spike_counts(x: torch.Tensor, threshold: torch.Tensor, time_steps: int, membrane_init: str) -> torch.Tensor:
    """Closed-form spike count of the signed IF encoder after ``time_steps`` steps."""
    # one new tensor, updated in place: on a (B, L, C) activation each pass is a trip through memory
    charge = x.abs().mul_(time_steps / threshold)  # total input in units of theta
    if membrane_init == "zero":
        magnitude = charge.floor_()
    elif membrane_init == "symmetric":
        magnitude = charge.add_(0.5).floor_()
    elif membrane_init == "half":
        # Positive inputs start half-way to their threshold, negative ones half further away:
        # a negative input below 1.5 theta in size misses the first step, and since at most
        # one spike fires per step it can never catch up (cap T - 1).
        negative = torch.floor(charge - 0.5).clamp_(min=0.0)
        negative = torch.where(x.abs() >= 1.5 * threshold, negative, negative.clamp(max=time_steps - 1.0))
        magnitude = torch.where(x >= 0, torch.floor(charge + 0.5), negative)
    else:
        raise ValueError(f"membrane_init must be 'zero', 'half' or 'symmetric' (got {membrane_init!r})")
    return magnitude.clamp_(max=float(time_steps)).copysign_(x)


def if_spike_train(x: torch.Tensor, threshold: torch.Tensor, time_steps: int, membrane_init: str) -> torch.Tensor:
    """Step-by-step simulation of the signed IF encoder; returns (T, ..., C) in {-1, 0, 1}."""
    if membrane_init == "zero":
        membrane = torch.zeros_like(x)
    elif membrane_init == "half":
        membrane = (threshold / 2).expand_as(x).clone()
    elif membrane_init == "symmetric":
        membrane = torch.sign(x) * threshold / 2
    else:
        raise ValueError(f"membrane_init must be 'zero', 'half' or 'symmetric' (got {membrane_init!r})")
    spikes = torch.empty((time_steps, *x.shape), dtype=x.dtype, device=x.device)
    for t in range(time_steps):
        membrane = membrane + x
        s = (membrane >= threshold).to(x.dtype) - (membrane <= -threshold).to(x.dtype)
        membrane = membrane - s * threshold
        spikes[t] = s
    return spikes


def rate_spike_train(x: torch.Tensor, threshold: torch.Tensor, time_steps: int, generator: torch.Generator) -> torch.Tensor:
    probability = (x.abs() / threshold).clamp_(max=1.0)
    draws = torch.rand((time_steps, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    return torch.sign(x) * (draws < probability).to(x.dtype)


class _StraightThroughSpikes(torch.autograd.Function):
    """Attach the clipped straight-through gradient to precomputed spikes.

    ``spikes`` is either the counts (..., C) or the train (T, ..., C); for a
    train the gradient of every step is summed, each step carrying 1/T of the
    count's slope.
    """

    @staticmethod
    def forward(ctx, x, threshold, spikes, time_steps):  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.time_steps = time_steps
        ctx.is_train = spikes.dim() == x.dim() + 1
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        if ctx.is_train:
            grad_counts, slope = grad_spikes.sum(0), 1.0
        else:
            grad_counts, slope = grad_spikes, float(ctx.time_steps)
        # counts ~ T * x / theta inside the clip range, T * sign(x) outside, so
        # dcounts/dx = T / theta * inside and dcounts/dtheta = -T x / theta^2 * inside = -dcounts/dx * x / theta
        inside = x.abs().le_(threshold)  # 1.0 inside the clip range, 0.0 outside (and for NaN)
        grad_inside = (grad_counts * (slope / threshold)).mul_(inside)
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            channels = x.shape[-1]
            flat = (grad_inside.reshape(-1, channels) * x.reshape(-1, channels)).sum(0).div_(threshold).neg_()
            grad_threshold = flat if threshold.numel() == flat.numel() else flat.sum().reshape(threshold.shape)
        grad_x = grad_inside if ctx.needs_input_grad[0] else None
        return grad_x, grad_threshold, None, None


class AnalogToSpikes(nn.Module):
    """Signed encoder from an analog activation (..., C) to T steps of ternary spikes.

    ``forward`` returns the per-neuron spike counts (..., C), which is all a
    linear map followed by a time average needs; ``spike_train`` returns the
    full (T, ..., C) train.
    """

    def __init__(
        self,
        channels: int,
        time_steps: int,
        kind: EncoderKind = "if",
        threshold: float | torch.Tensor = 1.0,
        per_channel: bool = True,
        membrane_init: MembraneInit = "symmetric",
        learnable_threshold: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("if", "rate"):
            raise ValueError(f"encoder kind must be 'if' or 'rate' (got {kind!r})")
        if membrane_init not in ("zero", "half", "symmetric"):
            raise ValueError(f"membrane_init must be 'zero', 'half' or 'symmetric' (got {membrane_init!r})")
        self.channels = channels
        self.time_steps = _check_time_steps(time_steps)
        self.kind = kind
        self.membrane_init = membrane_init
        self.seed = int(seed)
        self.noise_step = 0
        self.learnable_threshold = learnable_threshold
        size = channels if per_channel else 1
        threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if (threshold <= 0).any() or not torch.isfinite(threshold).all():
            raise ValueError("encoder thresholds must be finite and positive")
        self.log_threshold = nn.Parameter(threshold.log().expand(size).clone(), requires_grad=learnable_threshold)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def set_time_steps(self, time_steps: int) -> None:
        self.time_steps = _check_time_steps(time_steps)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + self.noise_step)
        return generator

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.channels:
            raise ValueError(f"expected {self.channels} channels in the last dimension (got shape {tuple(x.shape)})")

    def _train(self, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self.kind == "if":
            return if_spike_train(x, threshold, self.time_steps, self.membrane_init)
        return rate_spike_train(x, threshold, self.time_steps, self._generator(x.device))

    def spike_train(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (T, ..., C) spikes in {-1, 0, 1}, with a straight-through gradient."""
        self._check(x)
        threshold = self.threshold.to(x.dtype)
        with torch.no_grad():
            spikes = self._train(x, threshold)
        return _StraightThroughSpikes.apply(x, threshold, spikes, self.time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> spike counts (..., C) in [-T, T], with a straight-through gradient."""
        self._check(x)
        threshold = self.threshold.to(x.dtype)
        with torch.no_grad():
            if self.kind == "if":
                counts = if_spike_counts(x, threshold, self.time_steps, self.membrane_init)
            else:
                counts = self._train(x, threshold).sum(0)
        return _StraightThroughSpikes.apply(x, threshold, counts, self.time_steps)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, time_steps={self.time_steps}, kind={self.kind}, membrane_init={self.membrane_init}"


class SpikesToAnalog(nn.Module):
    """Time average of a spike train (or spike counts / T), rescaled by the threshold.

    A linear map commutes with this decoder: averaging ``W (theta * s_t)`` over
    the T steps equals ``W`` applied once to ``theta * n / T``.
    """

    def forward(self, counts: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
        return counts * (threshold.to(counts.dtype) / time_steps)

    def from_train(self, spikes: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """(T, ..., C) -> (..., C)."""
        return spikes.mean(0) * threshold.to(spikes.dtype)

"""Adapters between the analog and the spiking parts of a hybrid block.

``AnalogToSpikes`` turns a signed analog activation ``x`` (..., C) into a
ternary spike train (T, ..., C) with values in {-1, 0, +1}; ``SpikesToAnalog``
turns a train (or its per-neuron level) back into an analog value: the sum of
the steps' spikes, each times its step weight (1 for every code but
``weighted``), times threshold / L.

Four encoders:

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
  ``sign(x)`` fires with probability ``min(|x| / theta, 1)``. Every call
  (``forward`` or ``spike_train``) is a new draw, from a generator seeded by
  ``noise_seed(seed, noise_step, draw)``: ``draw`` counts the calls since
  ``noise_step`` was last set, which the training loops do before every step
  and which ``reset_noise`` does. So each decoding step of ``generate`` and
  each batch of an evaluation sees its own noise, and a given sequence of
  calls from a freshly built (or reset) encoder gives the same trains again;
  a training step draws the same noise however the run was resumed.

- ``"weighted"``: signed binary-weighted (phase) coding. The spike at step t
  (t = 1..T) carries the weight ``2^(T - t)`` of the smallest step, so the T
  steps of one neuron spell the magnitude in binary, most significant step
  first: ``L = 2^T - 1`` levels per sign instead of T. The neuron is an IF
  neuron whose threshold halves every step: its membrane, in units of the
  smallest step ``theta / L``, starts at ``|x| L / theta + 1/2`` (the half
  rounds, as the symmetric IF start does), fires when it reaches the step's
  weight and subtracts it. On hardware the step weight is not a weight per
  synapse: the receiving neuron shifts its accumulator by one bit every step
  (Horner's scheme), so a spike still costs one accumulate per synapse.

  Its ``digits`` option chooses how the T steps spell a level. ``"binary"``
  (default): the set bits of ``|n|``, every spike of the input's sign.
  ``"signed"``: digits in {-1, 0, +1} at the same step weights, for the same
  level ``n``, so the decoded value and everything downstream of it are
  unchanged, bit for bit. The neuron fires +1 when its membrane reaches
  ``M_k + 1`` and -1 when it falls below ``-M_k`` (``M_k = floor(2^(k+1) / 3)``,
  the largest value the k steps after it can spell without two adjacent
  nonzero digits), subtracting the spike times the step weight 2^k. That is
  the non-adjacent form (NAF) of the level when it fits in T digits
  (``|n| <= M_T``, about two thirds of the range); above that the top digits
  are adjacent, since T digits reach 2^T - 1 only as all ones. NAF has the
  fewest nonzero digits of any signed-digit form; its density tends to 1/3 of
  the digits for long numbers, against 1/2 for binary (over the 5-step range:
  2.34 against 2.5 spikes per level on average, fewer where levels are small).
  A -1 spike is a subtraction at the receiving neuron, which costs what an
  addition costs.

- ``"lif"``: a signed leaky integrate-and-fire population (``neurons.py``:
  the compiled kernel, surrogate gradients) driven by ``x`` as a constant
  current for T steps. The leak makes its count depend on the order of the
  steps, so it has no closed form: it is simulated, and trained by surrogate
  back-propagation through time instead of the straight-through gradient.

All saturate: the decoded value is at most theta in size.

Levels and spike counts. ``forward`` returns the signed level ``n`` in
[-L, L] (L = T for ``if``, ``rate`` and ``lif``; ``2^T - 1`` for ``weighted``);
the decoded value is ``theta * n / L``. For the unweighted encoders the level
is the spike count; for ``weighted`` the spike count is the number of set bits
of ``|n|`` (``spike_count``). The input of an encoder is constant over the T
steps, so the count of the IF encoder has a closed form, ``n = sign(x) * min(floor(T |x| /
theta + c), T)`` with ``c`` = 0, 1/2 (and the ``"half"`` start's asymmetric
variant), and the weighted encoder's level is ``sign(x) * min(floor(L |x| /
theta + 1/2), L)``. ``forward`` uses the closed forms; ``spike_train`` runs
the T-step dynamics and is the reference they are tested against.

Gradient. The decoded value ``theta * n / L`` is a uniform quantiser of ``x``
clipped at ``+-theta``, so the ``if``, ``rate`` and ``weighted`` encoders back-propagate the quantiser's
straight-through gradient: slope 1 inside the clip range and 0 outside for
``x``, and for the threshold the step-size gradient of learned step-size
quantisation (``n / L - x / theta`` inside the range, ``sign(x)`` outside).
The ``lif`` encoder's gradient is its population's surrogate instead.
BPTT through T steps of a constant-input encoder with a surrogate would only
approximate this same slope, at T times the cost.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

import torch
from torch import nn

EncoderKind = Literal["if", "rate", "weighted", "lif"]
MembraneInit = Literal["zero", "half", "symmetric"]
Digits = Literal["binary", "signed"]
DIGITS = ("binary", "signed")
ENCODER_KINDS = ("if", "rate", "weighted", "lif")
# the membrane, up to 2^T - 1/2, must keep its half-step offset exact in float32 (24-bit significand)
MAX_WEIGHTED_TIME_STEPS = 16


def encoder_levels(kind: str, time_steps: int) -> int:
    """L: the largest spike level of one sign (decoded value = theta * level / L)."""
    return 2**time_steps - 1 if kind == "weighted" else time_steps


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


def _float32_charge(x: torch.Tensor, threshold: torch.Tensor, levels: float) -> torch.Tensor:
    """|x| L / theta + 1/2 in float32 at least: bf16 / fp16 cannot hold 2^T levels (fp16 overflows past 2^15)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype).abs().mul_(levels / threshold.to(dtype)).add_(0.5)


def weighted_levels(x: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Closed-form signed level of the binary-weighted encoder, in [-(2^T - 1), 2^T - 1] (in x's dtype)."""
    levels = float(encoder_levels("weighted", time_steps))
    charge = _float32_charge(x, threshold, levels)  # membrane start, in units of the smallest step
    return charge.floor_().clamp_(max=levels).copysign_(x.to(charge.dtype)).to(x.dtype)


def weighted_spike_train(x: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Step-by-step simulation of the binary-weighted encoder; (T, ..., C) in {-1, 0, 1}.

    The membrane starts with the whole charge (same expression as ``weighted_levels``)
    and the step-t threshold is 2^(T - t) smallest steps. Subtracting a power of two
    from a membrane in [2^k, 2^(k+1)) is exact in floating point (Sterbenz), so the
    simulation is exact, not just close.
    """
    levels = float(encoder_levels("weighted", time_steps))
    membrane = _float32_charge(x, threshold, levels)
    sign = torch.sign(x).to(membrane.dtype)
    spikes = torch.empty((time_steps, *x.shape), dtype=x.dtype, device=x.device)
    for t in range(time_steps):
        weight = float(2 ** (time_steps - 1 - t))
        fired = (membrane >= weight).to(membrane.dtype)
        membrane = membrane - fired * weight
        spikes[t] = fired * sign
    return spikes


def naf_bound(steps: int) -> int:
    """M_k = floor(2^(k+1) / 3): the largest value k signed digits spell with no two adjacent nonzero digits."""
    return 2 ** (steps + 1) // 3


def signed_digit_spike_train(x: torch.Tensor, threshold: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Step-by-step simulation of the weighted encoder with signed digits; (T, ..., C) in {-1, 0, 1}.

    The membrane starts with the binary code's charge (``|x| L / theta + 1/2``, in units of the smallest
    step, the sign kept aside). At the step of weight 2^k it fires +1 when the membrane reaches M_k + 1,
    -1 when it falls below -M_k, and subtracts the spike times 2^k. Both thresholds are integers, so each
    decision is the one the integer level ``floor(charge)`` gives: the steps spell exactly the level
    ``weighted_levels`` computes. Every subtraction before the last step is exact in floating point
    (Sterbenz: a spike fires only when the membrane is within a factor of two of 2^k).
    """
    levels = float(encoder_levels("weighted", time_steps))
    membrane = _float32_charge(x, threshold, levels)
    sign = torch.sign(x).to(membrane.dtype)
    spikes = torch.empty((time_steps, *x.shape), dtype=x.dtype, device=x.device)
    for t in range(time_steps):
        k = time_steps - 1 - t
        bound = float(naf_bound(k))
        fired = (membrane >= bound + 1).to(membrane.dtype) - (membrane < -bound).to(membrane.dtype)
        membrane = membrane - fired * float(2**k)
        spikes[t] = fired * sign
    return spikes


def step_weights(kind: str, time_steps: int) -> torch.Tensor:
    """(T,) weight of each step's spike in units of the smallest level (1 for unweighted codes)."""
    if kind == "weighted":
        return 2.0 ** torch.arange(time_steps - 1, -1, -1, dtype=torch.float64)
    return torch.ones(time_steps, dtype=torch.float64)


@functools.cache
def _bit_counts(time_steps: int, device: torch.device) -> torch.Tensor:
    """Set bits of every integer below 2^T (T <= MAX_WEIGHTED_TIME_STEPS: at most 65,536 entries)."""
    value = torch.arange(2**time_steps, dtype=torch.int64)
    count = torch.zeros_like(value)
    for bit in range(time_steps):
        count += (value >> bit) & 1
    return count.to(device)


@functools.cache
def _signed_digit_counts(time_steps: int, device: torch.device) -> torch.Tensor:
    """Nonzero signed digits of every integer below 2^T: the step simulation run on each level (float64, so
    ``level / L`` decodes back to the level exactly)."""
    levels = float(encoder_levels("weighted", time_steps))
    values = torch.arange(2**time_steps, dtype=torch.float64) / levels
    train = signed_digit_spike_train(values, torch.ones((), dtype=torch.float64), time_steps)
    return train.abs().sum(0).to(torch.int64).to(device)


def signed_digit_count(levels: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Nonzero signed digits of ``|levels|`` (integers below 2^T): spikes per neuron of the signed-digit code."""
    value = levels.detach().abs().to(torch.int64)
    return _signed_digit_counts(time_steps, value.device)[value].to(levels.dtype)


def popcount(levels: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Number of set bits of ``|levels|`` (integers below 2^T): spikes per neuron of the weighted code.

    One table lookup per level (a gather), not T shift-and-mask passes over the tensor."""
    value = levels.detach().abs().to(torch.int64)
    return _bit_counts(time_steps, value.device)[value].to(levels.dtype)


def noise_seed(seed: int, step: int, draw: int) -> int:
    """The generator seed of a rate encoder's draw: a 64-bit hash of (site seed, training step, draw since the
    step was set), so that no two draws of a run share a stream."""
    digest = hashlib.blake2b(f"{seed}:{step}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rate_spike_train(x: torch.Tensor, threshold: torch.Tensor, time_steps: int, generator: torch.Generator) -> torch.Tensor:
    probability = (x.abs() / threshold).clamp_(max=1.0)
    draws = torch.rand((time_steps, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    return torch.sign(x) * (draws < probability).to(x.dtype)


class _StraightThroughSpikes(torch.autograd.Function):
    """Attach the clipped straight-through gradient to precomputed spikes.

    ``spikes`` is either the levels (..., C) or the train (T, ..., C); for a
    train the gradient of every step is summed, each step carrying 1/theta.
    """

    @staticmethod
    def forward(ctx, x, threshold, spikes, levels):  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.levels = levels
        ctx.is_train = spikes.dim() == x.dim() + 1
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        if ctx.is_train:
            grad_counts, slope = grad_spikes.sum(0), 1.0
        else:
            grad_counts, slope = grad_spikes, float(ctx.levels)
        # level n ~ L * x / theta inside the clip range, L * sign(x) outside, so
        # dn/dx = L / theta * inside and dn/dtheta = -L x / theta^2 * inside = -dn/dx * x / theta.
        # A train's step t enters the level with weight w_t (sum L): a slope 1 / theta per step
        # gives the same dn/dx for either code.
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

    ``forward`` returns the per-neuron signed level (..., C) in [-L, L], which
    is all a linear map followed by the decoder needs; ``spike_train`` returns
    the full (T, ..., C) train; ``spike_count`` turns levels into spikes.
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
        neuron_options: dict | None = None,
        digits: Digits = "binary",
    ) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind must be one of {list(ENCODER_KINDS)} (got {kind!r})")
        if digits not in DIGITS:
            raise ValueError(f"digits must be one of {list(DIGITS)} (got {digits!r})")
        if digits != "binary" and kind != "weighted":
            raise ValueError(f"digits {digits!r} applies to the 'weighted' encoder only (kind {kind!r})")
        self.digits = digits
        if membrane_init not in ("zero", "half", "symmetric"):
            raise ValueError(f"membrane_init must be 'zero', 'half' or 'symmetric' (got {membrane_init!r})")
        self.channels = channels
        self.kind = kind
        self.time_steps = self._checked_time_steps(time_steps)
        self.membrane_init = membrane_init
        self.seed = int(seed)
        self.noise_step = 0  # also sets noise_draws to 0
        self.learnable_threshold = learnable_threshold
        size = channels if per_channel else 1
        threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if (threshold <= 0).any() or not torch.isfinite(threshold).all():
            raise ValueError("encoder thresholds must be finite and positive")
        self.log_threshold = nn.Parameter(threshold.log().expand(size).clone(), requires_grad=learnable_threshold)
        self.neurons = None
        if kind == "lif":
            from snn_research.hybrid.neurons import MultiStepNeuron

            # the population owns the threshold and leak; this module's log_threshold is unused then
            self.neurons = MultiStepNeuron(
                channels, kind="lif", threshold=threshold.expand(size).clone(), signed=True,
                per_channel=per_channel, learnable_threshold=learnable_threshold, **(neuron_options or {}),
            )
            del self.log_threshold
        elif neuron_options:
            raise ValueError(f"neuron options {sorted(neuron_options)} apply to the 'lif' encoder only (kind {kind!r})")

    def _checked_time_steps(self, time_steps: int) -> int:
        time_steps = _check_time_steps(time_steps)
        if self.kind == "weighted" and time_steps > MAX_WEIGHTED_TIME_STEPS:
            raise ValueError(
                f"the weighted encoder supports time_steps <= {MAX_WEIGHTED_TIME_STEPS} "
                f"(2^T - 1 levels; got {time_steps})"
            )
        return time_steps

    @property
    def threshold(self) -> torch.Tensor:
        if self.neurons is not None:
            return self.neurons.threshold
        return self.log_threshold.exp()

    @property
    def levels(self) -> int:
        """L: the decoded value is ``threshold * level / L``."""
        return encoder_levels(self.kind, self.time_steps)

    def set_time_steps(self, time_steps: int) -> None:
        self.time_steps = self._checked_time_steps(time_steps)

    def step_weights(self) -> torch.Tensor:
        return step_weights(self.kind, self.time_steps)

    @property
    def noise_step(self) -> int:
        """The training step the rate noise is drawn for. Setting it (the training loops do, before every
        step) restarts the draws at the step's first."""
        return self._noise_step

    @noise_step.setter
    def noise_step(self, step: int) -> None:
        self._noise_step = int(step)
        self.noise_draws = 0  # calls that drew rate noise since the step was set

    def reset_noise(self) -> None:
        """Restart the current step's draws: the next call draws what the step's first call drew."""
        self.noise_step = self.noise_step

    def _generator(self, device: torch.device) -> torch.Generator:
        """A generator for the next draw; every call takes a new one."""
        generator = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed, self.noise_step, self.noise_draws))
        self.noise_draws += 1
        return generator

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.channels:
            raise ValueError(f"expected {self.channels} channels in the last dimension (got shape {tuple(x.shape)})")

    def _train(self, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self.kind == "if":
            return if_spike_train(x, threshold, self.time_steps, self.membrane_init)
        if self.kind == "weighted":
            if self.digits == "signed":
                return signed_digit_spike_train(x, threshold, self.time_steps)
            return weighted_spike_train(x, threshold, self.time_steps)
        return rate_spike_train(x, threshold, self.time_steps, self._generator(x.device))

    def _lif_train(self, x: torch.Tensor) -> torch.Tensor:
        # a constant current for T steps; the population's surrogate carries the gradient
        return self.neurons(x.unsqueeze(0).expand(self.time_steps, *x.shape))

    def spike_train(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (T, ..., C) spikes in {-1, 0, 1}, with the encoder's gradient."""
        self._check(x)
        if self.neurons is not None:
            return self._lif_train(x)
        threshold = self.threshold.to(x.dtype)
        with torch.no_grad():
            spikes = self._train(x, threshold)
        return _StraightThroughSpikes.apply(x, threshold, spikes, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> signed levels (..., C) in [-L, L], with the encoder's gradient."""
        self._check(x)
        if self.neurons is not None:
            return self._lif_train(x).sum(0)
        threshold = self.threshold.to(x.dtype)
        with torch.no_grad():
            if self.kind == "if":
                levels = if_spike_counts(x, threshold, self.time_steps, self.membrane_init)
            elif self.kind == "weighted":
                levels = weighted_levels(x, threshold, self.time_steps)
            else:
                levels = self._train(x, threshold).sum(0)
        return _StraightThroughSpikes.apply(x, threshold, levels, self.levels)

    def spike_count(self, levels: torch.Tensor) -> torch.Tensor:
        """Spikes per neuron behind ``levels`` (signed like them), keeping their gradient.

        Unweighted codes: the level is the count. Weighted: the set bits of ``|level|``
        (binary digits) or its nonzero signed digits; its gradient is the level's scaled
        by count / level, so that an energy budget still pushes the level (and the
        threshold behind it) the right way.
        """
        if self.kind != "weighted":
            return levels
        count = signed_digit_count if self.digits == "signed" else popcount
        bits = count(levels, self.time_steps)
        safe = torch.where(levels == 0, torch.ones_like(levels), levels.detach())
        return (bits * torch.sign(levels.detach())) * (levels / safe)

    def extra_repr(self) -> str:
        digits = f", digits={self.digits}" if self.kind == "weighted" else ""
        return f"channels={self.channels}, time_steps={self.time_steps}, kind={self.kind}, membrane_init={self.membrane_init}{digits}"


class SpikesToAnalog(nn.Module):
    """Weighted time sum of a spike train (or the level), rescaled: ``theta * level / L``.

    A linear map commutes with this decoder: summing ``w_t / L * W (theta * s_t)``
    over the T steps equals ``W`` applied once to ``theta * n / L``.
    """

    def forward(self, levels: torch.Tensor, threshold: torch.Tensor, max_level: int) -> torch.Tensor:
        return levels * (threshold.to(levels.dtype) / max_level)

    def from_train(self, spikes: torch.Tensor, threshold: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(T, ..., C) -> (..., C); ``weights`` (T,) are the steps' weights (default: all 1, a time average)."""
        if weights is None:
            return spikes.mean(0) * threshold.to(spikes.dtype)
        weights = weights.to(spikes.dtype).to(spikes.device)  # cast first: MPS has no float64
        level = torch.tensordot(weights, spikes, dims=1)
        return level * (threshold.to(spikes.dtype) / weights.sum())

"""Multi-step integrate-and-fire neurons, time axis first.

Input currents have shape ``(T, ..., C)``: T time steps, any leading batch
dimensions, C channels (thresholds and leaks are per channel or one per layer).
Each forward call starts from a resting membrane and keeps nothing afterwards,
so the same input always gives the same spikes.

Dynamics for one channel, with ``u`` the membrane before the spike decision::

    u_t = carry_{t-1} + x_t                         (carry_0 = 0)
    s_t = H(u_t - theta)          (unsigned: s in {0, 1})
    s_t = H(u_t - theta) - H(-u_t - theta)   (signed / ternary: s in {-1, 0, 1})
    carry_t = beta * (u_t - theta * s_t)   reset by subtraction (the default)
    carry_t = beta * u_t - theta * s_t     reset by subtraction, ``leak_reset=False``
    carry_t = beta * u_t * (1 - |s_t|)     reset to zero

IF is the case ``beta = 1``. ``leak_reset=False`` subtracts the threshold after
the leak, which is snnTorch's ``Leaky`` (reset_delay=True); the default lets the
reset leak with the membrane, which is SpikingJelly's LIF with
``decay_input=False``. The two agree for IF.

The backward pass is back-propagation through time with a surrogate derivative
of the step (``surrogate.py``) on the membrane in threshold units, and a
detached reset (the spike that triggers a reset carries no gradient through
it), as snnTorch does by default (SpikingJelly with ``detach_reset=True``). The
whole loop lives in one autograd function that keeps one (T, ..., C) tensor
and does the backward recursion by hand instead of through a graph of 5 x T
small nodes.

Two implementations of that function, with the same semantics:

- the compiled CPU kernel (``neuron_kernel.py``), used for float32/float64 CPU
  tensors: one pass over the elements per direction, T steps inside, membranes
  recomputed in the backward instead of stored. On a (8, 4096, 2048) float32
  LIF, forward + backward, it measured 8-10x faster than the faster of
  snnTorch's ``Leaky`` and SpikingJelly's ``LIFNode`` on 2 cores
  (``python -m benchmarks.run --only neuron``);
- the eager loop below, used everywhere else (GPU, bf16, no compiler, or
  ``use_kernel = False``) and the reference the kernel is tested against: its
  spikes are bit-identical, its gradients equal to rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from snn_research.hybrid import neuron_kernel
from snn_research.hybrid.surrogate import SurrogateName, surrogate_derivative

NeuronKind = Literal["if", "lif"]
ResetMode = Literal["subtract", "zero"]


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-element gradient down to a per-channel (C,) or per-layer (1,) one."""
    channels = like.shape[-1]
    flat = grad.reshape(-1, grad.shape[-1]).sum(0)
    return flat if channels == grad.shape[-1] else flat.sum().reshape(like.shape)


def fire(membrane: torch.Tensor, threshold: torch.Tensor, signed: bool) -> torch.Tensor:
    spikes = (membrane >= threshold).to(membrane.dtype)
    if signed:
        spikes = spikes - (membrane <= -threshold).to(membrane.dtype)
    return spikes


def _eager_forward(currents, threshold, beta, signed, reset_to_zero, leak_reset):
    """The reference loop: (membranes, spikes), each (T, ..., C)."""
    membranes = torch.empty_like(currents)
    spikes = torch.empty_like(currents)
    carry = torch.zeros_like(currents[0])
    for t in range(currents.shape[0]):
        u = torch.add(carry, currents[t], out=membranes[t])
        s = spikes[t]
        s.copy_(u >= threshold)
        if signed:
            s.sub_((u <= -threshold).to(s.dtype))
        if reset_to_zero:
            carry = u * (1.0 - s.abs())
            carry.mul_(beta)
        elif leak_reset:
            carry = torch.addcmul(u, s, threshold, value=-1.0).mul_(beta)
        else:
            carry = torch.addcmul(u * beta, s, threshold, value=-1.0)
    return membranes, spikes


def _eager_backward(grad_spikes, membranes, threshold, beta, options, need_threshold, need_beta):
    signed, reset_to_zero, leak_reset, surrogate, sharpness = options
    derivative = surrogate_derivative(surrogate)
    grad_currents = torch.empty_like(membranes)
    grad_threshold = torch.zeros_like(threshold) if need_threshold else None
    grad_beta = torch.zeros_like(beta) if need_beta else None
    grad_carry = None  # dL/d carry_t, flowing back from u_{t+1}
    inv_threshold = threshold.reciprocal()
    for t in reversed(range(membranes.shape[0])):
        u = membranes[t]
        s = fire(u, threshold, signed)
        scaled = u * inv_threshold
        ds_du = derivative(scaled - 1.0, sharpness)
        if signed:
            ds_du = ds_du + derivative(-scaled - 1.0, sharpness)
        ds_du = ds_du * inv_threshold
        grad_u = grad_spikes[t] * ds_du
        if need_threshold:
            # ds/dtheta = -ds/du * u / theta for both halves of the ternary step
            grad_threshold += _reduce_to(-grad_u * scaled, threshold)
        if grad_carry is not None:
            if reset_to_zero:
                kept = 1.0 - s.abs()
                grad_u = grad_u + grad_carry * beta * kept
                if need_beta:
                    grad_beta += _reduce_to(grad_carry * u * kept, beta)
            else:
                grad_u = grad_u + grad_carry * beta
                if need_threshold:
                    reset_grad = -grad_carry * s
                    if leak_reset:
                        reset_grad = reset_grad * beta
                    grad_threshold += _reduce_to(reset_grad, threshold)
                if need_beta:
                    leaked = u - threshold * s if leak_reset else u
                    grad_beta += _reduce_to(grad_carry * leaked, beta)
        grad_currents[t] = grad_u
        grad_carry = grad_u
    return grad_currents, grad_threshold, grad_beta


def _per_channel(value: torch.Tensor, channels: int) -> torch.Tensor:
    return value.expand(channels).contiguous()


class _MultiStepNeuronFunction(torch.autograd.Function):
    """Forward and BPTT in one node: the compiled kernel where it applies, else the eager loop.

    The kernel path saves the currents and recomputes the membranes in the
    backward; the eager path saves the membranes. Either way one (T, ..., C)
    tensor is kept, and spikes are recomputed from membranes, never stored.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        currents: torch.Tensor,  # (T, ..., C)
        threshold: torch.Tensor,  # (C,) or (1,)
        beta: torch.Tensor,  # (C,) or (1,)
        signed: bool,
        reset_to_zero: bool,
        leak_reset: bool,
        surrogate: str,
        sharpness: float,
        use_kernel: bool,
    ) -> torch.Tensor:
        ctx.options = (signed, reset_to_zero, leak_reset, surrogate, sharpness)
        library = (neuron_kernel.load() if use_kernel and neuron_kernel.supports(currents, threshold, beta)
                   else None)
        ctx.compiled = library is not None
        if library is not None:
            currents = currents.contiguous()
            channels = currents.shape[-1]
            spikes = neuron_kernel.forward(library, currents, _per_channel(threshold, channels),
                                           _per_channel(beta, channels), signed,
                                           neuron_kernel.reset_kind(reset_to_zero, leak_reset))
            ctx.save_for_backward(currents, threshold, beta)
            return spikes
        membranes, spikes = _eager_forward(currents, threshold, beta, signed, reset_to_zero, leak_reset)
        ctx.save_for_backward(membranes, threshold, beta)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        saved, threshold, beta = ctx.saved_tensors
        signed, reset_to_zero, leak_reset, surrogate, sharpness = ctx.options
        need_threshold, need_beta = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        library = neuron_kernel.load() if ctx.compiled else None
        if library is None or torch.is_grad_enabled():  # double backward needs the differentiable eager ops
            membranes = saved
            if ctx.compiled:
                with torch.no_grad():
                    membranes, _ = _eager_forward(saved, threshold, beta, signed, reset_to_zero, leak_reset)
            grads = _eager_backward(grad_spikes, membranes, threshold, beta, ctx.options, need_threshold, need_beta)
            return (*grads, None, None, None, None, None, None)
        channels = saved.shape[-1]
        grad_currents, grad_threshold, grad_beta = neuron_kernel.backward(
            library, saved, grad_spikes.contiguous(), _per_channel(threshold, channels), _per_channel(beta, channels),
            signed, neuron_kernel.reset_kind(reset_to_zero, leak_reset), surrogate, sharpness,
            need_threshold, need_beta,
        )
        if grad_threshold is not None:
            grad_threshold = _reduce_to(grad_threshold.unsqueeze(0), threshold).to(threshold.dtype)
        if grad_beta is not None:
            grad_beta = _reduce_to(grad_beta.unsqueeze(0), beta).to(beta.dtype)
        return grad_currents, grad_threshold, grad_beta, None, None, None, None, None, None


class MultiStepNeuron(nn.Module):
    """IF or LIF neurons over T steps; input and output shaped ``(T, ..., C)``.

    Thresholds are stored as their logarithm so that a learnable threshold moves
    by relative steps whatever its scale (calibrated thresholds of one layer span
    several orders of magnitude) and can never cross zero.
    """

    def __init__(
        self,
        channels: int,
        kind: NeuronKind = "lif",
        threshold: float | torch.Tensor = 1.0,
        beta: float = 0.9,
        reset: ResetMode = "subtract",
        signed: bool = False,
        surrogate: SurrogateName = "atan",
        sharpness: float = 2.0,
        per_channel: bool = True,
        learnable_threshold: bool = False,
        learnable_leak: bool = False,
        leak_reset: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("if", "lif"):
            raise ValueError(f"neuron kind must be 'if' or 'lif' (got {kind!r})")
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset must be 'subtract' or 'zero' (got {reset!r})")
        if kind == "if" and learnable_leak:
            raise ValueError("an IF neuron has no leak to learn (got kind='if', learnable_leak=True)")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1] (got {beta})")
        surrogate_derivative(surrogate)  # validates the name
        if sharpness <= 0:
            raise ValueError(f"sharpness must be positive (got {sharpness})")
        self.channels = channels
        self.kind = kind
        self.reset = reset
        self.signed = signed
        self.surrogate = surrogate
        self.sharpness = float(sharpness)
        self.leak_reset = leak_reset
        self.learnable_threshold = learnable_threshold
        self.learnable_leak = learnable_leak
        self.use_kernel = True  # False forces the eager loop (the reference the kernel is tested against)
        size = channels if per_channel else 1
        log_threshold = torch.log(torch.as_tensor(threshold, dtype=torch.float32)).expand(size).clone()
        self.log_threshold = nn.Parameter(log_threshold, requires_grad=learnable_threshold)
        leak = torch.full((size,), 1.0 if kind == "if" else float(beta))
        self.beta = nn.Parameter(leak, requires_grad=learnable_leak)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        if currents.shape[-1] != self.channels:
            raise ValueError(
                f"expected {self.channels} channels in the last dimension (got shape {tuple(currents.shape)})"
            )
        threshold = self.threshold.to(currents.dtype)
        beta = self.beta.clamp(0.0, 1.0).to(currents.dtype)
        return _MultiStepNeuronFunction.apply(
            currents,
            threshold,
            beta,
            self.signed,
            self.reset == "zero",
            self.leak_reset,
            self.surrogate,
            self.sharpness,
            self.use_kernel,
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kind={self.kind}, reset={self.reset}, signed={self.signed}, "
            f"surrogate={self.surrogate}({self.sharpness})"
        )

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
it), as both peer libraries do by default. The whole loop lives in one
autograd function: it saves one membrane tensor and does the backward
recursion by hand instead of through a graph of 5 x T small nodes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

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


class _MultiStepNeuronFunction(torch.autograd.Function):
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
    ) -> torch.Tensor:
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
        ctx.save_for_backward(membranes, spikes, threshold, beta)
        ctx.options = (signed, reset_to_zero, leak_reset, surrogate, sharpness)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        membranes, spikes, threshold, beta = ctx.saved_tensors
        signed, reset_to_zero, leak_reset, surrogate, sharpness = ctx.options
        derivative = surrogate_derivative(surrogate)
        need_threshold = ctx.needs_input_grad[1]
        need_beta = ctx.needs_input_grad[2]

        grad_currents = torch.empty_like(membranes)
        grad_threshold = torch.zeros_like(threshold) if need_threshold else None
        grad_beta = torch.zeros_like(beta) if need_beta else None
        grad_carry = None  # dL/d carry_t, flowing back from u_{t+1}
        inv_threshold = threshold.reciprocal()
        for t in reversed(range(membranes.shape[0])):
            u, s = membranes[t], spikes[t]
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
        return grad_currents, grad_threshold, grad_beta, None, None, None, None, None


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
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kind={self.kind}, reset={self.reset}, signed={self.signed}, "
            f"surrogate={self.surrogate}({self.sharpness})"
        )

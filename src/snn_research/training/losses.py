"""Distillation and language-modelling losses, per predicted token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.  logits: (B, L, V)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def teacher_top_k(
    teacher_logits: torch.Tensor, top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens at a temperature: their log-probabilities (normalised
    over the whole vocabulary) and ids. Cacheable: k floats and k ids per position."""
    log_probs = (teacher_logits.float() / temperature).log_softmax(-1)
    values, index = log_probs.topk(top_k, dim=-1)
    return values, index


def _log_tail(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_probs))) over the last axis: the log-mass outside the kept tokens."""
    kept = torch.logsumexp(log_probs, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(kept))


def top_k_kl(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, top_index: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) on the teacher's top-k tokens plus one bucket for all the others.

    The exact KL between both distributions coarse-grained to k + 1 outcomes: a
    lower bound of the full KL, tight when the teacher's tail mass is small, and
    free of the bias that renormalising the top-k would add. ``teacher_log_probs``
    come from ``teacher_top_k`` at the same temperature. Scaled by T^2.
    """
    student = (student_logits.float() / temperature).log_softmax(-1).gather(-1, top_index)
    head = (teacher_log_probs.exp() * (teacher_log_probs - student)).sum(-1)
    teacher_tail, student_tail = _log_tail(teacher_log_probs), _log_tail(student)
    tail = teacher_tail.exp() * (teacher_tail - student_tail)
    return (head + tail).mean() * temperature**2


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """KL(teacher || student) per token at a temperature, scaled by T^2 (Hinton et al., 2015)."""
    if top_k and top_k < teacher_logits.shape[-1]:
        return top_k_kl(student_logits, *teacher_top_k(teacher_logits, top_k, temperature), temperature)
    student = (student_logits.float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * temperature**2


def relative_mse(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over squared target, both weighted per channel; scale-free across layers."""
    error = (output - target).square()
    reference = target.square()
    if weight is not None:
        error, reference = error * weight, reference * weight
    return error.sum(-1).mean() / reference.sum(-1).mean().clamp(min=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Losses from the LM head's input, a chunk of positions at a time
#
# A full-vocabulary logit tensor is large (4 blocks x 255 positions x 262,144 tokens x 4 bytes = 1.07 GB for
# Gemma 3), and the unfused losses above hold several of them at once (logits, log-probabilities, their
# gradient, the teacher's). The fused losses below take the hidden states the LM head reads, compute the
# logits of LOGIT_CHUNK positions at a time, and work out the loss and its gradient with respect to those
# hidden states in the same pass (the gradient of a softmax loss is closed-form: softmax minus target). Only
# the (positions, hidden) gradient is kept for backward, so a step holds one chunk's logits at a time. They
# equal the unfused losses (tested), up to float summation order.

LOGIT_CHUNK = 128  # positions whose logits exist at once: 128 x 262,144 x 4 B = 134 MB for Gemma 3


@dataclass(frozen=True)
class Head:
    """A model's LM head as a plain linear map, with the final logit soft-capping of its config (Gemma 2/3)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    @classmethod
    def of(cls, model) -> Head | None:
        """The head of a causal LM whose output embedding is a plain ``nn.Linear``; None otherwise (a spiking
        head, for one, must run its own forward, so the fused losses do not apply)."""
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            return None
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(head.weight, head.bias, getattr(config, "final_logit_softcapping", None) or None)

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 logits, tanh of the capped logits or None): the second gives the soft-cap's derivative."""
        raw = F.linear(hidden, self.weight, self.bias).float()
        if self.softcap is None:
            return raw, None
        capped = torch.tanh(raw / self.softcap)
        return capped * self.softcap, capped


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, C) hidden states the LM head reads: the base model's last hidden state (its final norm applied)."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


# per chunk: (rows, logits (n, V) float32, whether a gradient is wanted) -> (summed loss, d(summed loss)/dlogits
# or None); the caller scales the sum, and autograd scales the gradient with it
ChunkLoss = Callable[[slice, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _head_pass(hidden: torch.Tensor, head: Head, chunk_loss: ChunkLoss, chunk: int, want: tuple[bool, bool, bool]):
    """The summed loss over all rows of ``hidden`` (N, C), and the gradients wanted of (hidden, weight, bias)."""
    rows = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want[0] else None
    grad_weight = torch.zeros_like(head.weight, dtype=torch.float32) if want[1] else None
    grad_bias = torch.zeros_like(head.bias, dtype=torch.float32) if want[2] else None
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        logits, capped = head.logits(hidden[part])
        loss, grad = chunk_loss(part, logits, any(want))
        total += loss
        if grad is None:
            continue
        if capped is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
            grad = grad * (1 - capped.square())
        if grad_hidden is not None:
            grad_hidden[part] = (grad.to(head.weight.dtype) @ head.weight).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight += grad.t() @ hidden[part].float()
        if grad_bias is not None:
            grad_bias += grad.sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, softcap, chunk_loss, chunk):
        want = tuple(ctx.needs_input_grad[:3])
        total, *grads = _head_pass(hidden, Head(weight, bias, softcap), chunk_loss, chunk, want)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [None if g is None else (grad_output * g).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        del ctx.grads
        return (*grads, None, None, None)


def _head_loss(hidden: torch.Tensor, head: Head, chunk_loss: ChunkLoss, chunk: int) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, head.weight, head.bias)):
        return _FusedHeadLoss.apply(hidden, head.weight, head.bias, head.softcap, chunk_loss, chunk)
    with torch.no_grad():
        return _head_pass(hidden, head, chunk_loss, chunk, (False, False, False))[0]


def fused_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` (B, P) from the hidden states (B, P, C) that predict them: equal to
    ``F.cross_entropy`` of the head's logits, without the full logit tensor."""
    flat = targets.reshape(-1)
    count = flat.numel()

    def chunk_loss(rows, logits, grad):
        log_probs = logits.log_softmax(-1)
        target = flat[rows].unsqueeze(-1)
        loss = -log_probs.gather(-1, target).sum()
        if not grad:
            return loss, None
        d = log_probs.exp_()  # d(summed CE)/dlogits: softmax minus one-hot
        d.scatter_add_(-1, target, torch.full_like(target, -1, dtype=d.dtype))
        return loss, d

    return _head_loss(hidden, head, chunk_loss, chunk) / count


def fused_distillation_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head,
                          teacher_head: Head, temperature: float = 1.0, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """``distillation_kl`` (full vocabulary) of the logits the two heads make from the hidden states (B, P, C)
    of the same positions: mean KL(teacher || student) per position at a temperature, scaled by T^2."""
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    count = teacher_flat.shape[0]

    def chunk_loss(rows, logits, grad):
        with torch.no_grad():
            teacher_log = (teacher_head.logits(teacher_flat[rows])[0] / temperature).log_softmax(-1)
        student_log = (logits / temperature).log_softmax(-1)
        teacher_probs = teacher_log.exp()
        loss = (teacher_probs * (teacher_log - student_log)).sum()
        if not grad:
            return loss, None
        # d(summed KL)/dz with student log-probs log_softmax(z / T): (softmax(z / T) - p) / T
        return loss, student_log.exp_().sub_(teacher_probs).div_(temperature)

    return _head_loss(student_hidden, student_head, chunk_loss, chunk) * (temperature**2 / count)

"""Distillation and language-modelling losses, per predicted token."""

from __future__ import annotations

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

"""Distillation and language-modelling losses, per predicted token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.  logits: (B, L, V)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def teacher_top_k(teacher_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits and their token ids (cacheable: k floats and k ids per position)."""
    values, index = teacher_logits.float().topk(top_k, dim=-1)
    return values, index


def top_k_kl(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) with the teacher restricted to (and renormalised on) its top-k tokens.

    The student's log-probabilities come from its full softmax, so mass it puts
    outside the teacher's top-k is still punished.
    """
    student = (student_logits.float() / temperature).log_softmax(-1).gather(-1, top_index)
    teacher = (top_values / temperature).log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * temperature**2


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """KL(teacher || student) per token at a temperature, scaled by T^2 (Hinton et al., 2015)."""
    if top_k and top_k < teacher_logits.shape[-1]:
        return top_k_kl(student_logits, *teacher_top_k(teacher_logits, top_k), temperature)
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

"""The losses computed from the LM head's input a chunk of positions at a time equal the losses of the full
logits, in value and in gradient; validation scored a sequence at a time equals the whole batch's scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model
from snn_research.stages.training_common import score_batch, teacher_val_targets
from snn_research.training.losses import (
    Head,
    distillation_kl,
    final_hidden,
    fused_cross_entropy,
    fused_distillation_kl,
    next_token_nll,
    teacher_top_k,
    top_k_kl,
)


def _pair(family: str, softcap: float | None = None):
    models = [tiny_model(family, seed=seed).double() for seed in (0, 1)]
    if softcap is not None:
        for model in models:
            model.config.final_logit_softcapping = softcap
    return models


def test_the_head_of_the_hidden_states_gives_the_models_logits(family, input_ids):
    model = tiny_model(family).double()
    head = Head.of(model)
    assert head is not None
    expected = model(input_ids=input_ids, use_cache=False).logits.float()
    assert torch.allclose(head.logits(final_hidden(model, input_ids))[0], expected, atol=1e-5, rtol=1e-5)


def test_a_soft_capped_head_caps_as_the_model_does(input_ids):
    (model, _) = _pair("gemma3", softcap=0.5)
    expected = model(input_ids=input_ids, use_cache=False).logits.float()
    assert expected.abs().max() <= 0.5  # the cap is what limits them here
    assert torch.allclose(Head.of(model).logits(final_hidden(model, input_ids))[0], expected, atol=1e-6)


def test_a_head_that_is_not_a_plain_linear_map_is_not_fused():
    model = tiny_model("llama")
    model.lm_head = nn.Sequential(model.lm_head)
    assert Head.of(model) is None


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_kl_equals_the_kl_of_the_full_logits(family, input_ids, softcap, temperature):
    if softcap is not None and family != "gemma3":
        pytest.skip("soft-capping is a Gemma setting")
    student, teacher = _pair(family, softcap)
    for param in student.parameters():
        param.requires_grad_(False)
    weight = student.get_output_embeddings().weight.requires_grad_(True)  # the head's gradient too
    hidden = final_hidden(student, input_ids).detach().requires_grad_(True)
    teacher_hidden = final_hidden(teacher, input_ids).detach()
    positions = torch.tensor([0, 3, 4, 10, 22])
    s_head, t_head = Head.of(student), Head.of(teacher)

    fused = fused_distillation_kl(hidden[:, positions], teacher_hidden[:, positions], s_head, t_head, temperature,
                                  chunk=3)  # chunks that do not divide the 10 rows
    expected = distillation_kl(s_head.logits(hidden[:, positions])[0], t_head.logits(teacher_hidden[:, positions])[0],
                               temperature)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(_grads(fused, [hidden, weight]), _grads(expected, [hidden, weight])):
        assert got.abs().max() > 0
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_the_fused_cross_entropy_equals_the_cross_entropy_of_the_full_logits(family, input_ids):
    (model, _) = _pair(family, 1.5 if family == "gemma3" else None)
    for param in model.parameters():
        param.requires_grad_(False)
    weight = model.get_output_embeddings().weight.requires_grad_(True)
    hidden = final_hidden(model, input_ids).detach().requires_grad_(True)
    head = Head.of(model)
    fused = fused_cross_entropy(hidden[:, :-1], input_ids[:, 1:], head, chunk=5)
    expected = next_token_nll(head.logits(hidden)[0], input_ids)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(_grads(fused, [hidden, weight]), _grads(expected, [hidden, weight])):
        assert got.abs().max() > 0
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_a_fused_loss_trains_the_body_below_the_head(input_ids):
    """The gradient reaches the parameters under the head through the base model's graph."""
    student, teacher = _pair("llama")
    body = student.model.layers[0].mlp.down_proj.weight
    hidden = final_hidden(student, input_ids)
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, input_ids)
    loss = fused_distillation_kl(hidden, teacher_hidden, Head.of(student), Head.of(teacher))
    (got,) = torch.autograd.grad(loss, [body])
    logits = student(input_ids=input_ids, use_cache=False).logits
    expected = distillation_kl(logits, teacher(input_ids=input_ids, use_cache=False).logits.detach())
    (want,) = torch.autograd.grad(expected, [body])
    assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_without_grad_the_fused_losses_give_the_same_value(input_ids):
    student, teacher = _pair("gpt2")
    with torch.no_grad():
        hidden, teacher_hidden = final_hidden(student, input_ids), final_hidden(teacher, input_ids)
        value = fused_distillation_kl(hidden, teacher_hidden, Head.of(student), Head.of(teacher), 1.0, chunk=7)
        expected = distillation_kl(student(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits)
    assert not value.requires_grad
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_validation_a_sequence_at_a_time_equals_the_whole_batch(family, input_ids, monkeypatch):
    import snn_research.stages.training_common as common

    monkeypatch.setattr(common, "VAL_TOP_K", 16)  # of the tiny vocabulary's 96
    student, teacher = _pair(family)
    (target,) = teacher_val_targets(teacher, [input_ids])
    with torch.no_grad():
        expected = teacher_top_k(teacher(input_ids=input_ids).logits, target[0].shape[-1])
        assert torch.allclose(target[0], expected[0], atol=1e-6) and torch.equal(target[1], expected[1])
        scores = score_batch(student, input_ids, target)
        logits = student(input_ids=input_ids).logits
        assert scores.nll == pytest.approx(float(next_token_nll(logits, input_ids)), rel=1e-6)
        assert scores.kl == pytest.approx(float(top_k_kl(logits, *target)), rel=1e-6)
        assert scores.kl > 0 and scores.penalty == 0.0

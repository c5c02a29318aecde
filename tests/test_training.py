"""Mechanics of recovery on tiny models: distillation lowers the KL, curriculum ends at the target T."""

import copy

import pytest
import torch
from conftest import calibration_batches, tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps
from snn_research.training.layerwise import layerwise_distill
from snn_research.training.losses import distillation_kl, teacher_top_k, top_k_kl
from snn_research.training.loop import LoopSettings, curriculum_time_steps, train


def settings(**overrides) -> LoopSettings:
    values = dict(steps=12, batch_size=2, lr=3e-3, threshold_lr=3e-2, weight_decay=0.0, warmup_steps=0,
                  grad_clip=1.0, eval_every=6, checkpoint_every=100, seed=0, time_steps=4)
    values.update(overrides)
    return LoopSettings(**values)


def test_top_k_kl_is_a_lower_bound_that_reaches_the_full_kl():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 300) * 3
    student = teacher + torch.randn(2, 5, 300)
    full = distillation_kl(student, teacher).item()
    bounds = [top_k_kl(student, *teacher_top_k(teacher, k)).item() for k in (1, 10, 100, 299)]
    assert all(a <= b + 1e-6 for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] == pytest.approx(full, rel=1e-4) and bounds[0] < full


def test_distillation_steps_lower_the_kl_to_the_teacher(tmp_path):
    teacher = tiny_model("llama")
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=4))
    data = torch.cat(calibration_batches(4, seed=3))
    probe = data[:2]

    def kl(model):
        with torch.no_grad():
            return distillation_kl(model(input_ids=probe).logits, teacher(input_ids=probe).logits).item()

    def loss_fn(model, batch, step):
        with torch.no_grad():
            target = teacher(input_ids=batch).logits
        loss = distillation_kl(model(input_ids=batch).logits, target)
        return loss, {}

    before = kl(hybrid)
    result = train(hybrid, data, loss_fn, lambda m: {"objective": kl(m)}, settings(), tmp_path / "ckpt", "fp")
    assert result.best_objective < before
    assert kl(hybrid) == pytest.approx(result.best_objective) and kl(hybrid) < 0.9 * before


def test_curriculum_anneals_from_the_start_t_and_ends_at_the_target():
    s = settings(steps=40, curriculum_start=32, time_steps=8, curriculum_fraction=0.5)
    schedule = [curriculum_time_steps(step, s) for step in range(40)]
    assert schedule[0] == 32 and schedule[-1] == 8 and schedule[20:] == [8] * 20
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


def test_training_with_a_curriculum_leaves_the_model_at_the_target_t(tmp_path):
    teacher = tiny_model("gemma3")
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=4))
    seen = []

    def loss_fn(model, batch, step):
        seen.append(next(spiking_mlps(model)).input_encoder.time_steps)
        return model(input_ids=batch, labels=batch).loss, {}

    data = torch.cat(calibration_batches(2))
    train(hybrid, data, loss_fn, lambda m: {"objective": 0.0}, settings(steps=6, curriculum_start=16), tmp_path, "fp")
    assert seen[0] == 16 and seen[-1] == 4
    assert {m.input_encoder.time_steps for m in spiking_mlps(hybrid)} == {4}


def test_layerwise_distillation_lowers_every_blocks_loss():
    teacher = tiny_model("llama", layers=3)
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=4))
    reference = copy.deepcopy(hybrid)
    blocks = torch.cat(calibration_batches(4, seed=5))
    reports = layerwise_distill(teacher, hybrid, blocks, batch_size=2, steps_per_layer=30, lr=3e-3,
                                threshold_lr=3e-2, seed=0)
    assert [r.layer for r in reports] == [0, 1, 2]
    assert all(r.loss_after < r.loss_before for r in reports), reports
    assert all(0 <= r.stream_error < 1 for r in reports)
    changed = [not torch.equal(a.gate_proj.weight, b.gate_proj.weight)
               for a, b in zip(spiking_mlps(hybrid), spiking_mlps(reference))]
    assert all(changed)

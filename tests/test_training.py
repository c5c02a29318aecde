"""Mechanics of recovery on tiny models: distillation lowers the KL, curriculum ends at the target T,
the energy budget follows T, the schedule is transformers', devices are checked, explicit parameter sets train."""

import copy
import math

import pytest
import torch
from conftest import calibration_batches, tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.evaluation.energy import block_costs
from snn_research.models.hybrid_transformer import HybridPlan, set_time_steps, spiking_mlps
from snn_research.training.energy_budget import EnergyBudget
from snn_research.training.layerwise import layerwise_distill
from snn_research.training.losses import distillation_kl, teacher_top_k, top_k_kl
from snn_research.devices import DeviceMismatch, check_devices
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


def test_energy_budget_charges_the_fixed_costs_at_the_blocks_current_time_steps():
    hybrid = hybrid_of(tiny_model("llama"), HybridPlan(time_steps=8))
    budget = EnergyBudget(hybrid, budget=0.5, weight=1.0, e_mac_pj=4.6, e_ac_pj=0.9)
    blocks = list(spiking_mlps(hybrid))
    teacher_pj = sum(block_costs(b).teacher_pj(4.6, 0.9) for b in blocks)
    for time_steps in (16, 8, 2):  # a curriculum moves T after the budget was made
        set_time_steps(hybrid, time_steps)
        fixed_pj = sum(block_costs(b).fixed_hybrid_pj(4.6, 0.9) for b in blocks)
        with budget:  # no forward pass: the ratio is the fixed part alone
            assert budget.ratio(tokens=10).item() == pytest.approx(fixed_pj / teacher_pj, rel=1e-6), time_steps
        assert budget.fixed_pj == pytest.approx(fixed_pj)
    set_time_steps(hybrid, 16)
    at_16 = budget.fixed_pj
    set_time_steps(hybrid, 8)
    assert budget.fixed_pj < at_16  # neuron updates scale with T


def test_check_devices_names_every_misplaced_tensor_and_module():
    teacher = tiny_model("llama")
    on_meta = torch.empty(2, 3, device="meta")
    check_devices(torch.device("cpu"), teacher=teacher, batches=[torch.zeros(2)], targets=[(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(DeviceMismatch) as caught:
        check_devices(torch.device("cpu"), teacher=teacher, val_targets=[(torch.zeros(1), on_meta)],
                      hybrid=copy.deepcopy(teacher).to("meta"))
    message = str(caught.value)
    assert "val_targets on meta" in message and "hybrid on meta" in message and "teacher" not in message
    assert "the stage runs on cpu" in message
    assert isinstance(caught.value, ValueError)  # the CLI turns it into exit code 1 with the message


def test_learning_rate_follows_transformers_cosine_schedule_with_warmup(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    hybrid = hybrid_of(tiny_model("llama"), HybridPlan(time_steps=4))
    lrs = {}

    def log(metrics, step):
        if "lr" in metrics:
            lrs[step] = metrics["lr"]

    def loss_fn(model, batch, step):
        return model(input_ids=batch, labels=batch).loss, {}

    s = settings(steps=6, warmup_steps=3, lr=1e-3)
    train(hybrid, torch.cat(calibration_batches(2)), loss_fn, lambda m: {"objective": 0.0}, s, tmp_path, "fp",
          log_metrics=log)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_cosine_schedule_with_warmup(reference, 3, 6)
    expected = {}
    for step in range(1, 7):
        reference.step()
        schedule.step()
        expected[step] = schedule.get_last_lr()[0]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(1e-3 / 3)  # warm-up from 0: the first step ran at lr 0


def test_train_updates_only_an_explicit_parameter_set(tmp_path):
    model = tiny_model("llama")
    before = copy.deepcopy(model)
    chosen = list(model.model.layers[1].mlp.parameters())
    data = torch.cat(calibration_batches(2))

    def loss_fn(m, batch, step):
        return m(input_ids=batch, labels=batch).loss, {}

    groups = [{"params": chosen, "lr": 1e-2, "weight_decay": 0.0}]
    train(model, data, loss_fn, lambda m: {"objective": 0.0},
          settings(steps=3, time_steps=None), tmp_path, "fp", param_groups=groups)
    changed = {name for (name, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    assert changed == {f"model.layers.1.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}


def test_train_refuses_parameters_of_another_model(tmp_path):
    model, other = tiny_model("llama"), tiny_model("llama")
    groups = [{"params": list(other.model.layers[0].mlp.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    with pytest.raises(ValueError, match="3 of the 3 parameters to train are not parameters of the model"):
        train(model, torch.cat(calibration_batches(2)), lambda m, b, s: (m(input_ids=b, labels=b).loss, {}),
              lambda m: {"objective": math.inf}, settings(steps=1, time_steps=None), tmp_path, "fp",
              param_groups=groups)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_gradient_checkpointing_recomputes_layers_and_trains_to_the_same_weights(family, tmp_path):
    """On by default; the same weights bit for bit as without it, and the layers really are recomputed."""
    teacher = tiny_model(family)
    plan = HybridPlan(time_steps=4, encoder="weighted") if family != "gpt2" else HybridPlan(time_steps=4)
    runs = {}
    for mode in (None, False):
        hybrid = hybrid_of(teacher, plan)
        calls = []
        # a pre-hook: a recomputation stops as soon as it has what the backward needs, so the FFN may not finish
        mlp = hybrid.get_submodule("transformer.h.0.mlp" if family == "gpt2" else "model.layers.0.mlp")
        mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))

        def loss_fn(model, batch, step):
            return model(input_ids=batch, labels=batch).loss, {}

        train(hybrid, torch.cat(calibration_batches(2)), loss_fn, lambda m: {"objective": 0.0},
              settings(steps=3, eval_every=100, gradient_checkpointing=mode), tmp_path / str(mode), "fp")
        assert not hybrid.is_activation_checkpointing  # switched off again for inference
        runs[mode] = (hybrid.state_dict(), calls)
    (on, on_calls), (off, off_calls) = runs[None], runs[False]
    assert len(on_calls) == 2 * len(off_calls)  # each step's layer ran again in the backward pass
    assert all(torch.equal(on[k], off[k]) for k in off)


def test_gradient_checkpointing_is_refused_for_rate_noise_and_off_by_default_with_it(tmp_path):
    from snn_research.config import Params

    teacher = tiny_model("llama")
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=4, encoder="rate"))

    def loss_fn(model, batch, step):
        assert not model.is_activation_checkpointing
        return model(input_ids=batch, labels=batch).loss, {}

    train(hybrid, torch.cat(calibration_batches(2)), loss_fn, lambda m: {"objective": 0.0},
          settings(steps=1, eval_every=100), tmp_path / "a", "fp")
    with pytest.raises(ValueError, match="'rate' encoder draws new noise"):
        train(hybrid, torch.cat(calibration_batches(2)), loss_fn, lambda m: {"objective": 0.0},
              settings(steps=1, eval_every=100, gradient_checkpointing=True), tmp_path / "b", "fp")
    with pytest.raises(ValueError, match="a recomputed layer would not"):
        Params.model_validate({"convert": {"encoder": "rate", "time_steps": 8},
                               "finetune": {"gradient_checkpointing": True}})


def test_gradient_checkpointing_under_an_energy_budget_trains_to_the_same_weights(tmp_path):
    """The budget meters the forward's spike counts; the recomputed layers, unmetered, must repeat the same ops."""
    teacher = tiny_model("llama")
    states = {}
    for mode in (None, False):
        hybrid = hybrid_of(teacher, HybridPlan(time_steps=4, encoder="weighted"))
        budget = EnergyBudget(hybrid, budget=0.05, weight=10.0, e_mac_pj=4.6, e_ac_pj=0.9)

        def loss_fn(model, batch, step, budget=budget):
            with budget:
                loss = model(input_ids=batch, labels=batch).loss
                return loss + budget.penalty(batch.numel()), {}

        train(hybrid, torch.cat(calibration_batches(2)), loss_fn, lambda m: {"objective": 0.0},
              settings(steps=3, eval_every=100, gradient_checkpointing=mode), tmp_path / str(mode), "fp")
        states[mode] = hybrid.state_dict()
    assert all(torch.equal(states[None][k], states[False][k]) for k in states[False])

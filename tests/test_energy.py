import pytest
import torch
from conftest import calibration_batches, tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.evaluation.baselines import Prices, compare
from snn_research.evaluation.energy import measure_energy
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps

E_MAC, E_AC = 4.6, 0.9


def test_energy_matches_a_hand_count_on_a_one_layer_gpt2_with_lif():
    teacher = tiny_model("gpt2", layers=1)
    time_steps = 4
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=time_steps, neuron="lif", beta=0.9))
    block = next(spiking_mlps(hybrid))
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(6))
    report = measure_energy(hybrid, ids, E_MAC, E_AC)
    handle.remove()
    with torch.no_grad():
        train = block.input_encoder.spike_train(captured["x"])
        hidden_train = block.hidden_neurons(block.c_fc(train * block.input_encoder.threshold))
    tokens, hidden, inner, vocab, length = 16, 32, 128, 96, 16
    input_spikes, hidden_spikes = train.abs().sum().item() / tokens, hidden_train.sum().item() / tokens

    keys = (length + 1) / 2
    projections_macs = hidden * 3 * hidden + hidden * hidden  # c_attn, attention c_proj
    projection_bias_adds = 3 * hidden + hidden
    attention = 2 * 2 * 16 * keys + 2 * keys
    norms = 3 * 3 * hidden  # two LayerNorms + the final one, 3 MACs per element
    lm_head = hidden * vocab
    shared_pj = (projections_macs + attention + norms + lm_head) * E_MAC + projection_bias_adds * E_AC
    teacher_ffn_pj = (2 * hidden * inner + inner) * E_MAC + (inner + hidden) * E_AC
    hybrid_ffn_pj = (
        (input_spikes * inner + hidden_spikes * hidden) * E_AC  # synaptic events
        + (time_steps * (hidden + inner) + time_steps * inner) * E_AC  # neuron updates, c_fc bias per step
        + time_steps * inner * E_MAC  # LIF leak
        + hidden * E_MAC + hidden * E_AC  # c_proj decoder rescale, c_proj bias
    )
    assert report.teacher_energy_pj == pytest.approx(shared_pj + teacher_ffn_pj, rel=1e-9)
    assert report.hybrid_energy_pj == pytest.approx(shared_pj + hybrid_ffn_pj, rel=1e-9)
    assert report.model_energy_ratio == pytest.approx((shared_pj + hybrid_ffn_pj) / (shared_pj + teacher_ffn_pj))
    # INT8: an 8-bit multiply and add per MAC, a 32-bit add per bias; the shared parts INT8 on both sides
    int8_mac, int32_add = 0.2 + 0.03, 0.1
    shared_int8 = (projections_macs + attention + norms + lm_head) * int8_mac + projection_bias_adds * int32_add
    teacher_ffn_int8 = (2 * hidden * inner + inner) * int8_mac + (inner + hidden) * int32_add
    figures = compare(report, Prices())
    assert figures["model_energy_ratio_int8"] == pytest.approx(
        (shared_int8 + hybrid_ffn_pj) / (shared_int8 + teacher_ffn_int8), rel=1e-9)
    # low-bit: c_fc reads the signed input counts in [-4, 4] (4 bits), c_proj the hidden counts in [0, 4] (3 bits)
    teacher_ffn_lowbit = (hidden * inner * (0.2 * 4 / 8 + 0.03) + inner * hidden * (0.2 * 3 / 8 + 0.03)
                          + inner * int8_mac + (inner + hidden) * int32_add)
    assert figures["ffn_energy_ratio_lowbit"] == pytest.approx(hybrid_ffn_pj / teacher_ffn_lowbit, rel=1e-9)


def test_teacher_without_spiking_blocks_has_ratio_one():
    teacher = tiny_model("gemma3")
    report = measure_energy(teacher, calibration_batches(1)[0])
    assert report.ffn_energy_ratio == pytest.approx(1.0) and report.model_energy_ratio == pytest.approx(1.0)
    assert report.sites == [] and report.mean_spike_rate == 0.0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_training_budget_estimates_the_same_ratio_as_the_energy_report(family):
    from snn_research.training.energy_budget import EnergyBudget

    hybrid = hybrid_of(tiny_model(family), HybridPlan(time_steps=8, neuron="lif"))
    ids = calibration_batches(1, seed=9)[0]
    report = measure_energy(hybrid, ids, E_MAC, E_AC)
    budget = EnergyBudget(hybrid, budget=0.01, weight=1.0, e_mac_pj=E_MAC, e_ac_pj=E_AC)
    with budget:
        hybrid(input_ids=ids)
        ratio = budget.ratio(ids.numel())
    assert float(ratio.detach()) == pytest.approx(report.ffn_energy_ratio, rel=1e-6)


def test_budget_penalty_pushes_thresholds_up_when_over_budget():
    from snn_research.models.hybrid_transformer import spiking_parameter_groups
    from snn_research.training.energy_budget import EnergyBudget

    hybrid = hybrid_of(tiny_model("llama"), HybridPlan(time_steps=8, learnable_threshold=True))
    ids = calibration_batches(1, seed=9)[0]
    budget = EnergyBudget(hybrid, budget=0.01, weight=1.0, e_mac_pj=E_MAC, e_ac_pj=E_AC)
    with budget:
        hybrid(input_ids=ids)
        penalty = budget.penalty(ids.numel())
    assert penalty.item() > 0 and budget.last_ratio > 0.01
    penalty.backward()
    _, thresholds = spiking_parameter_groups(hybrid)
    # a larger threshold means fewer spikes: descending the penalty raises every threshold on balance
    assert all(p.grad.sum() < 0 for p in thresholds)
    under = EnergyBudget(hybrid, budget=10.0, weight=1.0, e_mac_pj=E_MAC, e_ac_pj=E_AC)
    with under:
        hybrid(input_ids=ids)
        assert under.penalty(ids.numel()).item() == 0.0

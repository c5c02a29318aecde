import pytest
import torch
from conftest import calibration_batches, tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.evaluation.energy import measure_energy
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps

E_MAC, E_AC = 4.6, 0.9


def simulated_spikes(block, x):
    """Spikes per site from the step-by-step simulation (independent of the closed-form counts)."""
    trains = {"input": block.input_encoder.spike_train(x)}
    x_rate = trains["input"].mean(0) * block.input_encoder.threshold
    product = block.act_fn(block.gate_proj(x_rate)) * block.up_proj(x_rate)
    trains["product"] = block.product_encoder.spike_train(product)
    return {site: train.abs().sum().item() for site, train in trains.items()}


def test_energy_matches_a_hand_count_on_a_one_layer_llama():
    teacher = tiny_model("llama", layers=1)
    time_steps = 8
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=time_steps))
    block = next(spiking_mlps(hybrid))
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))
    report = measure_energy(hybrid, ids, E_MAC, E_AC)
    handle.remove()
    tokens = 48
    spikes = {site: count / tokens for site, count in simulated_spikes(block, captured["x"]).items()}

    hidden, intermediate, heads, head_dim, kv_heads, vocab, length = 32, 64, 4, 8, 2, 96, 24
    keys = (length + 1) / 2  # mean causal span over 24 positions
    projections = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attention = 2 * heads * head_dim * keys + heads * keys
    norms = 3 * 2 * hidden  # two RMSNorms in the block, one final, 2 MACs per element
    lm_head = hidden * vocab
    teacher_ffn = 3 * hidden * intermediate + 2 * intermediate
    synaptic = spikes["input"] * 2 * intermediate + spikes["product"] * hidden
    neuron_steps = time_steps * (hidden + intermediate)
    hybrid_ffn_macs = 2 * intermediate + (2 * intermediate + hidden)  # act + gating; three decoder rescales

    teacher_pj = (projections + attention + norms + lm_head + teacher_ffn) * E_MAC
    hybrid_ffn_pj = hybrid_ffn_macs * E_MAC + (synaptic + neuron_steps) * E_AC
    hybrid_pj = (projections + attention + norms + lm_head) * E_MAC + hybrid_ffn_pj
    assert report.teacher_energy_pj == pytest.approx(teacher_pj, rel=1e-9)
    assert report.teacher_ffn_energy_pj == pytest.approx(teacher_ffn * E_MAC, rel=1e-9)
    assert report.hybrid_ffn_energy_pj == pytest.approx(hybrid_ffn_pj, rel=1e-9)
    assert report.hybrid_energy_pj == pytest.approx(hybrid_pj, rel=1e-9)
    assert report.ffn_energy_ratio == pytest.approx(hybrid_ffn_pj / (teacher_ffn * E_MAC), rel=1e-9)
    rates = {s.key.rsplit(":", 1)[1]: s.spike_rate for s in report.sites}
    assert rates["input"] == pytest.approx(spikes["input"] / (time_steps * hidden), rel=1e-9)
    assert rates["product"] == pytest.approx(spikes["product"] / (time_steps * intermediate), rel=1e-9)
    total_rate = (spikes["input"] + spikes["product"]) / neuron_steps
    assert report.mean_spike_rate == pytest.approx(total_rate, rel=1e-9)


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

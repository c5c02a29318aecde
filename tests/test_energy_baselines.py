"""Energy against FP32, INT8 and low-bit ANNs and with weight reads, counted by hand from first principles.

Spikes come from running the encoders' step-by-step trains on the block's real input; synapses
reached per spike are the output neurons of the linears that read the site; operation counts
come from the config's shapes. Nothing here calls ``block_costs``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.evaluation.baselines import Prices, compare, site_rows
from snn_research.evaluation.energy import measure_energy
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps

# distinct values, so a constant used in the wrong place shows
PRICES = Prices(e_mac_pj=4.6, e_ac_pj=0.9, e_mult_int8_pj=0.2, e_add_int8_pj=0.03, e_add_int32_pj=0.1,
                e_read_pj_per_byte=1.25)
HIDDEN, INTER, HEADS, HEAD_DIM, KV_HEADS, VOCAB = 32, 64, 4, 8, 2, 96
BATCH, LENGTH = 2, 24
TOKENS = BATCH * LENGTH


def run_and_count_spikes(time_steps: int, encoder: str):
    """(report, spikes per token per site) of a one-layer Llama hybrid; spikes from the simulated trains."""
    hybrid = hybrid_of(tiny_model("llama", layers=1), HybridPlan(time_steps=time_steps, encoder=encoder))
    block = next(spiking_mlps(hybrid))
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(5))
    report = measure_energy(hybrid, ids, PRICES.e_mac_pj, PRICES.e_ac_pj)
    handle.remove()
    # the weight of step t's spike, in units of the smallest level: 1 for unweighted codes, 2^(T-1-t) for binary
    step_weight = (2.0 ** torch.arange(time_steps - 1, -1, -1) if encoder == "weighted" else torch.ones(time_steps))
    levels = float(step_weight.sum())
    with torch.no_grad():
        trains = {"input": block.input_encoder.spike_train(captured["x"])}  # (T, B, L, C)
        decoded = torch.tensordot(step_weight, trains["input"], dims=1) / levels * block.input_encoder.threshold
        product = block.act_fn(block.gate_proj(decoded)) * block.up_proj(decoded)
        trains["product"] = block.product_encoder.spike_train(product)  # (T, B, L, I)
    spikes = {site: train.abs().sum().item() / TOKENS for site, train in trains.items()}
    return report, spikes


def shared_counts():
    """Per token MACs and weights of everything but the FFN (no biases in Llama)."""
    keys = (LENGTH + 1) / 2  # mean causal span
    projection_weights = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2  # q, o and k, v
    attention = 2 * HEADS * HEAD_DIM * keys + HEADS * keys
    norms = 3 * 2 * HIDDEN  # two RMSNorms in the block and the final one, 2 MACs per element
    lm_head = HIDDEN * VOCAB
    macs = projection_weights + attention + norms + lm_head
    weight_bytes = 4 * (projection_weights + lm_head + HIDDEN)  # FP32; one embedding row per token
    return macs, weight_bytes


def hybrid_ffn_pj(spikes: dict[str, float], time_steps: int, weighted: bool = False) -> float:
    synapses = spikes["input"] * (INTER + INTER) + spikes["product"] * HIDDEN  # gate and up rows; down rows
    integrations = time_steps * (HIDDEN + INTER)
    shifts = (2 * INTER + HIDDEN) * time_steps if weighted else 0  # each receiving neuron shifts once per step
    elementwise = INTER + INTER + (INTER + INTER + HIDDEN)  # activation, gating; three decoder rescales
    return (synapses + integrations + shifts) * PRICES.e_ac_pj + elementwise * PRICES.e_mac_pj


def test_fp32_int8_lowbit_and_memory_figures_match_a_hand_count():
    time_steps = 8
    report, spikes = run_and_count_spikes(time_steps, "if")
    figures = compare(report, PRICES)
    shared_macs, shared_bytes = shared_counts()
    dense_linear = 3 * HIDDEN * INTER
    dense_elementwise = 2 * INTER  # activation, gating multiply
    hybrid_ffn = hybrid_ffn_pj(spikes, time_steps)

    teacher_ffn = (dense_linear + dense_elementwise) * PRICES.e_mac_pj
    assert report.hybrid_ffn_energy_pj == pytest.approx(hybrid_ffn, rel=1e-9)
    assert figures["ffn_energy_ratio"] == pytest.approx(hybrid_ffn / teacher_ffn, rel=1e-9)
    shared = shared_macs * PRICES.e_mac_pj
    assert figures["model_energy_ratio"] == pytest.approx((shared + hybrid_ffn) / (shared + teacher_ffn), rel=1e-9)

    int8_mac = 0.2 + 0.03  # 8-bit multiply and 8-bit add
    teacher_ffn_int8 = (dense_linear + dense_elementwise) * int8_mac
    shared_int8 = shared_macs * int8_mac  # the shared parts are INT8 on both sides
    assert figures["ffn_energy_ratio_int8"] == pytest.approx(hybrid_ffn / teacher_ffn_int8, rel=1e-9)
    assert figures["model_energy_ratio_int8"] == pytest.approx(
        (shared_int8 + hybrid_ffn) / (shared_int8 + teacher_ffn_int8), rel=1e-9)

    bits = 5  # T = 8: counts in [-8, 8], 17 values
    assert figures["activation_bits"] == bits
    teacher_ffn_lowbit = dense_linear * (0.2 * bits / 8 + 0.03) + dense_elementwise * int8_mac
    assert figures["ffn_energy_ratio_lowbit"] == pytest.approx(hybrid_ffn / teacher_ffn_lowbit, rel=1e-9)
    assert figures["model_energy_ratio_lowbit"] == pytest.approx(
        (shared_int8 + hybrid_ffn) / (shared_int8 + teacher_ffn_lowbit), rel=1e-9)

    ffn_bytes = 4 * dense_linear
    read = PRICES.e_read_pj_per_byte
    teacher_ffn_mem, teacher_mem = teacher_ffn + ffn_bytes * read, shared + teacher_ffn + (shared_bytes + ffn_bytes) * read
    assert figures["teacher_weight_bytes_per_token"] == shared_bytes + ffn_bytes
    for name, reads in (("per_step", time_steps), ("per_token", 1)):
        assert figures[f"ffn_memory_ratio_{name}"] == pytest.approx(
            (hybrid_ffn + reads * ffn_bytes * read) / teacher_ffn_mem, rel=1e-9), name
        assert figures[f"model_memory_ratio_{name}"] == pytest.approx(
            (shared + hybrid_ffn + (shared_bytes + reads * ffn_bytes) * read) / teacher_mem, rel=1e-9), name
    rates = {s.key.rsplit(":", 1)[1]: s.spike_rate for s in report.sites}
    assert rates["input"] == pytest.approx(spikes["input"] / (time_steps * HIDDEN), rel=1e-9)
    assert rates["product"] == pytest.approx(spikes["product"] / (time_steps * INTER), rel=1e-9)


@pytest.mark.parametrize("baseline", ["fp32", "int8"])
def test_at_the_break_even_rate_the_spiking_ffn_costs_what_the_dense_one_does(baseline):
    time_steps = 4
    report, spikes = run_and_count_spikes(time_steps, "if")
    # dearer integer ops than 45 nm's: on a 32 x 64 FFN the neurons' fixed cost exceeds a real INT8 FFN
    prices = Prices(e_mult_int8_pj=2.5, e_add_int8_pj=0.3)
    mac = PRICES.e_mac_pj if baseline == "fp32" else 2.5 + 0.3
    teacher_ffn = (3 * HIDDEN * INTER + 2 * INTER) * mac
    suffix = "" if baseline == "fp32" else "_int8"
    rate = compare(report, prices)[f"break_even_spike_rate{suffix}"]
    # every neuron spiking at `rate` per step: spikes per token = rate x T x neurons
    at_rate = {"input": rate * time_steps * HIDDEN, "product": rate * time_steps * INTER}
    assert 0 < rate and hybrid_ffn_pj(at_rate, time_steps) == pytest.approx(teacher_ffn, rel=1e-9)
    for row in site_rows(report, prices):  # one site at its break-even rate, the other as measured
        site = row["key"].rsplit(":", 1)[1]
        neurons = HIDDEN if site == "input" else INTER
        moved = {**spikes, site: row[f"break_even_spike_rate{suffix}"] * time_steps * neurons}
        assert hybrid_ffn_pj(moved, time_steps) == pytest.approx(teacher_ffn, rel=1e-9), site
        assert row["spike_rate"] == pytest.approx(spikes[site] / (time_steps * neurons), rel=1e-9)


def test_break_even_is_zero_when_the_fixed_costs_alone_exceed_the_baseline():
    time_steps = 4
    report, _ = run_and_count_spikes(time_steps, "if")
    silent = hybrid_ffn_pj({"input": 0.0, "product": 0.0}, time_steps)
    assert silent > (3 * HIDDEN * INTER + 2 * INTER) * (0.2 + 0.03), "45 nm INT8 is cheaper than a silent tiny SNN"
    assert compare(report, PRICES)["break_even_spike_rate_int8"] == 0.0
    assert all(row["break_even_spike_rate_int8"] == 0.0 for row in site_rows(report, PRICES))


def test_weighted_encoder_counts_real_spikes_and_one_shift_per_receiving_neuron_per_step():
    time_steps = 4
    report, spikes = run_and_count_spikes(time_steps, "weighted")
    hybrid_ffn = hybrid_ffn_pj(spikes, time_steps, weighted=True)
    assert report.hybrid_ffn_energy_pj == pytest.approx(hybrid_ffn, rel=1e-9)
    figures = compare(report, PRICES)
    teacher_ffn_int8 = (3 * HIDDEN * INTER + 2 * INTER) * (0.2 + 0.03)
    assert figures["ffn_energy_ratio_int8"] == pytest.approx(hybrid_ffn / teacher_ffn_int8, rel=1e-9)
    bits = math.ceil(math.log2(2 * (2**time_steps - 1) + 1))  # 31 values: 5 bits
    assert figures["activation_bits"] == bits == 5
    rates = {s.key.rsplit(":", 1)[1]: s.spike_rate for s in report.sites}
    assert rates["input"] == pytest.approx(spikes["input"] / (time_steps * HIDDEN), rel=1e-9)
    assert 0 < rates["input"] <= 1, "at most one spike per neuron per step"


def test_ffn_bits_follow_time_steps_of_the_if_encoder():
    for time_steps, bits in ((1, 2), (3, 3), (4, 4), (16, 6)):  # 2T + 1 values: 3, 7, 9, 33
        report, _ = run_and_count_spikes(time_steps, "if")
        assert compare(report, PRICES)["activation_bits"] == bits, time_steps

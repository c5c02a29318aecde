"""benchmarks/quantizer_trial.py: its static variant is the integer hybrid, its events are the energy model's."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_batches
from test_converter import converted

from benchmarks.quantizer_trial import Variant, digit_budget_table, quantize, quantized_teacher, site_modes
from snn_research.evaluation.baselines import events_per_synapse
from snn_research.evaluation.energy import measure_energy
from snn_research.hybrid.adapter import signed_digit_count
from snn_research.models.hybrid_transformer import HybridPlan

PLAN = HybridPlan(time_steps=5, encoder="weighted", digits="signed", weight_bits=8)


@pytest.fixture(scope="module")
def trial():
    teacher, hybrid, _, _ = converted("llama", PLAN)
    quantized, state = quantized_teacher(teacher, hybrid)
    return teacher, hybrid, quantized, state


def test_the_static_variant_is_the_integer_hybrid_and_counts_its_events(trial):
    teacher, hybrid, quantized, state = trial
    ids = calibration_batches(2, seed=4)[0]
    with torch.no_grad():
        expected = hybrid(input_ids=ids, use_cache=False).logits
        got = Variant(quantized, state, "static")(input_ids=ids, use_cache=False).logits
        plain = teacher(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the check tells the hybrid from the teacher
    trial_events = state.events["static"] / state.tokens["static"]
    assert trial_events == pytest.approx(events_per_synapse(measure_energy(hybrid, ids)), rel=1e-6)
    assert trial_events > 0


def test_a_site_left_analog_moves_the_output_and_counts_no_events_there(trial):
    teacher, hybrid, _, _ = trial
    quantized, state = quantized_teacher(teacher, hybrid)  # its own counts
    ids = calibration_batches(2, seed=5)[0]
    with torch.no_grad():
        outputs = {v: Variant(quantized, state, v)(input_ids=ids, use_cache=False).logits
                   for v in ("static", "input-only", "product-only")}
    assert (outputs["input-only"] - outputs["static"]).abs().max() > 1e-4
    assert (outputs["product-only"] - outputs["static"]).abs().max() > 1e-4
    per_token = {v: state.events[v] / state.tokens[v] for v in ("static", "input-only", "product-only")}
    assert 0 < per_token["input-only"] < per_token["static"] and 0 < per_token["product-only"] < per_token["static"]


def test_events_are_digits_times_fan_out_over_synapses_by_hand(trial):
    """One FFN, input site only: each token's input digits feed gate and up (2 x I synapses each) out of the
    FFN's 3 x H x I synapses, so events per synapse = 2/3 x the mean digits per input channel."""
    _, _, quantized, _ = trial
    mlp = next(m for m in quantized.modules() if type(m).__name__ == "TrialMLP")
    mlp.state.events, mlp.state.tokens, mlp.state.variant = {}, {}, "input-only"
    x = torch.randn(1, 3, mlp.thresholds["input"].numel(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mlp(x)
    _, levels, _ = quantize(x, mlp.thresholds["input"], mlp.time_steps, "static")
    expected = 2 / 3 * float(signed_digit_count(levels, mlp.time_steps).sum()) / levels[0, 0].numel()
    assert mlp.state.tokens["input-only"] == 3
    assert mlp.state.events["input-only"] == pytest.approx(expected, rel=1e-6) and expected > 0


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_the_digit_budget_rounds_to_the_nearest_level_with_that_many_digits(budget):
    table = digit_budget_table(6, budget)
    levels = torch.arange(64, dtype=torch.float32)
    digits = signed_digit_count(levels, 6)
    assert (signed_digit_count(table, 6) <= budget).all()
    allowed = levels[digits <= budget]
    nearest = (levels[:, None] - allowed[None, :]).abs().amin(1)
    assert torch.equal((table - levels).abs(), nearest)
    assert torch.equal(table[digits <= budget], levels[digits <= budget])  # a level within the budget stays


def test_a_token_is_rescaled_only_when_a_channel_would_clip():
    threshold = torch.tensor([1.0, 2.0, 4.0])
    x = torch.tensor([[0.5, -1.0, 3.0], [3.0, 1.0, 1.0]])  # the second token's first channel is 3x its threshold
    static, _, _ = quantize(x, threshold, 5, "static")
    clip, _, _ = quantize(x, threshold, 5, "token-clip")
    top, _, _ = quantize(x, threshold, 5, "token-max")
    assert torch.equal(clip[0], static[0])  # nothing clips: no rescale
    assert static[1, 0] == 1.0 and clip[1, 0] == pytest.approx(3.0)  # clipped by the static code, kept by the scale
    assert top[0, 2] == pytest.approx(3.0, rel=1e-6)  # each token's largest channel lands on its threshold exactly


def test_a_digit_budget_keeps_the_sign_and_the_step():
    threshold = torch.ones(4)
    x = torch.tensor([-27.0, 27.0, -5.0, 0.0]) / 31  # levels -27, 27, -5, 0 at T = 5
    value, levels, _ = quantize(x, threshold, 5, "digits-1")
    assert levels.tolist() == [-16.0, 16.0, -4.0, 0.0]  # 32 is beyond T = 5's largest level, 31
    assert torch.equal(value, levels / 31)


def test_coarse_steps_drop_the_lowest_time_steps_and_modes_are_checked():
    threshold = torch.ones(3)
    x = torch.tensor([5.0, -9.0, 40.0]) / 31  # levels 5, -9, 31 at T = 5
    value, levels, steps = quantize(x, threshold, 5, "coarse-2")  # T = 3: 7 levels of 1/7
    assert steps == 3 and levels.tolist() == [1.0, -2.0, 7.0]  # round(5 x 7 / 31), round(9 x 7 / 31), clipped
    torch.testing.assert_close(value, levels / 7)
    assert site_modes("input=coarse-1,product=token-max") == ("coarse-1", "token-max")
    for bad in ("input=nope,product=static", "input=static", "input=static,product=static,x=1", "nonsense"):
        with pytest.raises(ValueError, match="variant|mode"):
            site_modes(bad)


def test_a_token_scale_composes_with_a_coarser_grid():
    threshold = torch.ones(3)
    x = torch.tensor([[0.1, -0.2, 0.4]])  # token-max: scale 0.4, so the token reads [0.25, -0.5, 1] of its range
    value, levels, _ = quantize(x, threshold, 5, "token-max+coarse-2")
    assert levels.tolist() == [[2.0, -4.0, 7.0]]  # the token's largest channel at the top of T = 3's range
    torch.testing.assert_close(value, levels * 0.4 / 7)


def test_a_power_of_two_token_scale_puts_the_largest_channel_in_the_top_half():
    threshold = torch.ones(3)
    x = torch.tensor([[0.1, -0.2, 0.3], [3.0, 0.5, 0.0]])  # largest ratios 0.3 and 3: scales 1/2 and 4
    value, levels, _ = quantize(x, threshold, 5, "token-pow2")
    assert levels[:, 0].tolist() == [6.0, 23.0]  # 0.1 / 0.5 x 31 = 6.2; 3 / 4 x 31 = 23.25
    torch.testing.assert_close(value, levels * torch.tensor([[0.5], [4.0]]) / 31)
    top = levels.abs().amax(-1)
    assert ((top >= 15) & (top <= 31)).all()


def test_float_weights_with_analog_sites_are_the_teacher(trial):
    teacher, _, quantized, state = trial
    ids = calibration_batches(1, seed=6)[0]
    with torch.no_grad():
        plain = teacher(input_ids=ids, use_cache=False).logits
        exact = Variant(quantized, state, "input=analog,product=analog,weights=float")(input_ids=ids, use_cache=False)
        folded = Variant(quantized, state, "input=analog,product=analog")(input_ids=ids, use_cache=False)
    torch.testing.assert_close(exact.logits, plain, rtol=1e-5, atol=1e-5)
    assert (folded.logits - plain).abs().max() > 1e-5  # the folded 8-bit weights are not the float ones
    with pytest.raises(ValueError, match="weights"):
        site_modes("input=static,product=static,weights=int4")


def test_scoring_reports_each_spiking_variants_events_and_zero_for_an_all_analog_one(trial):
    from benchmarks.quantizer_trial import score

    teacher, hybrid, _, _ = trial
    quantized, state = quantized_teacher(teacher, hybrid)
    names = ("static", "input=analog,product=analog", "w8a8")
    variants = {name: Variant(quantized, state, name) for name in names}
    ids = calibration_batches(2, seed=7)[0]
    totals, events = score(teacher, variants, state, ids, torch.full((ids.shape[0],), 100), 2)
    assert set(totals) == {"teacher", *names} and all(totals[n].tokens == ids[:, 1:].numel() for n in names)
    assert events["input=analog,product=analog"] == 0 and events["static"] > 0 and "w8a8" not in events


def test_pow2_weights_fold_only_each_steps_mantissa(trial):
    from benchmarks.quantizer_trial import TrialMLP

    _, _, quantized, _ = trial
    mlp = next(m for m in quantized.modules() if isinstance(m, TrialMLP))
    weight = mlp.float["down_proj"]
    step = mlp.thresholds["product"] / 31
    mantissa = step / torch.exp2(torch.floor(torch.log2(step)))
    assert ((mantissa >= 1) & (mantissa < 2)).all()
    from snn_research.hybrid.integer import quantize_weight

    grid = quantize_weight(weight * mantissa, 8).dequantized() / mantissa
    torch.testing.assert_close(mlp.pow2["down_proj"], grid)
    assert not torch.equal(mlp.pow2["down_proj"], mlp.folded["down_proj"])
    assert site_modes("input=static,product=static,weights=pow2") == ("static", "static")

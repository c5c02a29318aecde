"""Research operators against their analog references: stated bounds on random inputs, wiring on tiny models."""

import pytest
import torch
from conftest import tiny_model

from snn_research.research.operators import (
    FixedScaleNorm,
    ShiftNorm,
    calibrate_norm_scales,
    norm_paths,
    power_of_two_softmax,
    replace_norms,
    use_attention,
)


def test_power_of_two_softmax_is_within_its_bound_of_softmax():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 33, generator=generator) * 4
    x[0, 0, 5:] = float("-inf")  # a masked row
    exact, approx = torch.softmax(x, -1), power_of_two_softmax(x, -1)
    live = exact > 0
    ratio = approx[live] / exact[live]
    assert float(ratio.min()) >= 2 ** -1.5 - 1e-6 and float(ratio.max()) <= 2 ** 1.5 + 1e-6
    sums = approx.sum(-1)
    assert float(sums.min()) >= 2 ** -0.5 - 1e-6 and float(sums.max()) <= 2 ** 0.5 + 1e-6
    assert torch.all(approx[~live] == 0)
    # its values are powers of two: a shift, not an exponential
    mantissa, _ = torch.frexp(approx[live])
    assert torch.all(mantissa == 0.5)
    # and it is not softmax itself (the bound is not vacuous)
    assert float((ratio - 1).abs().max()) > 0.1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_research_attention_with_analog_softmax_is_the_models_own(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        use_attention(model, "analog")
        same = model(input_ids=ids, use_cache=False).logits
        use_attention(model, "power_of_two")
        shifted = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(same, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(shifted, reference, atol=1e-3)


@pytest.mark.parametrize("bits", [0, 2])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@torch.no_grad()
def test_shift_norm_is_the_analog_norm_times_a_factor_within_its_bound(family, bits):
    model = tiny_model(family)
    norms = [model.get_submodule(p) for p in norm_paths(model)]
    assert norms
    x = torch.randn(3, 7, norms[0].weight.shape[0]) * 3 + 0.5
    for norm in norms:
        if norm.weight.shape[0] != x.shape[-1]:
            continue  # per-head q/k norms: another width
        exact, shifted = norm(x), ShiftNorm(norm, fraction_bits=bits)(x)
        bias = norm.bias if getattr(norm, "bias", None) is not None else 0.0
        ratio = (shifted - bias) / (exact - bias)
        big = (exact - bias).abs() > 1e-3
        per_token = ratio[big]
        bound = 0.5 / 2 ** bits  # half a step of the exponent grid, in octaves
        assert float(per_token.min()) >= 2 ** -bound - 1e-4 and float(per_token.max()) <= 2 ** bound + 1e-4
        assert float((per_token - 1).abs().max()) > 2 ** (bound / 4) - 1  # it does round, on the scale of its grid


def test_fixed_scale_norm_equals_the_analog_norm_at_the_calibrated_scale_and_is_wired_everywhere():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    scales = calibrate_norm_scales(model, [ids])
    assert set(scales) == set(norm_paths(model)) and all(v > 0 for v in scales.values())
    norm = model.get_submodule(norm_paths(model)[0])
    x = torch.randn(1, 4, norm.weight.shape[0])
    rms = float(torch.sqrt(x.square().mean(-1) + norm.variance_epsilon)[0, 0])
    torch.testing.assert_close(FixedScaleNorm(norm, rms)(x)[0, 0], norm(x)[0, 0])
    count = replace_norms(model, "fixed", scales)
    assert count == len(scales)
    assert all(isinstance(model.get_submodule(p), FixedScaleNorm) for p in scales)
    with pytest.raises(ValueError, match="needs calibrated scales"):
        replace_norms(tiny_model("llama"), "fixed")


def test_the_trial_applies_every_step_in_order_and_refuses_unknown_parts():
    from benchmarks.full_spike_trial import apply

    from snn_research.models.hybrid_transformer import SpikingSite
    from snn_research.research.operators import ShiftNorm

    model = tiny_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(5))
    wrapped = apply(model, "attention+lm_head+softmax+shift_norm", calib)
    assert len(wrapped) == 2 * model.config.num_hidden_layers + 1  # qkv and o per block, the head once
    assert all(isinstance(w, SpikingSite) for w in wrapped)
    assert model.config._attn_implementation == "research_power_of_two"
    assert all(isinstance(model.get_submodule(p), ShiftNorm) for p in ("model.norm", "model.layers.0.input_layernorm"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib, use_cache=False).logits).all()
    with pytest.raises(ValueError, match="unknown parts"):
        apply(tiny_model("llama"), "attention+rotation", calib)


def test_the_trial_prices_each_variant_with_the_research_rules():
    from benchmarks.full_spike_trial import apply, energy_ratio

    from snn_research.evaluation.energy import measure_energy
    from snn_research.research.full_spike import ResearchStep, price_operators

    calib = torch.randint(0, tiny_model("llama").config.vocab_size, (4, 12),
                          generator=torch.Generator().manual_seed(5))
    ratios = {}
    for variant in ("none", "attention", "attention+lm_head+softmax", "fixed_norm"):
        model = tiny_model("llama")
        apply(model, variant, calib)
        ratios[variant], shares = energy_ratio(model, variant, calib[:1])
        assert sum(shares.values()) == pytest.approx(1.0)
        if variant == "none":
            assert 0 < shares["lm_head"] < 1
    assert ratios["none"] == pytest.approx(1.0)  # a teacher: nothing spikes
    assert ratios["attention"] < 1.0
    assert ratios["fixed_norm"] is None  # not priced
    model = tiny_model("llama")
    apply(model, "attention+lm_head+softmax", calib)
    report = measure_energy(model, calib[:1])
    step = ResearchStep(name="x", sites=["qkv", "o", "head"], softmax="power_of_two")
    assert ratios["attention+lm_head+softmax"] == pytest.approx(price_operators(report, model.config, step)
                                                                .model_energy_ratio)
    assert ratios["attention+lm_head+softmax"] != pytest.approx(report.model_energy_ratio)  # the softmax is priced

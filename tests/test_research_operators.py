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


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@torch.no_grad()
def test_shift_norm_is_the_analog_norm_times_a_factor_within_its_bound(family):
    model = tiny_model(family)
    norms = [model.get_submodule(p) for p in norm_paths(model)]
    assert norms
    x = torch.randn(3, 7, norms[0].weight.shape[0]) * 3 + 0.5
    for norm in norms:
        if norm.weight.shape[0] != x.shape[-1]:
            continue  # per-head q/k norms: another width
        exact, shifted = norm(x), ShiftNorm(norm)(x)
        bias = norm.bias if getattr(norm, "bias", None) is not None else 0.0
        ratio = (shifted - bias) / (exact - bias)
        big = (exact - bias).abs() > 1e-3
        per_token = ratio[big]
        assert float(per_token.min()) >= 2 ** -0.5 - 1e-4 and float(per_token.max()) <= 2 ** 0.5 + 1e-4
        assert float((per_token - 1).abs().max()) > 1e-3  # it does round


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


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_spiking_projections_quantise_their_inputs_within_one_level(family):
    from snn_research.research.spiking_projections import (
        SpikingInput,
        percentile_thresholds,
        projection_paths,
        spike_projections,
        spike_rate,
    )

    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    paths = projection_paths(model, ["attention", "lm_head"])
    assert len(paths) == 4 * model.config.num_hidden_layers + 1
    thresholds = percentile_thresholds(model, paths, [ids])
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        wrapped = spike_projections(model, thresholds, time_steps=5)
        spiking = model(input_ids=ids, use_cache=False).logits
    assert all(isinstance(model.get_submodule(p), SpikingInput) for p in paths)
    assert model.lm_head.linear.weight is model.get_input_embeddings().weight or not model.config.tie_word_embeddings
    assert 0 < spike_rate(wrapped) < 1
    assert not torch.allclose(spiking, reference, atol=1e-4)
    # each wrapped map sees its input clipped to the threshold and rounded to one of 2^T - 1 levels per sign
    x = torch.randn(3, wrapped[0].linear.in_features) * 2
    theta = wrapped[0].encoder.threshold
    decoded = wrapped[0].decoder(wrapped[0].encoder(x), theta, wrapped[0].encoder.levels)
    error = (decoded - x.clamp(-theta, theta)).abs()
    assert float((error / theta).max()) <= 1 / (2 ** 5 - 1) + 1e-6
    assert float(error.max()) > 0


def test_projection_sites_refuse_what_they_cannot_spike():
    from snn_research.research.spiking_projections import projection_paths

    with pytest.raises(ValueError, match="unknown sites"):
        projection_paths(tiny_model("llama"), ["softmax"])
    with pytest.raises(ValueError, match="c_attn"):
        projection_paths(tiny_model("gpt2"), ["attention"])


def test_the_trial_applies_every_step_in_order_and_refuses_unknown_parts():
    from benchmarks.full_spike_trial import apply

    from snn_research.research.operators import ShiftNorm
    from snn_research.research.spiking_projections import SpikingInput

    model = tiny_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(5))
    wrapped = apply(model, "attention+lm_head+softmax+shift_norm", calib)
    assert len(wrapped) == 4 * model.config.num_hidden_layers + 1
    assert all(isinstance(w, SpikingInput) for w in wrapped)
    assert model.config._attn_implementation == "research_power_of_two"
    assert all(isinstance(model.get_submodule(p), ShiftNorm) for p in ("model.norm", "model.layers.0.input_layernorm"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib, use_cache=False).logits).all()
    with pytest.raises(ValueError, match="unknown parts"):
        apply(tiny_model("llama"), "attention+rotation", calib)

import pytest
import torch
from conftest import calibration_batches, tiny_model

from snn_research.conversion.calibrator import Calibrator, StreamingPercentile


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, 100.0])
@pytest.mark.parametrize("bins_per_octave", [8, 32])
def test_streaming_percentile_within_documented_bound_of_exact(percentile, bins_per_octave):
    torch.manual_seed(0)
    # heavy-tailed channels of very different scales, fed in uneven batches
    data = torch.randn(20000, 6) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0, 1.0])
    data[:, 5] = torch.distributions.StudentT(2.0).sample((20000,))
    histogram = StreamingPercentile(6, bins_per_octave=bins_per_octave)
    for chunk in torch.split(data, [1, 999, 7000, 12000]):
        histogram.update(chunk.abs())
    exact = torch.quantile(data.abs().double(), percentile / 100, dim=0, interpolation="higher")
    estimate = histogram.per_channel(percentile)
    relative = ((estimate - exact) / exact).abs()
    assert (relative <= histogram.relative_error_bound).all(), (relative, histogram.relative_error_bound)
    layer_exact = torch.quantile(data.abs().double().flatten(), percentile / 100, interpolation="higher")
    assert abs(histogram.per_layer(percentile) - layer_exact) / layer_exact <= histogram.relative_error_bound


def test_histogram_memory_does_not_grow_with_tokens():
    histogram = StreamingPercentile(16)
    size = histogram.counts.numel()
    for _ in range(20):
        histogram.update(torch.randn(5000, 16).abs())
    assert histogram.counts.numel() == size and histogram.observed == 100000


def test_calibrator_covers_every_site_of_each_family(family):
    model = tiny_model(family)
    calibrator = Calibrator(model)
    tokens = calibrator.run(calibration_batches(3))
    calibrator.remove_hooks()
    result = calibrator.result(99.9)
    assert tokens == 3 * 2 * 24 and result.tokens == tokens
    expected_sites = {"gpt2": {"input", "hidden"}}.get(family, {"input", "product"})
    assert {site.site for site in result.sites.values()} == expected_sites
    assert len(result.sites) == 4
    for site in result.sites.values():
        assert site.values_per_channel == tokens
        assert (site.channel_thresholds > 0).all() and site.layer_threshold > 0
        assert site.channel_thresholds.max() <= site.maximum + 1e-6


def test_calibrator_thresholds_match_exact_percentiles_of_hooked_activations():
    model = tiny_model("llama")
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    calibrator = Calibrator(model)
    calibrator.run(calibration_batches(2))
    handle.remove()
    result = calibrator.result(99.0)
    values = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).abs().double()
    exact = torch.quantile(values, 0.99, dim=0, interpolation="higher")
    estimate = result.sites["model.layers.0.mlp:product"].channel_thresholds.double()
    assert (((estimate - exact) / exact).abs() <= result.relative_error_bound + 1e-6).all()


def test_a_pass_that_saw_no_tokens_is_refused():
    calibrator = Calibrator(tiny_model("gpt2"))
    calibrator.run([])
    with pytest.raises(ValueError, match="no tokens"):
        calibrator.result(99.9)


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5, float("nan")])
def test_percentile_outside_range_is_refused(percentile):
    calibrator = Calibrator(tiny_model("gpt2"))
    calibrator.run(calibration_batches(1))
    with pytest.raises(ValueError, match="percentile"):
        calibrator.result(percentile)

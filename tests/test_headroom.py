"""Headroom: extra high-order steps of the weighted code add range above the calibrated thresholds at the same step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_batches
from test_converter import converted
from test_threshold_search import _ffn_errors

from snn_research.config import ConversionParams, Params
from snn_research.conversion.ann_to_snn_converter import add_headroom, headroom_factor
from snn_research.hybrid.adapter import AnalogToSpikes, encoder_levels
from snn_research.models.hybrid_transformer import HybridPlan, spiking_units


def encoders(model) -> list[AnalogToSpikes]:
    return [m for unit in spiking_units(model) for m in unit.modules() if isinstance(m, AnalogToSpikes)]


def decoded(encoder: AnalogToSpikes, x: torch.Tensor) -> torch.Tensor:
    """The value the encoder's levels stand for, through its own forward and its step simulation (checked equal)."""
    with torch.no_grad():
        levels = encoder(x)
        train = encoder.spike_train(x)
    weights = encoder.step_weights().to(train.dtype).reshape(-1, *[1] * x.dim())
    assert torch.equal((train * weights).sum(0), levels)
    return levels * encoder.threshold.detach() / encoder.levels


@pytest.fixture(scope="module")
def pair():
    teacher, base, _, _ = converted("llama", HybridPlan(time_steps=4, encoder="weighted"))
    wide = copy.deepcopy(base)
    assert add_headroom(wide, 3) == 7
    return teacher, base, wide


def test_headroom_grows_thresholds_by_the_factor_and_t_by_h(pair):
    _, base, wide = pair
    assert headroom_factor(7, 3) == pytest.approx(127 / 15)
    for a, b in zip(encoders(base), encoders(wide)):
        assert (a.time_steps, b.time_steps) == (4, 7)
        torch.testing.assert_close(b.threshold, a.threshold * 127 / 15, rtol=1e-6, atol=0)
    assert {u.plan_time_steps for u in spiking_units(wide)} == {7}


def test_values_within_the_old_threshold_keep_their_level_and_values_beyond_it_are_no_longer_clipped(pair):
    _, base, wide = pair
    generator = torch.Generator().manual_seed(0)
    for a, b in zip(encoders(base), encoders(wide)):
        threshold = a.threshold.detach()
        inside = (torch.rand(512, a.channels, generator=generator) * 2 - 1) * threshold * 0.999
        step = threshold / encoder_levels("weighted", 4)
        same = decoded(a, inside), decoded(b, inside)
        # the same grid: equal levels except where float rounding sits on a level's edge
        assert (same[0] - same[1]).abs().le(step * 1e-3).float().mean() > 0.999
        assert (same[0] - same[1]).abs().le(step * 1.001).all()
        beyond = threshold * (1.5 + 4 * torch.rand(512, a.channels, generator=generator))
        assert torch.allclose(decoded(a, beyond), threshold.expand_as(beyond))  # the old code clips at its threshold
        assert (decoded(b, beyond) - beyond).abs().le(step * 0.5001).all()  # headroom reaches them at the same step


def test_headroom_lowers_the_ffn_error_where_the_calibration_clipped(pair):
    teacher, base, wide = pair
    batches = calibration_batches(3, seed=9)
    before, after = _ffn_errors(teacher, base, batches), _ffn_errors(teacher, wide, batches)
    assert sum(after.values()) < sum(before.values())


def test_headroom_is_refused_where_it_does_nothing():
    with pytest.raises(ValueError, match="headroom_steps"):
        ConversionParams(encoder="if", time_steps=8, headroom_steps=2)
    with pytest.raises(ValueError, match="at least one step"):
        ConversionParams(encoder="weighted", time_steps=3, headroom_steps=3)
    with pytest.raises(ValueError, match="curriculum"):
        Params.model_validate({"convert": {"encoder": "weighted", "time_steps": 8, "headroom_steps": 3},
                               "distill": {"curriculum": {"start_time_steps": 10}}})
    plan = ConversionParams(encoder="weighted", time_steps=8, headroom_steps=3)
    assert plan.plan().time_steps == 8 and plan.calibration_plan().time_steps == 5


def test_the_convert_stage_searches_at_the_base_t_and_writes_the_hybrid_with_headroom(tmp_path):
    import json

    from pipeline_support import prepare, set_dotted, tiny_params

    from snn_research.conversion.ann_to_snn_converter import load_hybrid

    stages = ("download-teacher", "split", "calibrate", "convert")
    plain = {"distill.curriculum.start_time_steps": None}  # a T curriculum and headroom exclude each other
    wide = prepare(tmp_path / "wide", set_dotted(tiny_params(), {**plain, "convert.headroom_steps": 2}), stages)
    meta = json.loads((wide / "reports" / "conversion_metadata.json").read_text())
    assert meta["headroom_steps"] == 2 and meta["plan"]["time_steps"] == 5
    assert {site["time_steps"] for site in meta["sites"]} == {5}
    new = load_hybrid(wide / "models" / "converted")
    # the thresholds (and the search's choices) are a T = 3 conversion's, times the factor, at T = 5
    three = prepare(tmp_path / "three", set_dotted(tiny_params(), {**plain, "convert.time_steps": 3}), stages)
    assert json.loads((three / "reports" / "conversion_metadata.json").read_text())["clipping"] == meta["clipping"]
    pairs = list(zip(encoders(load_hybrid(three / "models" / "converted")), encoders(new)))
    assert len(pairs) == 4
    for a, b in pairs:
        assert (a.time_steps, b.time_steps) == (3, 5)
        torch.testing.assert_close(b.threshold, a.threshold * headroom_factor(5, 2), rtol=1e-6, atol=0)

"""The scaling benchmark's model shapes and its ratios (the run itself is `make bench-scale`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM

from benchmarks.scale import SIZES, add_ratios, data_knobs, gemma3_config, table


@pytest.mark.parametrize("size,nominal", [("100m", 100e6), ("270m", 270e6), ("1b", 1e9)])
def test_each_size_has_about_its_nominal_parameter_count(size, nominal):
    with torch.device("meta"):
        model = Gemma3ForCausalLM(gemma3_config(size))
    count = sum(p.numel() for p in model.parameters())
    assert 0.85 * nominal <= count <= 1.15 * nominal, count
    assert model.config.vocab_size == 262144 and model.config.tie_word_embeddings


def test_the_270m_and_1b_shapes_are_the_released_models():
    assert (SIZES["270m"]["hidden_size"], SIZES["270m"]["intermediate_size"], SIZES["270m"]["num_hidden_layers"]) \
        == (640, 2048, 18)
    assert (SIZES["1b"]["hidden_size"], SIZES["1b"]["intermediate_size"], SIZES["1b"]["num_hidden_layers"]) \
        == (1152, 6912, 26)
    assert [t for t in gemma3_config("1b").layer_types].count("full_attention") == 4  # every 6th of 26


def test_data_scale_doubles_every_data_knob():
    one, two = data_knobs(1), data_knobs(2)
    assert set(one) == set(two) and all(two[key] == 2 * one[key] for key in one)


def test_ratios_are_taken_against_the_smaller_size_and_the_first_scale():
    def r(size, scale, seconds, peak):
        return {"size": size, "params_m": 1.0, "scale": scale, "stage": "evaluate", "seconds": seconds,
                "peak_gib": peak, "peak_over_fp32": 1.0, "failure": ""}

    rows = [r("100m", 1, 10.0, 2.0), r("100m", 2, 15.0, 2.2), r("1b", 1, 40.0, 8.0), r("1b", 2, 90.0, 8.0)]
    add_ratios(rows, ["100m", "1b"], [1, 2])
    assert rows[1]["seconds_vs_scale1"] == 1.5 and rows[1]["peak_vs_scale1"] == 1.1
    assert rows[2]["seconds_vs_smaller"] == 4.0 and rows[2]["peak_vs_smaller"] == 4.0
    assert rows[3]["seconds_vs_smaller"] == 6.0 and rows[3]["seconds_vs_scale1"] == 2.25
    assert rows[0]["seconds_vs_smaller"] is None and rows[0]["seconds_vs_scale1"] is None
    assert "| 1b | 1.0 | 2 | evaluate | 90.0 | 8.0 | 1.0 | 6.0 | 3.64 | 2.25 | 1.0 |" in table(rows)


def test_the_stage_params_validate_with_the_benchmarks_knobs_and_the_users():
    import yaml

    from benchmarks.scale import ROOT, stage_params
    from snn_research.config import Params

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = Params.model_validate(stage_params(base, Path("/models/x"), 2, ["distill.batch_size=1"]))
    assert params.teacher.source == "path:/models/x" and params.evaluate.registry.name is None
    assert params.evaluate.max_blocks == 8 and params.calibrate.max_blocks == 16 and params.distill.steps == 1
    assert params.distill.batch_size == 1 and not params.tracking.enabled and params.device == "cpu"
    assert base["distill"]["steps"] == 20  # the base is left as it was

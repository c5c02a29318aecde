"""The research track's steps (research/full_spike.py) on a tiny Gemma 3 pipeline, and their energy pricing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import calibration_batches, tiny_model
from matplotlib.image import imread
from pipeline_support import assert_clean_failure, inside, invoke, run_stages, saved_figures, tiny_params, write_params
from test_generate import TOKENIZER, teacher_and_hybrid

from snn_research.config import Params
from snn_research.data import load_blocks
from snn_research.evaluation.energy import measure_energy
from snn_research.research import full_spike
from snn_research.research.full_spike import (
    SOFTMAX_ACS_PER_SCORE,
    ResearchStep,
    apply_operators,
    price_operators,
    softmax_scores_per_token,
)
from snn_research.research.operators import ShiftNorm
from snn_research.teacher import load_teacher

STEPS = [
    {"name": "FFN", "sites": ["ffn"]},
    {"name": "+ q/k/v/o", "sites": ["ffn", "qkv", "o"]},
    {"name": "+ LM head", "sites": ["ffn", "qkv", "o", "head"]},
    {"name": "+ power-of-two softmax", "sites": ["ffn", "qkv", "o", "head"], "softmax": "power_of_two"},
    {"name": "+ shift norm", "sites": ["ffn", "qkv", "o", "head"], "softmax": "power_of_two", "norm": "shift",
     "norm_fraction_bits": 2},
]


def research_params() -> dict:
    # a checkpoint at every step: a completed step must leave none behind
    return tiny_params(energy__ffn_budget=None, distill__steps=2, distill__eval_every=1, distill__ffn_mse_weight=0.0,
                       distill__checkpoint_every=1)


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("research")
    with inside(folder):
        write_params(research_params())
        Path("research.yaml").write_text(yaml.safe_dump({"steps": STEPS}, sort_keys=False))
        run_stages("download-teacher", "split")
        for index in range(len(STEPS)):
            result = invoke("research-step", str(index))
            assert result.exit_code == 0, result.output
        result = invoke("research-report")
        assert result.exit_code == 0, result.output
    return folder


def test_every_step_is_measured_and_the_report_tabulates_them(stepped):
    rows = list(csv.DictReader((stepped / "reports/research/steps.csv").open()))
    assert [row["name"] for row in rows] == [step["name"] for step in STEPS]
    assert imread(stepped / "reports/research/steps.png").shape == (504, 768, 4)  # 6.4 x 4.2 in at 120 dpi
    table = (stepped / "reports/research/steps.md").read_text()
    assert table.count("\n| ") == 1 + len(STEPS)
    results = [json.loads((stepped / f"reports/research/step_{i}.json").read_text()) for i in range(len(STEPS))]
    assert set(results[0]["spike_rates"]) == {"ffn"}
    assert set(results[2]["spike_rates"]) == {"ffn", "qkv", "o", "head"}
    assert all(0 < rate < 1 for r in results for rate in r["spike_rates"].values())
    assert results[2]["model_energy_ratio_int8"] is not None and results[3]["model_energy_ratio_int8"] is None
    assert results[0]["teacher_ppl"] == results[4]["teacher_ppl"]  # one teacher, the same test blocks
    assert rows[1]["spike_rate_new"] and not rows[3]["spike_rate_new"]  # step 3 adds no site
    assert all(isinstance(r["layerwise_kept"], bool) for r in results)  # layer-wise is on in these params
    for row, result in zip(rows, results, strict=True):  # the table holds each step's figures (6 digits)
        for key in ("ppl", "ppl_ratio_to_teacher", "model_energy_ratio", "ffn_energy_ratio", "val_kl_after"):
            assert float(row[key]) == pytest.approx(result[key], rel=1e-5), (row["name"], key)


def teacher_macs(config, length: int) -> dict[str, float]:
    """Per token, by hand from a Gemma 3 config with the rules of ``evaluation/energy.py``, the MACs of each part
    of the teacher on ``length``-token blocks (no biases: no ACs)."""
    d, f, vocab, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert config.sliding_window >= length  # every layer attends to all earlier positions
    keys = (length + 1) / 2  # the mean over positions 1..L of the keys a query sees
    return {
        "attention_projections": layers * (d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d),
        "ffn": layers * (3 * d * f + 2 * f),  # gate, up, down; SiLU and the gating multiply per channel
        # scores and values over head_dim, the softmax once per score
        "attention_scores_values": layers * (2 * heads * head_dim + heads) * keys,
        # two per element: four hidden-size norms and the q and k norms per head in a layer, the final norm
        "norms": 2 * (layers * (4 * d + heads * head_dim + kv_heads * head_dim) + d),
        "lm_head": d * vocab,
    }


def site_shapes(config) -> dict[str, tuple[int, int, int]]:
    """Per site group outside the FFN: (sites, neurons per site, fan-out of each spike)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    return {"qkv": (layers, d, (heads + 2 * kv_heads) * head_dim), "o": (layers, heads * head_dim, d),
            "head": (1, d, config.vocab_size)}


def test_a_step_that_spikes_more_saves_more_of_the_model(stepped):
    """Each step's model energy ratio counted by hand from the teacher's shape, the step's FFN ratio and the
    spike rates it measured at its other sites: the teacher's cost, less the FFNs' saving, less each site's
    analog MACs, plus what the site costs spiking (weighted code: per spike one AC per synapse; per step one
    AC per neuron and one accumulator shift per receiving neuron; one MAC per decoded output)."""
    params = yaml.safe_load((stepped / "params.yaml").read_text())
    assert params["convert"]["encoder"] == "weighted"
    e_mac, e_ac = params["energy"]["e_mac_pj"], params["energy"]["e_ac_pj"]
    teacher, _ = load_teacher(stepped / "models/teacher")
    macs = teacher_macs(teacher.config, load_blocks(stepped / "data/splits", "test").input_ids.shape[1])
    teacher_pj = sum(macs.values()) * e_mac
    shapes = site_shapes(teacher.config)
    results = [json.loads((stepped / f"reports/research/step_{i}.json").read_text()) for i in range(3)]
    model = [r["model_energy_ratio"] for r in results]
    assert model[0] > model[1] > model[2]  # each step that adds spiking sites costs less of the teacher
    for result in results:
        saving = macs["ffn"] * e_mac * (1 - result["ffn_energy_ratio"])
        time_steps = result["time_steps"]
        for group in set(result["spike_rates"]) - {"ffn"}:
            sites, neurons, fan_out = shapes[group]
            spikes = result["spike_rates"][group] * neurons * time_steps
            spiking = fan_out * e_mac + (spikes * fan_out + neurons * time_steps + fan_out * time_steps) * e_ac
            saving += sites * (neurons * fan_out * e_mac - spiking)
        assert result["model_energy_ratio"] == pytest.approx(1 - saving / teacher_pj, rel=1e-9), result["step"]


def test_the_plot_draws_each_steps_energy_against_its_perplexity(stepped, tmp_path):
    with inside(tmp_path), saved_figures() as figures:
        Path("reports/research").mkdir(parents=True)
        for i in range(len(STEPS)):
            (Path("reports/research") / f"step_{i}.json").write_text(
                (stepped / f"reports/research/step_{i}.json").read_text())
        Path("research.yaml").write_text((stepped / "research.yaml").read_text())
        result = invoke("research-report")
    assert result.exit_code == 0, result.output
    results = [json.loads((stepped / f"reports/research/step_{i}.json").read_text()) for i in range(len(STEPS))]
    [figure] = figures
    (_, xs, ys), (_, _, reference) = figure["lines"]  # the steps, and the teacher's level
    assert xs == [r["model_energy_ratio"] for r in results]
    assert ys == [r["ppl_ratio_to_teacher"] for r in results]
    assert reference == [1.0, 1.0]
    assert figure["texts"] == [f"{i}: {step['name']}" for i, step in enumerate(STEPS)]
    assert imread(tmp_path / "reports/research/steps.png").shape == (*figure["pixels"], 4)


@pytest.mark.parametrize("damage", [True, False])
def test_a_layerwise_result_that_worsens_validation_is_dropped(monkeypatch, tmp_path, damage):
    teacher, hybrid = teacher_and_hybrid("llama", sites=("ffn", "qkv"))
    converted = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    calls = []

    def fake_layerwise(teacher, model, blocks, *args, **kwargs):  # damaged: every consumer weight scrambled
        calls.append(blocks.shape)
        if damage:
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() == 2:
                        param.add_(torch.randn_like(param))

    monkeypatch.setattr(full_spike, "layerwise_distill", fake_layerwise)
    params = Params.model_validate(research_params() | {"distill": {**research_params()["distill"], "steps": 0}})
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, len(TOKENIZER), (4, 24), generator=generator)
    recovery = full_spike._recover(teacher, hybrid, params, SimpleNamespace(input_ids=ids[:2]), [ids[2:]],
                                   tmp_path, "fp", None)
    assert calls == [(2, 24)]
    assert recovery.layerwise_kept is (not damage)
    assert recovery.val_kl_before == recovery.val_kl_converted == recovery.val_kl_after
    state = hybrid.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in converted.items())  # restored, or untouched


def test_the_report_refuses_a_result_made_for_another_step(stepped, tmp_path):
    with inside(tmp_path):
        Path("reports/research").mkdir(parents=True)
        for i in range(len(STEPS)):
            (Path("reports/research") / f"step_{i}.json").write_text(
                (stepped / f"reports/research/step_{i}.json").read_text())
        swapped = [STEPS[1], STEPS[0], *STEPS[2:]]
        Path("research.yaml").write_text(yaml.safe_dump({"steps": swapped}))
        result = invoke("research-report")
    assert result.exit_code == 1 and "made for another step" in result.output


def test_price_operators_changes_exactly_the_replaced_operators():
    model = tiny_model("llama")
    input_ids = calibration_batches(1)[0]
    report = measure_energy(model, input_ids)
    softmax = ResearchStep(name="s", sites=["ffn"], softmax="power_of_two")
    priced = price_operators(report, model.config, softmax)
    scores = softmax_scores_per_token(model.config, input_ids.shape[1])
    # by hand: 4 heads x mean keys (1..24 -> 12.5) x 2 layers
    assert scores == pytest.approx(4 * 12.5 * 2)
    expected = scores * (SOFTMAX_ACS_PER_SCORE * report.e_ac_pj - report.e_mac_pj)
    assert priced.hybrid_energy_pj - report.hybrid_energy_pj == pytest.approx(expected, rel=1e-9)
    assert priced.teacher_energy_pj == report.teacher_energy_pj
    norm = ResearchStep(name="n", sites=["ffn"], norm="shift", norm_fraction_bits=3)
    elements = report.hybrid_ops["norms"][0] / 2
    priced = price_operators(report, model.config, norm)
    assert priced.hybrid_ops["norms"] == (pytest.approx(elements), pytest.approx(4 * elements))
    assert report.hybrid_ops["norms"] == (2 * elements, 0.0)  # the report itself is left as it was


def test_operators_are_swapped_in_and_a_layernorm_model_is_refused():
    model = tiny_model("llama")
    apply_operators(model, ResearchStep(name="x", sites=["ffn"], softmax="power_of_two", norm="shift",
                                        norm_fraction_bits=1))
    assert model.config._attn_implementation == "research_power_of_two"
    assert isinstance(model.model.norm, ShiftNorm) and model.model.norm.fraction_bits == 1
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calibration_batches(1)[0]).logits).all()
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_operators(tiny_model("gpt2"), ResearchStep(name="x", sites=["ffn"], norm="shift"))
    with pytest.raises(ValueError, match="norm_fraction_bits"):
        ResearchStep(name="x", sites=["ffn"], norm_fraction_bits=2)


def test_research_step_refuses_what_it_would_ignore(workdir):
    write_params(tiny_params())  # the smoke params keep energy.ffn_budget
    Path("research.yaml").write_text(yaml.safe_dump({"steps": STEPS[:1]}))
    result = invoke("research-step", "0")
    assert_clean_failure(result, 2)
    assert "energy.ffn_budget" in result.output
    write_params(research_params())
    assert_clean_failure(invoke("research-step", "3"), 2)  # no step 3 in this plan
    Path("research.yaml").write_text(yaml.safe_dump({"steps": [{"name": "x", "sites": ["softmax"]}]}))
    result = invoke("research-step", "0")
    assert_clean_failure(result, 2)
    assert "research.yaml" in result.output and "sites" in result.output


def test_a_completed_step_leaves_no_resumable_state(stepped):
    """A step's recovery checkpoints serve a killed run only: once its JSON is written they are removed, so a
    pipeline of many steps does not keep a model's worth of training state per step on disk."""
    assert all((stepped / f"reports/research/step_{i}.json").is_file() for i in range(len(STEPS)))
    left = sorted(str(p.relative_to(stepped)) for p in stepped.rglob("research_step_*"))
    assert left == []

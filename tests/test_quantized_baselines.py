"""The quantised ANN baselines: W8A8 within its error bound, and the hybrid's quantiser equal to the hybrid."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_batches
from test_converter import converted
from torch import nn

from snn_research.evaluation.quantized import QuantizedLinear, quantize_per_token, quantize_weight, quantized_ann
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps


def test_weights_sit_on_a_per_channel_integer_grid():
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    quantized = quantize_weight(weight, 8)
    scale = weight.abs().amax(1, keepdim=True) / 127
    steps = quantized / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # integers times the channel's scale
    assert torch.allclose(steps.abs().amax(1), torch.full((6,), 127.0))  # each channel's largest weight is +-127
    assert (quantized - weight).abs().le(scale / 2 + 1e-7).all()


def test_a_w8a8_linear_stays_within_its_error_bound():
    """|W_q x_q - W x| <= |W_q - W| |x_q| + |W| |x_q - x|, term by term, with both errors at most half a step."""
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 8)
    x = torch.randn(5, 32, generator=generator) * torch.linspace(0.1, 4, 32)
    layer = QuantizedLinear(linear, 8, "per_token")
    x_q = quantize_per_token(x)
    w, w_q = linear.weight.detach(), layer.weight
    assert (x_q - x).abs().le(x.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6).all()
    bound = (w_q - w).abs() @ x_q.abs().t() + w.abs() @ (x_q - x).abs().t()
    error = (layer(x) - linear(x)).abs().t()
    assert (error <= bound + 1e-5).all()
    assert error.max() > 0  # it does quantise


def test_the_hybrids_quantiser_with_float_weights_is_the_hybrid(family):
    if family == "gpt2":
        pytest.skip("the W8Ab baseline is built for gated FFNs (the weighted code)")
    teacher, hybrid, _, _ = converted(family, HybridPlan(time_steps=4, encoder="weighted"))
    ann = quantized_ann(teacher, "w8ab", hybrid, weight_bits=None)
    ids = calibration_batches(2, seed=4)[0]
    with torch.no_grad():
        expected = hybrid(input_ids=ids, use_cache=False).logits
        got = ann(input_ids=ids, use_cache=False).logits
        plain = teacher(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the check can tell the hybrid from the teacher
    # with 8-bit weights it moves, but stays near the hybrid
    w8 = quantized_ann(teacher, "w8ab", hybrid)(input_ids=ids, use_cache=False).logits.detach()
    assert 0 < (w8 - expected).abs().max() < (plain - expected).abs().max() * 5


def test_w8a8_quantises_every_ffn_and_only_the_ffns(family):
    teacher, hybrid, _, _ = converted(family, HybridPlan(time_steps=4, encoder="weighted" if family != "gpt2" else "if"))
    ann = quantized_ann(teacher, "w8a8", hybrid)
    quantized = [name for name, module in ann.named_modules() if isinstance(module, QuantizedLinear)]
    assert len(quantized) == (6 if family != "gpt2" else 4) and all(".mlp." in name for name in quantized)
    assert not any(isinstance(m, QuantizedLinear) for m in teacher.modules())  # the teacher is untouched


def test_w8ab_needs_the_weighted_hybrid():
    teacher, hybrid, _, _ = converted("llama", HybridPlan(time_steps=4, encoder="if"))
    with pytest.raises(ValueError, match="weighted code"):
        quantized_ann(teacher, "w8ab", hybrid)
    with pytest.raises(ValueError, match="needs the converted hybrid"):
        quantized_ann(teacher, "w8ab", None)


def test_the_folded_float_weight_is_the_integer_linear_on_the_same_levels():
    """decoded levels x W_eff (the training path) equals levels x integer weights x scales (the kernel's)."""
    from snn_research.hybrid.integer import float_reference, fold_quantize, quantize_spiking_linear

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 32, generator=generator)
    threshold = torch.rand(32, generator=generator) * 3 + 0.3
    time_steps = 5
    step = threshold / (2 ** time_steps - 1)
    levels = torch.randint(-31, 32, (7, 32), generator=generator).to(torch.float32)
    for bits, group in ((8, None), (4, None), (4, 8)):
        float_path = (levels.double() * step.double()) @ fold_quantize(weight.double(), step.double(), bits, group).t()
        integer = float_reference(levels, quantize_spiking_linear(weight, threshold, time_steps, bits, group))
        torch.testing.assert_close(float_path.float(), integer, rtol=1e-5, atol=1e-6)
        assert (fold_quantize(weight, step, bits, group) - weight).abs().max() > 0  # it does quantise


def test_a_hybrid_with_8_bit_weights_is_the_w8ab_teacher():
    import copy

    teacher, hybrid, _, _ = converted("llama", HybridPlan(time_steps=4, encoder="weighted"))
    integer = copy.deepcopy(hybrid)
    for unit in spiking_mlps(integer):
        unit.weight_bits = 8
    ids = calibration_batches(2, seed=4)[0]
    with torch.no_grad():
        got = integer(input_ids=ids, use_cache=False).logits
        expected = quantized_ann(teacher, "w8ab", hybrid)(input_ids=ids, use_cache=False).logits
        float_hybrid = hybrid(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - float_hybrid).abs().max() > 1e-4  # the weights are quantised
    # the step-by-step simulation uses the same integer weights
    x = torch.randn(2, 5, teacher.config.hidden_size, generator=torch.Generator().manual_seed(8))
    unit = next(iter(spiking_mlps(integer)))
    with torch.no_grad():
        torch.testing.assert_close(unit.forward_per_step(x), unit(x), rtol=1e-4, atol=1e-5)


def test_the_convert_stage_writes_an_integer_weight_hybrid_that_reloads(tmp_path):
    import json

    from pipeline_support import prepare, set_dotted, tiny_params

    from snn_research.conversion.ann_to_snn_converter import load_hybrid
    from snn_research.data import load_blocks

    folder = prepare(tmp_path / "p", set_dotted(tiny_params(), {"convert.weight_bits": 8}),
                     ("download-teacher", "split", "calibrate", "convert"))
    meta = json.loads((folder / "reports" / "conversion_metadata.json").read_text())
    assert meta["plan"]["weight_bits"] == 8
    hybrid = load_hybrid(folder / "models" / "converted")
    assert {unit.weight_bits for unit in spiking_mlps(hybrid)} == {8}
    ids = load_blocks(folder / "data" / "splits", "test").input_ids[:2]
    again = load_hybrid(folder / "models" / "converted")
    with torch.no_grad():
        torch.testing.assert_close(hybrid(input_ids=ids).logits, again(input_ids=ids).logits, rtol=0, atol=0)
    # the stored integers differ from the teacher's float weights: the folder holds the quantised model
    from snn_research.teacher import load_teacher

    teacher, _ = load_teacher(folder / "models" / "teacher")
    unit = next(iter(spiking_mlps(again)))
    original = dict(teacher.named_parameters())[f"{unit.path}.gate_proj.weight"]
    assert (unit.gate_proj.weight - original).abs().max() > 0
    torch.testing.assert_close(unit.gate_proj.weight, original, rtol=0, atol=float(original.abs().max()) / 127)


def test_integer_weights_are_refused_where_they_are_not_built():
    plan = HybridPlan(time_steps=4, encoder="if", weight_bits=8)
    assert [c[0] for c in plan.family_conflicts("gpt2")] == ["weight_bits"]
    assert [c[0] for c in HybridPlan(sites=["ffn", "qkv"], weight_bits=8).family_conflicts("gated")] == ["weight_bits"]
    assert HybridPlan(time_steps=4, encoder="weighted", weight_bits=4, weight_group=64).family_conflicts("gated") == []
    with pytest.raises(ValueError, match="weight_group applies with weight_bits only"):
        HybridPlan(weight_group=64)


def test_integer_energy_matches_a_hand_count_on_one_layer():
    """One gated FFN (hidden 32, intermediate 64, T = 4, weighted code, 8-bit weights), counted by hand."""
    import math

    from snn_research.evaluation.baselines import Prices, integer_compare
    from snn_research.evaluation.energy import measure_energy

    teacher, hybrid, _, _ = converted("llama", HybridPlan(time_steps=4, encoder="weighted", layers=[0], weight_bits=8))
    report = measure_energy(hybrid, calibration_batches(1, seed=6)[0])
    (block,) = [b for b in report.blocks if b.ffn]
    k_in, k_prod = block.spikes_per_token["input"], block.spikes_per_token["product"]
    assert k_in > 0 and k_prod > 0
    hidden, inter, steps = 32, 64, 4
    # both sides: quantise 32 + 64 inputs, scale back 128 + 32 outputs, 2 x 64 activation and gating multiplies
    shared = (32 + 64 + 128 + 32 + 128) * 4.6
    hybrid_pj = shared + 0.1 * (k_in * 128 + k_prod * 32  # an int32 accumulate per synaptic event
                                + (32 + 64) * steps  # the encoders' per-step integrations
                                + (128 + 32) * steps)  # the receiving accumulators' per-step shifts
    w8a8_pj = shared + (32 * 128 + 64 * 32) * (0.2 + 0.1)
    w8ab_pj = shared + (32 * 128 + 64 * 32) * (0.2 * 5 / 8 + 0.1)  # 15 levels a sign: 5-bit activations
    attention = report.hybrid_ops  # the shared parts, on the INT8 table, on both sides of the model ratio
    shared_model = sum(m * 0.23 + a * 0.1 for name, (m, a) in attention.items()
                       if not name.startswith(("ffn_", "proj_")) or name.split("_", 1)[1] not in
                       ("synaptic", "neurons", "step_weights", "spiking_analog", "dense"))
    shared_ffn = sum(m * 0.23 + a * 0.1 for name, (m, a) in attention.items()
                     if name.startswith("ffn") and name.split("_", 1)[1] not in
                     ("synaptic", "neurons", "step_weights", "spiking_analog", "dense"))
    got = integer_compare(report, Prices())
    assert math.isclose(got["ffn_energy_ratio_w8a8"], (hybrid_pj + shared_ffn) / (w8a8_pj + shared_ffn), rel_tol=1e-9)
    assert math.isclose(got["ffn_energy_ratio_w8ab"], (hybrid_pj + shared_ffn) / (w8ab_pj + shared_ffn), rel_tol=1e-9)
    assert math.isclose(got["model_energy_ratio_w8a8"], (hybrid_pj + shared_model) / (w8a8_pj + shared_model),
                        rel_tol=1e-9)
    assert math.isclose(got["synaptic_events_per_synapse"], (k_in * 128 + k_prod * 32) / (32 * 128 + 64 * 32),
                        rel_tol=1e-12)
    no_spike = shared + 0.1 * ((32 + 64) * steps + (128 + 32) * steps)
    rate = (w8a8_pj - no_spike) / (steps * (32 * 128 + 64 * 32) * 0.1)
    assert math.isclose(got["break_even_spike_rate_w8a8"], rate, rel_tol=1e-9)
    assert (hidden, inter) == (teacher.config.hidden_size, teacher.config.intermediate_size)
    assert not any(key.startswith("ffn_memory_ratio_w8a8") for key in got)  # no read batches asked for

    # weight reads: the levels each encoder hands its consumers, caught at the encoders themselves
    from snn_research.hybrid.adapter import AnalogToSpikes

    ids = torch.cat(calibration_batches(2, seed=6))  # 4 sequences
    caught = {}
    unit = next(iter(spiking_mlps(hybrid)))
    hooks = [getattr(unit, f"{site}_encoder").register_forward_hook(
        lambda _m, _i, out, site=site: caught.__setitem__(site, out.detach())) for site in ("input", "product")]
    report = measure_energy(hybrid, ids, read_batches=(1, 2))
    for hook in hooks:
        hook.remove()
    assert all(isinstance(m, AnalogToSpikes) for m in (unit.input_encoder, unit.product_encoder))
    fired = {site: levels != 0 for site, levels in caught.items()}  # (4, 24, C)
    active = {(site, 1): float(f.float().mean()) for site, f in fired.items()}
    # batches of 2: sequences 0 and 1, and 2 and 3, a weight column read when either input spiked
    active.update({(site, 2): float(torch.stack([f[0] | f[1], f[2] | f[3]]).float().mean()) for site, f in fired.items()})
    assert 0 < active[("product", 1)] < active[("product", 2)] <= 1
    got = integer_compare(report, Prices())
    k_in, k_prod = (next(b for b in report.blocks if b.ffn).spikes_per_token[s] for s in ("input", "product"))
    hybrid_pj = shared + 0.1 * (k_in * 128 + k_prod * 32 + (32 + 64) * steps + (128 + 32) * steps)
    for batch in (1, 2):
        read = (32 * 128 * active[("input", batch)] + 64 * 32 * active[("product", batch)]) / batch
        dense = (32 * 128 + 64 * 32) / batch
        expected = (hybrid_pj + shared_ffn + read * 1.25) / (w8a8_pj + shared_ffn + dense * 1.25)
        key = "ffn_memory_ratio_w8a8_batch1" if batch == 1 else "ffn_memory_ratio_w8a8_read_batch"
        assert math.isclose(got[key], expected, rel_tol=1e-6), batch
    assert got["read_batch"] == 2
    silent = 1 - (32 * 128 * active[("input", 1)] + 64 * 32 * active[("product", 1)]) / (32 * 128 + 64 * 32)
    assert math.isclose(got["silent_input_fraction"], silent, rel_tol=1e-6)
    # a float-weight hybrid gets no integer figures
    _, float_hybrid, _, _ = converted("llama", HybridPlan(time_steps=4, encoder="weighted", layers=[0]))
    assert integer_compare(measure_energy(float_hybrid, calibration_batches(1, seed=6)[0]), Prices()) == {}


def test_evaluate_writes_the_integer_figures_for_an_integer_hybrid_only(tmp_path):
    import json

    from pipeline_support import inside, run_stages, set_dotted, tiny_params, write_params

    quick = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 2, "finetune.steps": 2,
             "distill.eval_every": 1, "finetune.eval_every": 1, "evaluate.max_blocks": 2}
    folder = tmp_path / "p"
    folder.mkdir()
    with inside(folder):
        write_params(set_dotted(tiny_params(), {**quick, "convert.weight_bits": 8}))
        results = run_stages("download-teacher", "split", "calibrate", "convert", "distill", "finetune",
                             "finetune-teacher", "evaluate", "report")
    assert all(r.exit_code == 0 for r in results.values()), {k: r.output[-1500:] for k, r in results.items()}
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    summary = (folder / "reports" / "evaluation" / "summary.md").read_text()
    page = (folder / "reports" / "report.html").read_text()
    for name in ("converted", "distilled", "finetuned"):
        row = metrics[name]
        assert 0 < row["ffn_energy_ratio_w8a8"] and 0 < row["synaptic_events_per_synapse"]
        assert row["ffn_energy_ratio_w8ab"] > row["ffn_energy_ratio_w8a8"]  # the b-bit ANN multiplies for less
        assert 0 < row["ffn_memory_ratio_w8a8_batch1"] and 0 <= row["silent_input_fraction"] < 1
        assert row["read_batch"] == 1 and row["ffn_memory_ratio_w8a8_read_batch"] == row["ffn_memory_ratio_w8a8_batch1"]
        # the summary and the report page show the integer baselines, with this run's figures
        assert (f"| {name} | {row['synaptic_events_per_synapse']:.3f} | {row['spike_rate']:.4f} | "
                f"{row['break_even_spike_rate_w8a8']:.4f} | {row['ffn_energy_ratio_w8a8']:.3f} | "
                f"{row['ffn_energy_ratio_w8ab']:.3f} | {row['model_energy_ratio_w8a8']:.3f} |") in summary
        assert f"{row['synaptic_events_per_synapse']:.3f}" in page
    assert "W8A8 ANN (per-channel int8 weights, per-token int8 activations)" in page
    assert f"{metrics['finetuned']['ffn_energy_ratio_w8a8']:.3f}" in page
    assert "| finetuned / teacher_finetuned | FFN energy / W8A8 (finetuned) |" not in summary  # one domain: no table


def test_the_int8_kernel_equals_the_float_product_of_the_same_integers_bit_for_bit():
    import copy

    from snn_research.hybrid.integer import float_reference, quantize_spiking_linear
    from snn_research.models.hybrid_transformer import set_integer_path

    teacher, hybrid, _, _ = converted("llama", HybridPlan(time_steps=5, encoder="weighted", weight_bits=8))
    unit = next(iter(spiking_mlps(hybrid)))
    x = torch.randn(2, 7, teacher.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        levels = unit.input_encoder(x)
        got = unit._integer_consume("gate_proj", levels)
        integer = quantize_spiking_linear(unit.gate_proj.weight, unit.input_encoder.threshold, 5, 8)
        assert torch.equal(got, float_reference(levels, integer))  # the same integers through a float64 product
        float_path = unit(x)
        assert set_integer_path(hybrid, True) == 2
        integer_path = unit(x)
        torch.testing.assert_close(integer_path, float_path, rtol=1e-4, atol=1e-5)
        ids = calibration_batches(1, seed=3)[0]
        plain = copy.deepcopy(hybrid)
        set_integer_path(plain, False)
        torch.testing.assert_close(hybrid(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # in training the float path runs (straight-through gradients), whatever the switch says
    assert not unit._integer_ready()

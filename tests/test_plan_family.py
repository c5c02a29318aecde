"""What runs for each family: settings that do nothing are refused, noise streams differ per site."""

import pytest
import torch
from conftest import tiny_model
from pipeline_support import assert_clean_failure, invoke, prepare, set_dotted, write_params

from snn_research.models.hybrid_transformer import HybridPlan, hybridize, spiking_mlps


@pytest.mark.parametrize("field,value", [("neuron", "lif"), ("beta", 0.8), ("reset", "zero"), ("surrogate", "sigmoid"),
                                         ("sharpness", 3.0), ("learnable_leak", False)])
def test_gated_family_refuses_neuron_settings_of_closed_form_encoders(field, value):
    plan = HybridPlan(**{field: value})
    conflicts = plan.family_conflicts("gated")
    assert [c[0] for c in conflicts] == [field] and conflicts[0][1] == value
    assert plan.family_conflicts("gpt2") == [] or field in ("beta", "learnable_leak")


def test_lif_encoder_takes_the_neuron_settings_on_gated_families():
    plan = HybridPlan(encoder="lif", beta=0.8, reset="zero", surrogate="sigmoid", sharpness=3.0, learnable_leak=True)
    assert plan.family_conflicts("gated") == []
    assert [c[0] for c in plan.family_conflicts("gpt2")] == ["encoder"]
    model = tiny_model("llama")
    block = hybridize(model, plan)[0]
    neurons = block.input_encoder.neurons
    assert neurons.kind == "lif" and neurons.reset == "zero" and neurons.surrogate == "sigmoid"
    torch.testing.assert_close(neurons.beta.detach(), torch.full_like(neurons.beta, 0.8))


def test_gpt2_takes_its_hidden_neuron_settings():
    assert HybridPlan(neuron="lif", beta=0.8, surrogate="triangle").family_conflicts("gpt2") == []
    assert [c[0] for c in HybridPlan(neuron="if", beta=0.8).family_conflicts("gpt2")] == ["beta"]
    assert [c[0] for c in HybridPlan(encoder="weighted").family_conflicts("gpt2")] == ["encoder"]


def test_convert_refuses_a_setting_the_family_ignores_with_exit_2(workdir, tiny):
    prepare(workdir, tiny, ("download-teacher", "split", "calibrate"))
    write_params(set_dotted(tiny, {"convert.beta": 0.8}))
    result = invoke("convert")
    assert_clean_failure(result, 2)
    assert "convert.beta" in result.output and "gated" in result.output and "0.8" in result.output
    assert not (workdir / "models" / "converted").exists()


def test_rate_encoders_draw_a_different_stream_per_site(input_ids):
    model = tiny_model("llama", layers=2)
    plan = HybridPlan(encoder="rate", time_steps=8, seed=3)
    blocks = hybridize(model, plan)
    encoders = [e for b in blocks for e in (b.input_encoder, b.product_encoder)]
    assert len({e.seed for e in encoders}) == len(encoders)
    # same-shaped sites with equal thresholds and inputs must not fire identically
    first, second = blocks[0].input_encoder, blocks[1].input_encoder
    x = torch.full((64, first.channels), 0.37)
    assert not torch.equal(first(x), second(x))
    # and a rebuilt model draws the same streams again
    again = hybridize(tiny_model("llama", layers=2), plan)
    assert [e.seed for b in again for e in (b.input_encoder, b.product_encoder)] == [e.seed for e in encoders]
    second.reset_noise()  # its first draw again
    torch.testing.assert_close(again[1].input_encoder(x), second(x), rtol=0, atol=0)


def test_format_1_metadata_still_reads():
    """Files written before null-by-default plan fields carried membrane_init and seed for every encoder."""
    import json

    from test_converter import converted

    from snn_research.conversion.ann_to_snn_converter import ConversionMetadata

    _, _, metadata, _ = converted("llama", HybridPlan(time_steps=4, encoder="rate", seed=2))
    old = json.loads(metadata.model_dump_json())
    old["format_version"] = 1
    old["plan"]["membrane_init"] = "symmetric"
    read = ConversionMetadata.model_validate(old)
    assert read.plan.membrane_init is None and read.plan.seed == 2
    old["plan"].update(encoder="if", seed=0)
    read = ConversionMetadata.model_validate(old)
    assert read.plan.seed is None and read.plan.membrane_init == "symmetric"
    with pytest.raises(ValueError, match="membrane_init"):  # a format-2 file gets no such leniency
        ConversionMetadata.model_validate({**old, "format_version": 2, "plan": {**old["plan"], "encoder": "rate"}})


@pytest.mark.parametrize("values,field", [
    ({"convert.seed": 3}, "convert.seed"),  # the weighted encoder draws no noise
    ({"convert.clipping": "percentile", "convert.search_blocks": 4}, "convert.search_blocks"),
    ({"distill.curriculum.start_time_steps": 32}, "distill.curriculum.start_time_steps"),  # weighted: T <= 16
])
def test_settings_the_chosen_encoder_or_clipping_ignores_are_refused(workdir, tiny, values, field):
    assert tiny["convert"]["encoder"] == "weighted" and tiny["convert"]["clipping"] == "search"
    write_params(set_dotted(tiny, values))
    result = invoke("check")
    assert_clean_failure(result, 2)
    assert any(line.startswith(f"{field}:") for line in result.output.splitlines()), result.output


def test_weighted_encoder_counts_in_float32_for_reduced_precision_inputs():
    from snn_research.hybrid.adapter import weighted_levels

    torch.manual_seed(4)
    x = torch.randn(1000, 8)
    threshold = torch.full((8,), 2.5)
    exact = weighted_levels(x, threshold, 12)
    for dtype in (torch.bfloat16, torch.float16):
        low = weighted_levels(x.to(dtype), threshold.to(dtype), 12)
        assert low.dtype == dtype
        # the input was rounded to dtype, so compare with float32 counting of that same rounded input
        torch.testing.assert_close(low.float(), weighted_levels(x.to(dtype).float(), threshold.to(dtype).float(), 12)
                                   .to(dtype).float(), rtol=0, atol=0)
    assert exact.abs().max() > 1000  # a grid finer than bf16's integers: counting in bf16 would collapse it

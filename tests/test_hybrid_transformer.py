import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, calibration_batches, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from snn_research.conversion.calibrator import Calibrator
from snn_research.models.hybrid_transformer import (
    HybridPlan,
    SpikingGatedMLP,
    SpikingGPT2MLP,
    find_mlps,
    hybridize,
    set_analog,
    set_time_steps,
    spiking_mlps,
    spiking_parameter_groups,
)


def calibrated(model, percentile=99.9):
    calibrator = Calibrator(model)
    calibrator.run(calibration_batches())
    calibrator.remove_hooks()
    return calibrator.result(percentile)


def hybrid_of(model, plan, calibration=None):
    calibration = calibration or calibrated(model)
    hybrid = copy.deepcopy(model)
    hybridize(hybrid, plan, calibration.thresholds(plan.granularity))
    return hybrid


def kl_to(teacher_logits, logits):
    return F.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean").item()


def test_analog_identity_reproduces_the_teacher_logits(family, input_ids):
    teacher = tiny_model(family)
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=4))
    assert len(list(spiking_mlps(hybrid))) == 2
    set_analog(hybrid, True)
    with torch.no_grad():
        diff = (hybrid(input_ids).logits - teacher(input_ids).logits).abs().max().item()
    assert diff < 1e-5


def relu_gpt2():
    # GPT-2's GELU has no exact IF counterpart; with ReLU the conversion error is the encoding alone
    torch.manual_seed(0)
    config = tiny_config("gpt2")
    config.activation_function = "relu"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2-relu", "llama", "gemma3"])
def test_kl_to_teacher_falls_as_time_steps_grow(family, input_ids):
    teacher = relu_gpt2() if family == "gpt2-relu" else tiny_model(family)
    calibration = calibrated(teacher)
    with torch.no_grad():
        reference = teacher(input_ids).logits
        kls = []
        for time_steps in (4, 8, 16, 32, 64):
            hybrid = hybrid_of(teacher, HybridPlan(time_steps=time_steps), calibration)
            kls.append(kl_to(reference, hybrid(input_ids).logits))
    assert all(later < earlier for earlier, later in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.1 * kls[0], kls


def test_gelu_gpt2_kl_falls_from_t4_to_t64(input_ids):
    teacher = tiny_model("gpt2")
    calibration = calibrated(teacher)
    with torch.no_grad():
        reference = teacher(input_ids).logits
        kl4 = kl_to(reference, hybrid_of(teacher, HybridPlan(time_steps=4), calibration)(input_ids).logits)
        kl64 = kl_to(reference, hybrid_of(teacher, HybridPlan(time_steps=64), calibration)(input_ids).logits)
    assert kl64 < 0.5 * kl4


def test_linear_on_spike_counts_equals_t_separate_products(family):
    torch.manual_seed(4)
    teacher = tiny_model(family)
    for neuron in ("if", "lif"):
        hybrid = hybrid_of(teacher, HybridPlan(time_steps=8, neuron=neuron))
        block = next(spiking_mlps(hybrid))
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        block.double()
        with torch.no_grad():
            torch.testing.assert_close(block(x), block.forward_per_step(x), rtol=1e-12, atol=1e-12)


def test_gradients_reach_ffn_weights_and_thresholds(family, input_ids):
    teacher = tiny_model(family)
    hybrid = hybrid_of(teacher, HybridPlan(time_steps=8, learnable_threshold=True))
    hybrid.train()
    loss = F.cross_entropy(hybrid(input_ids).logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    loss.backward()
    weights, thresholds = spiking_parameter_groups(hybrid)
    assert len(weights) >= 4 and len(thresholds) == 4
    for param in weights + thresholds:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_same_input_twice_gives_the_same_output(family, input_ids):
    teacher = tiny_model(family)
    for encoder in ("if", "rate"):
        hybrid = hybrid_of(teacher, HybridPlan(time_steps=8, encoder=encoder))
        with torch.no_grad():
            first = hybrid(input_ids).logits
            for module in hybrid.modules():  # the rate encoders draw anew at every call: restart their draws
                if hasattr(module, "reset_noise"):
                    module.reset_noise()
            torch.testing.assert_close(hybrid(input_ids).logits, first, rtol=0, atol=0)


def test_plan_chooses_layers_and_time_steps_can_change():
    teacher = tiny_model("llama", layers=3)
    hybrid = hybrid_of(teacher, HybridPlan(layers=[0, 2], time_steps=4))
    kinds = [type(loc.module).__name__ for loc in find_mlps(hybrid)]
    assert kinds == ["SpikingGatedMLP", "LlamaMLP", "SpikingGatedMLP"]
    set_time_steps(hybrid, 16)
    assert {m.input_encoder.time_steps for m in spiking_mlps(hybrid)} == {16}


def test_per_layer_granularity_uses_one_threshold_per_site():
    teacher = tiny_model("gpt2")
    hybrid = hybrid_of(teacher, HybridPlan(granularity="layer"))
    block = next(spiking_mlps(hybrid))
    assert isinstance(block, SpikingGPT2MLP)
    assert block.input_encoder.log_threshold.shape == (1,) and block.hidden_neurons.log_threshold.shape == (1,)


def test_unknown_architecture_is_named():
    teacher = tiny_model("llama")
    teacher.config.model_type = "mamba"
    with pytest.raises(ValueError, match="'mamba'"):
        hybridize(teacher, HybridPlan())


def test_unknown_mlp_class_is_named():
    teacher = tiny_model("llama")

    class FancyMLP(torch.nn.Module):
        pass

    teacher.model.layers[1].mlp = FancyMLP()
    with pytest.raises(ValueError, match="'FancyMLP'"):
        hybridize(teacher, HybridPlan())


def test_layers_that_do_not_exist_are_named():
    with pytest.raises(ValueError, match=r"\[5\].*2 blocks"):
        hybridize(tiny_model("gemma3"), HybridPlan(layers=[0, 5]))


def test_plan_refuses_bad_values():
    with pytest.raises(ValueError, match="time_steps"):
        HybridPlan(time_steps=0)
    with pytest.raises(ValueError, match="twice"):
        HybridPlan(layers=[1, 1])
    with pytest.raises(ValueError, match="learnable_leak"):
        HybridPlan(neuron="if", learnable_leak=True)


def test_gated_block_is_built_for_gemma3():
    hybrid = hybrid_of(tiny_model("gemma3"), HybridPlan())
    assert all(isinstance(m, SpikingGatedMLP) for m in spiking_mlps(hybrid))


def test_spikes_are_counted_only_when_a_recorder_or_budget_reads_them(input_ids, monkeypatch):
    """The weighted code's spike count (a popcount) is work: a forward that nobody meters skips it, and a
    metered one still counts every site."""
    from snn_research.hybrid.adapter import AnalogToSpikes
    from snn_research.models.hybrid_transformer import SpikeRecorder

    hybrid = hybrid_of(tiny_model("llama"), HybridPlan(time_steps=4, encoder="weighted"))
    calls = []
    original = AnalogToSpikes.spike_count
    monkeypatch.setattr(AnalogToSpikes, "spike_count", lambda self, levels: calls.append(1) or original(self, levels))
    with torch.no_grad():
        plain = hybrid(input_ids).logits
        assert calls == []
        with SpikeRecorder(hybrid) as recorder:
            metered = hybrid(input_ids).logits
    assert len(calls) == 4  # two FFN sites in each of the two layers
    assert all(recorder.spike_rate(site) > 0 for site in recorder.spikes)
    torch.testing.assert_close(plain, metered, rtol=0, atol=0)

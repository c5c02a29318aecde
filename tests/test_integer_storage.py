"""An integer-weight hybrid stores its spiking FFNs' weights as integers and reloads onto exactly them."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from conftest import calibration_batches
from test_converter import converted

from snn_research.conversion.ann_to_snn_converter import WEIGHTS_FILE, load_hybrid, save_hybrid
from snn_research.models.hybrid_transformer import HybridPlan, set_integer_path, spiking_mlps

CONSUMERS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=[(8, None), (4, 16)], ids=["int8", "int4-g16"])
def saved(request, tmp_path_factory):
    bits, group = request.param
    _, hybrid, metadata, _ = converted("llama", HybridPlan(time_steps=5, encoder="weighted", weight_bits=bits,
                                                           weight_group=group))
    with torch.no_grad():  # thresholds moved as training moves them: the stored integers must follow
        for unit in spiking_mlps(hybrid):
            unit.product_encoder.log_threshold.add_(0.05)
    folder = tmp_path_factory.mktemp(f"int{bits}")
    save_hybrid(hybrid, None, metadata, folder / "integer")
    floats = copy.deepcopy(hybrid)
    for unit in spiking_mlps(floats):
        unit.weight_bits, unit.weight_group = None, None
    save_hybrid(floats, None, metadata.model_copy(update={"plan": metadata.plan.model_copy(
        update={"weight_bits": None, "weight_group": None})}), folder / "float")
    return hybrid, folder, bits


def test_the_weights_file_holds_integers_for_every_consumer_and_shrinks(saved):
    hybrid, folder, bits = saved
    stored = safetensors.torch.load_file(str(folder / "integer" / WEIGHTS_FILE))
    for unit in spiking_mlps(hybrid):
        prefix = unit.path
        for name in CONSUMERS:
            assert f"{prefix}.{name}.weight" not in stored
            q, scale = stored[f"{prefix}.{name}.weight_q"], stored[f"{prefix}.{name}.weight_scale"]
            assert q.dtype == torch.int8 and scale.dtype == torch.float32
            assert int(q.to(torch.int16).abs().max()) == 2 ** (bits - 1) - 1
            assert torch.equal(q, unit.integer_weight(name).q)
    integer_bytes = (folder / "integer" / WEIGHTS_FILE).stat().st_size
    float_bytes = (folder / "float" / WEIGHTS_FILE).stat().st_size
    weights = sum(getattr(u, n).weight.numel() for u in spiking_mlps(hybrid) for n in CONSUMERS)
    scales = sum(u.integer_weight(n).scale.numel() for u in spiking_mlps(hybrid) for n in CONSUMERS)
    # each weight: 1 byte instead of 4; each scale adds 4 (the headers differ by a few hundred bytes)
    assert abs((float_bytes - integer_bytes) - (3 * weights - 4 * scales)) < 2048


def test_a_reloaded_integer_hybrid_gives_the_same_logits_on_both_paths(saved):
    hybrid, folder, bits = saved
    loaded = load_hybrid(folder / "integer")
    ids = calibration_batches(2, seed=5)[0]
    for original, again in zip(spiking_mlps(hybrid), spiking_mlps(loaded)):
        for name in CONSUMERS:
            assert torch.equal(original.integer_weight(name).q, again.integer_weight(name).q)
            assert torch.equal(original.integer_weight(name).scale, again.integer_weight(name).scale)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hybrid(input_ids=ids).logits)
        if bits == 8:
            set_integer_path(loaded, True)
            set_integer_path(hybrid, True)
            try:
                assert torch.equal(loaded(input_ids=ids).logits, hybrid(input_ids=ids).logits)
            finally:
                set_integer_path(hybrid, False)


def test_the_rebuilt_master_weight_quantises_back_to_the_stored_integers_and_trains(saved):
    _, folder, _ = saved
    loaded = load_hybrid(folder / "integer")
    unit = next(iter(spiking_mlps(loaded)))
    pinned = unit.integer_weight("down_proj")
    with torch.no_grad():
        unit.down_proj.weight.mul_(1.0)  # a new version of the same values: the pin is dropped
    fresh = unit.integer_weight("down_proj")
    assert fresh is not pinned and torch.equal(fresh.q, pinned.q)
    torch.testing.assert_close(fresh.scale, pinned.scale, rtol=1e-6, atol=0)
    loaded.train()
    unit.down_proj.weight.requires_grad_(True)
    ids = calibration_batches(1, seed=6)[0]
    loaded(input_ids=ids).logits.square().mean().backward()
    assert unit.down_proj.weight.grad is not None and unit.down_proj.weight.grad.abs().sum() > 0


def test_damaged_integer_weights_are_refused_naming_the_tensor(saved, tmp_path):
    import shutil

    hybrid, folder, _ = saved
    prefix = f"{next(iter(spiking_mlps(hybrid))).path}.up_proj."
    for label, change in (("shape", lambda s: s.__setitem__(prefix + "weight_q", s[prefix + "weight_q"][:, :-1].contiguous())),
                          ("scale", lambda s: s.pop(prefix + "weight_scale"))):
        broken = tmp_path / label
        shutil.copytree(folder / "integer", broken)
        state = safetensors.torch.load_file(str(broken / WEIGHTS_FILE))
        change(state)
        safetensors.torch.save_file(state, str(broken / WEIGHTS_FILE))
        with pytest.raises(ValueError, match=prefix.replace(".", r"\.")):
            load_hybrid(broken)

import json

import pytest
import safetensors.torch
import torch
from conftest import calibration_batches, tiny_model

from snn_research.conversion.ann_to_snn_converter import (
    METADATA_FILE,
    THRESHOLDS_FILE,
    ConversionMetadata,
    TeacherIdentity,
    TensorRef,
    convert,
    load_hybrid,
    save_hybrid,
)
from snn_research.conversion.calibrator import Calibrator
from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps


def converted(family, plan=None):
    teacher = tiny_model(family)
    calibrator = Calibrator(teacher)
    calibrator.run(calibration_batches())
    calibrator.remove_hooks()
    identity = TeacherIdentity(source=f"random:{family}", sha256="0" * 64, model_type=teacher.config.model_type,
                               architectures=["X"], num_layers=2)
    hybrid, metadata, tensors = convert(teacher, calibrator.result(99.9), plan or HybridPlan(time_steps=8),
                                        identity, "f" * 64)
    return teacher, hybrid, metadata, tensors


def test_conversion_leaves_the_teacher_untouched(family):
    teacher, hybrid, _, _ = converted(family)
    assert not list(spiking_mlps(teacher)) and len(list(spiking_mlps(hybrid))) == 2


def test_metadata_describes_every_site_and_round_trips(tmp_path, family):
    _, _, metadata, tensors = converted(family)
    assert len(metadata.sites) == 4
    site = metadata.sites[0]
    assert site.class_after.startswith("Spiking") and site.class_before.endswith("MLP")
    assert site.percentile == 99.9 and site.time_steps == 8 and site.granularity == "channel"
    assert isinstance(site.threshold, TensorRef) and site.threshold.name in tensors
    assert site.weight_shapes and all(isinstance(v, list) for v in site.weight_shapes.values())
    assert set(metadata.versions) >= {"torch", "transformers", "snn_research"}
    metadata.write(tmp_path / "meta.json", tensors)
    again = ConversionMetadata.read(tmp_path / "meta.json")
    assert again == metadata
    stored = safetensors.torch.load_file(str(tmp_path / THRESHOLDS_FILE))
    for key, value in tensors.items():
        torch.testing.assert_close(stored[key], value)


def test_per_layer_thresholds_are_scalars_in_the_metadata():
    _, _, metadata, tensors = converted("llama", HybridPlan(granularity="layer"))
    assert tensors == {} and all(isinstance(site.threshold, float) for site in metadata.sites)
    assert all(site.scale_factors == {c: site.threshold for c in site.consumers} for site in metadata.sites)


def test_save_then_load_hybrid_gives_identical_logits_and_generates(tmp_path, family, input_ids):
    _, hybrid, metadata, _ = converted(family)
    with torch.no_grad():
        # change thresholds as training would, so the checkpoint must carry them
        for block in spiking_mlps(hybrid):
            block.input_encoder.log_threshold.add_(0.1)
        expected = hybrid(input_ids).logits
    save_hybrid(hybrid, None, metadata, tmp_path / "ckpt")
    loaded = load_hybrid(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=0, atol=0)
    generated = loaded.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    ConversionMetadata.read(tmp_path / "ckpt" / METADATA_FILE)
    stored = safetensors.torch.load_file(str(tmp_path / "ckpt" / THRESHOLDS_FILE))
    block = next(spiking_mlps(hybrid))
    # the metadata beside the checkpoint carries the changed thresholds, not the calibrated ones
    torch.testing.assert_close(stored[f"{block.path}:input"], block.input_encoder.threshold.detach())


def test_metadata_with_missing_tensors_is_refused(tmp_path):
    _, _, metadata, tensors = converted("gemma3")
    metadata.write(tmp_path / "meta.json", {k: v for k, v in list(tensors.items())[1:]})
    missing = list(tensors)[0]
    with pytest.raises(ValueError, match=f"{THRESHOLDS_FILE}.*{missing}.*missing"):
        ConversionMetadata.read(tmp_path / "meta.json")
    (tmp_path / THRESHOLDS_FILE).unlink()
    with pytest.raises(ValueError, match="tensors file .* missing"):
        ConversionMetadata.read(tmp_path / "meta.json")


def test_metadata_with_a_wrong_shape_or_bad_json_is_refused(tmp_path):
    _, _, metadata, tensors = converted("llama")
    first = list(tensors)[0]
    metadata.write(tmp_path / "meta.json", {**tensors, first: torch.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        ConversionMetadata.read(tmp_path / "meta.json")
    raw = json.loads((tmp_path / "meta.json").read_text())
    del raw["plan"]
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="meta.json: invalid conversion metadata: plan: field required"):
        ConversionMetadata.read(tmp_path / "meta.json")


def test_calibration_missing_a_site_is_refused():
    teacher = tiny_model("llama")
    calibrator = Calibrator(teacher, layers=[0])
    calibrator.run(calibration_batches(1))
    identity = TeacherIdentity(source="x", sha256="0", model_type="llama", architectures=[], num_layers=2)
    with pytest.raises(ValueError, match="no thresholds for sites"):
        convert(teacher, calibrator.result(99.9), HybridPlan(), identity, "0")

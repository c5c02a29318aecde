"""Resuming training: layer-wise distillation resumes after its last finished block, bit for bit, and a
checkpoint made by other code or other params is never resumed."""

import copy
import json
import shutil

import pytest
import torch
from conftest import calibration_batches, tiny_model
from test_hybrid_transformer import hybrid_of

from snn_research.config import Params
from snn_research.models.hybrid_transformer import HybridPlan
from snn_research.stages import training_common
from snn_research.stages.common import StageContext
from snn_research.stages.training_common import PACKAGE_ROOT, code_version, fingerprint
from snn_research.training.layerwise import LayerCheckpoint, layerwise_distill

LAYERWISE = dict(batch_size=2, steps_per_layer=4, lr=3e-3, threshold_lr=3e-2, seed=0)


class Killed(Exception):
    """Stands for the process being killed in the middle of a block."""


@pytest.fixture(scope="module")
def converted():
    teacher = tiny_model("llama", layers=3)
    return teacher, hybrid_of(teacher, HybridPlan(time_steps=4, encoder="rate")), torch.cat(calibration_batches(4, seed=5))


def test_interrupted_layerwise_distillation_resumes_to_bit_identical_weights(converted, tmp_path):
    teacher, hybrid, blocks = converted
    straight = copy.deepcopy(hybrid)
    expected = layerwise_distill(teacher, straight, blocks, checkpoint=LayerCheckpoint(tmp_path / "straight", "fp"),
                                 **LAYERWISE)

    def kill_in_block_2(layer, step, loss):
        if layer == 2 and step == 1:
            raise Killed

    checkpoint = LayerCheckpoint(tmp_path / "killed", "fp")
    with pytest.raises(Killed):
        layerwise_distill(teacher, copy.deepcopy(hybrid), blocks, progress=kill_in_block_2, checkpoint=checkpoint,
                          **LAYERWISE)
    progress = json.loads((tmp_path / "killed" / LayerCheckpoint.PROGRESS).read_text())
    assert progress["next_block"] == 2 and progress["trained"] == [0, 1]

    restarted = copy.deepcopy(hybrid)  # a restarted stage loads the converted model again
    trained_now = []
    reports = layerwise_distill(teacher, restarted, blocks, checkpoint=checkpoint,
                                progress=lambda layer, step, loss: trained_now.append(layer), **LAYERWISE)
    assert set(trained_now) == {2}, "blocks 0 and 1 were finished before the kill"
    assert reports == expected
    mine, theirs = restarted.state_dict(), straight.state_dict()
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert different == []
    assert not torch.equal(mine["model.layers.0.mlp.up_proj.weight"], hybrid.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_layerwise_checkpoint_of_another_fingerprint_is_not_resumed(converted, tmp_path):
    teacher, hybrid, blocks = converted
    layerwise_distill(teacher, copy.deepcopy(hybrid), blocks, checkpoint=LayerCheckpoint(tmp_path, "old"), **LAYERWISE)
    trained_now = []
    layerwise_distill(teacher, copy.deepcopy(hybrid), blocks, checkpoint=LayerCheckpoint(tmp_path, "new"),
                      progress=lambda layer, step, loss: trained_now.append(layer), **LAYERWISE)
    assert set(trained_now) == {0, 1, 2}
    assert json.loads((tmp_path / LayerCheckpoint.PROGRESS).read_text())["fingerprint"] == "new"


def test_a_finished_layerwise_checkpoint_restores_every_block_without_training(converted, tmp_path):
    teacher, hybrid, blocks = converted
    done = copy.deepcopy(hybrid)
    expected = layerwise_distill(teacher, done, blocks, checkpoint=LayerCheckpoint(tmp_path, "fp"), **LAYERWISE)
    restored, trained_now = copy.deepcopy(hybrid), []
    reports = layerwise_distill(teacher, restored, blocks, checkpoint=LayerCheckpoint(tmp_path, "fp"),
                                progress=lambda layer, step, loss: trained_now.append(layer), **LAYERWISE)
    assert trained_now == [] and reports == expected
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), done.state_dict().values()))


def context_with(**changes) -> StageContext:
    return StageContext(params=Params.model_validate(changes), params_path=None, tracker=None,
                        inputs={"models/converted": "ab" * 32})


def stage_fingerprint(context: StageContext) -> str:
    """The fingerprint distill and finetune compute: their section and the energy section."""
    return fingerprint(context, {"distill": context.params.distill.model_dump(),
                                 "energy": context.params.energy.model_dump()})


def test_fingerprint_changes_with_the_energy_budget_and_the_code(monkeypatch):
    base = stage_fingerprint(context_with(energy={"ffn_budget": 0.28}))
    assert stage_fingerprint(context_with(energy={"ffn_budget": 0.28})) == base
    assert stage_fingerprint(context_with(energy={"ffn_budget": 0.3})) != base
    monkeypatch.setattr(training_common, "code_version", lambda: "0" * 64)
    assert stage_fingerprint(context_with(energy={"ffn_budget": 0.28})) != base


def test_code_version_covers_every_python_and_cpp_source(tmp_path):
    root = shutil.copytree(PACKAGE_ROOT, tmp_path / "snn_research", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    uncached = code_version.__wrapped__
    assert uncached(root) == code_version(PACKAGE_ROOT)  # only the sources count, not where they lie
    before = uncached(root)
    (root / "notes.txt").write_text("not code")
    assert uncached(root) == before
    for source in (root / "training" / "loop.py", next(root.glob("hybrid/*.cpp"))):
        original = source.read_bytes()
        source.write_bytes(original + b"\n")
        assert uncached(root) != before, source.name
        source.write_bytes(original)
    assert uncached(root) == before
    (root / "training" / "loop.py").rename(root / "training" / "loop2.py")  # a renamed file is other code
    assert uncached(root) != before

"""The `device` param: resolved or refused by name, and every stage places its models and batches on it.

This machine has no GPU, so placement is pinned at the stage boundary: with the stage's device swapped for
PyTorch's ``meta`` device, each stage's first ``place`` call must move every model and batch it computes
with, and everything it hands back must sit on ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from pipeline_support import assert_clean_failure, copy_pipeline, inside, invoke, prepare, tiny_params, write_params

from snn_research.devices import DeviceUnavailable, Shard, check_devices, place, resolve_device
from snn_research.stages import calibrate, common, convert, distill, evaluate, finetune, finetune_teacher
from snn_research.training.loop import LoopSettings, batch_indices, train


def test_auto_and_cpu_resolve_and_a_missing_device_is_refused_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailable, match=r"device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match=r"device: 'cuda', but PyTorch sees no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(DeviceUnavailable, match=r"device: 'cuda:1'"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_stage_asked_for_a_missing_gpu_exits_2_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tiny_params(device="cuda"))
    result = invoke("calibrate", "-p", "params.yaml")
    assert_clean_failure(result, 2)
    assert "device: 'cuda', but PyTorch sees no CUDA device" in result.output


def test_a_malformed_device_is_a_params_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tiny_params(device="gpu0"))
    result = invoke("check", "-p", "params.yaml")
    assert_clean_failure(result, 2)
    assert "device" in result.output and "gpu0" in result.output


def test_place_moves_nested_values_and_checks_them():
    layer = torch.nn.Linear(2, 2)
    moved_layer, batches, targets = place(torch.device("meta"), layer=layer, batches=[torch.zeros(2)],
                                          targets=[(torch.zeros(1), torch.ones(1))])
    assert moved_layer is layer and layer.weight.device.type == "meta"
    assert batches[0].device.type == "meta" and targets[0][1].device.type == "meta"
    check_devices(torch.device("meta"), layer=layer, batches=batches, targets=targets)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every stage's inputs: a tiny pipeline run to the end once."""
    return prepare(tmp_path_factory.mktemp("devices"), tiny_params(), (
        "download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher"))


# stage -> its module, and the names its first `place` call must move
FIRST_PLACE = {
    "calibrate": (calibrate, {"teacher", "blocks"}),
    "convert": (convert, {"teacher", "hybrid", "blocks"}),
    "distill": (distill, {"teacher", "hybrid", "val_batches"}),
    "finetune": (finetune, {"hybrid", "teacher"}),
    "finetune-teacher": (finetune_teacher, {"teacher", "reference"}),
    "evaluate": (evaluate, {"teacher", "reference", "hybrids", "ids", "energy_ids"}),
}


@pytest.mark.parametrize("stage", list(FIRST_PLACE))
def test_every_stage_moves_its_models_and_batches_to_the_params_device(stage, trained, tmp_path, monkeypatch):
    module, names = FIRST_PLACE[stage]
    work = copy_pipeline(trained, tmp_path / "work")
    seen = {}

    def recording_place(device, **named):
        moved = place(device, **named)
        seen.update(device=device, named=dict(zip(named, moved if len(named) > 1 else [moved])))
        raise _Stop

    monkeypatch.setattr(module, "place", recording_place)
    monkeypatch.setattr(common.StageContext, "device", property(lambda self: torch.device("meta")))
    with inside(work):
        with pytest.raises(_Stop):
            from snn_research.config import load_params
            from snn_research.tracking import Tracker

            params = load_params("params.yaml")
            context = common.StageContext(params=params, params_path=work / "params.yaml",
                                          tracker=Tracker(params, work / "params.yaml", stage, {}))
            module.run(context)
    assert seen["device"] == torch.device("meta")
    assert set(seen["named"]) == names
    models = [value for value in seen["named"].values() if isinstance(value, torch.nn.Module)]
    assert models, "the stage placed no model"
    check_devices(torch.device("meta"), **seen["named"])


def test_the_loop_hands_each_rank_its_slice_of_every_batch(tmp_path):
    class RankOne(Shard):  # rank 1 of 2, without a process group: the reductions are identities here
        def mean(self, value):
            return value

        def average_gradients(self, params):
            return None

        def from_main(self, value):
            return value

    model = torch.nn.Linear(3, 1)
    blocks = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    seen = []

    def loss_fn(model, batch, step):
        seen.append((step, batch.clone()))
        return model(batch).square().mean(), {}

    settings = LoopSettings(steps=3, batch_size=4, lr=1e-3, threshold_lr=0.0, weight_decay=0.0, warmup_steps=0,
                            grad_clip=1.0, eval_every=10, checkpoint_every=10, seed=0, shard=RankOne(rank=1, world=2))
    train(model, blocks, loss_fn, lambda m: {"objective": 0.0}, settings, tmp_path / "ckpt", "fp",
          param_groups=[{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0}])
    for step, batch in seen:
        whole = blocks[batch_indices(step, 8, 4, 0)]
        assert torch.equal(batch, whole[2:4]), step
    assert not (tmp_path / "ckpt").exists(), "a rank other than 0 wrote a checkpoint"


def test_a_nan_on_another_rank_stops_this_one_too(tmp_path):
    from snn_research.training.loop import TrainingDiverged

    class OtherRankDiverged(Shard):  # the all-reduce brings in another rank's NaN
        def mean(self, value):
            return value + float("nan")

        def average_gradients(self, params):
            return None

        def from_main(self, value):
            return value

    model = torch.nn.Linear(3, 1)
    settings = LoopSettings(steps=2, batch_size=2, lr=1e-3, threshold_lr=0.0, weight_decay=0.0, warmup_steps=0,
                            grad_clip=1.0, eval_every=10, checkpoint_every=10, seed=0,
                            shard=OtherRankDiverged(rank=1, world=2))
    with pytest.raises(TrainingDiverged, match="step 0: training loss is nan"):
        train(model, torch.ones(4, 3), lambda m, b, s: (m(b).square().mean(), {}), lambda m: {"objective": 0.0},
              settings, tmp_path / "ckpt", "fp", param_groups=[{"params": list(model.parameters()), "lr": 1e-3,
                                                                "weight_decay": 0.0}])

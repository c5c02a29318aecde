"""The `device` param: resolved or refused by name, every stage places its models and batches on it, and
every stage's whole computation runs there.

The tests must run on machines without a GPU, so a second device stands in for one (``stand_in_device``):
a tensor moved to PyTorch's ``meta`` device keeps its data on the CPU and computes there, but every operation
on it is checked as a GPU or Apple's MPS would check it. An operation that mixes it with a CPU tensor
(other than a 0-dim scalar, which devices accept) or that makes a float64 tensor on it (MPS has no float64)
raises ``StrayTensor``, naming the operation. Each stage runs whole on it (calibration statistics, the
conversion's clipping search, training with checkpoints, evaluation), and so do the calibration, a forward,
the per-step reference forward and two training steps of every family; what they compute before training
moves a weight equals the CPU's up to float32 rounding. The stage-boundary test pins, in addition, which
values each stage's first ``place`` call moves.

Resume across devices: a checkpoint whose tensors were saved on a GPU (their storage tagged ``cuda:0``)
resumes on the CPU to the uninterrupted result; one written under another process count is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator

import pytest
import safetensors.torch
import torch
from conftest import calibration_batches, tiny_model
from pipeline_support import assert_clean_failure, copy_pipeline, inside, invoke, prepare, tiny_params, write_params
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from snn_research.artifacts import verify_folder
from snn_research.conversion.calibrator import Calibrator
from snn_research.devices import DeviceUnavailable, Shard, check_devices, place, resolve_device
from snn_research.models.hybrid_transformer import HybridPlan, hybridize, spiking_mlps
from snn_research.stages import calibrate, common, convert, distill, evaluate, finetune, finetune_teacher
from snn_research.training.loop import LoopSettings, ResumeRefused, batch_indices, train

STAND_IN = torch.device("meta")
CPU = torch.device("cpu")
# the stand-in device computes on the CPU, but some operations take another kernel there (attention's math path
# instead of the CPU's fused one, the neurons' eager twin instead of the compiled kernel): float32 rounding apart
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class StrayTensor(RuntimeError):
    """An operation a GPU or MPS device would refuse: device and CPU tensors mixed, or float64 on the device."""


class OnStandIn(torch.Tensor):
    """A tensor on ``STAND_IN`` (as ``.device`` says) whose data is the CPU tensor ``inner``."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                   storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                   layout=inner.layout, device=STAND_IN,
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise StrayTensor(f"{func} ran on the stand-in device outside stand_in_device()")

    # a traceable subclass (as torch.utils.swap_tensors wants)
    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return OnStandIn(inner["inner"])


@contextlib.contextmanager
def stand_in_device() -> Iterator[None]:
    """Inside it, ``.to(STAND_IN)`` and factories given ``device=STAND_IN`` make ``OnStandIn`` tensors, and
    every operation on one is checked (module docstring) and then run on the CPU data inside."""
    # Module.to swaps the moved data into the same Parameter objects both ways, as a move between two real
    # devices keeps them (else a tied input and output embedding would come back as two parameters)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _Transfers(), _Checked():
            yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


class _Transfers(TorchFunctionMode):
    """What moves data between Python and a device below the dispatcher, where ``_Checked`` cannot see it:
    ``torch.tensor(data, device=...)`` and kin build on the CPU here and then move through ``_Checked``;
    ``tolist`` reads the data back, as from a GPU; ``numpy`` is refused, as a GPU refuses it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and device is not None and \
                torch.device(device).type == STAND_IN.type:
            return func(*args, **{**kwargs, "device": "cpu"}).to(STAND_IN)
        if func is torch.Tensor.tolist and isinstance(args[0], OnStandIn):
            return args[0].inner.tolist()
        if func is torch.Tensor.numpy and isinstance(args[0], OnStandIn):
            raise StrayTensor(f"numpy() of a tensor on {STAND_IN.type}: move it to the CPU first")
        return func(*args, **kwargs)


class _Checked(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnStandIn) for t in tensors)
        target = kwargs.get("device")
        if target is not None:  # a move or a factory: its device is where the result goes
            to_device = torch.device(target).type == STAND_IN.type
            if to_device:
                kwargs = {**kwargs, "device": torch.device("cpu")}
        else:
            to_device = on_device
            stray = [f"{t.device.type} {tuple(t.shape)}" for t in tensors if not isinstance(t, OnStandIn) and t.dim()]
            if on_device and stray and func is not torch.ops.aten.copy_.default:  # copy_ may cross devices
                raise StrayTensor(f"{func} mixes tensors on {STAND_IN.type} with tensors off it: {', '.join(stray)}")
        out = func(*tree_map(_inner, args), **tree_map(_inner, kwargs))
        written = _written(func, args, kwargs)
        if written is not None:
            return written  # an in-place or out= operation returns the tensor it changed, as it was given
        return tree_map(lambda value: _wrap(func, value), out) if to_device else out


def _inner(value):
    return value.inner if isinstance(value, OnStandIn) else value


def _written(func, args, kwargs):
    """The argument that ``func`` writes and returns (``x.add_(y)``: x), or None."""
    returns = func._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or not returns[0].alias_info.is_write:
        return None
    for index, argument in enumerate(func._schema.arguments):
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        if argument.alias_info is not None and argument.alias_info.before_set == returns[0].alias_info.before_set:
            return value
    return None


def _wrap(func, value):
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype == torch.float64:
        raise StrayTensor(f"{func} makes a float64 tensor on {STAND_IN.type}, which MPS cannot hold")
    return OnStandIn(value)


def cpu_copy(value):
    """Tensors (in lists, tuples and dicts) brought back from the stand-in device."""
    return tree_map(lambda t: t.detach().to("cpu") if isinstance(t, torch.Tensor) else t, value)


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
    """Every stage's inputs, and its outputs on the CPU: a tiny pipeline run to the end once."""
    return prepare(tmp_path_factory.mktemp("devices"), tiny_params(), (
        "download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher", "evaluate"))


# stage -> its module, and the names its first `place` call must move
FIRST_PLACE = {
    "calibrate": (calibrate, {"teacher", "blocks"}),
    "convert": (convert, {"teacher", "hybrid", "blocks"}),
    "distill": (distill, {"teacher", "hybrid", "val_batches"}),
    "finetune": (finetune, {"hybrid", "teacher"}),
    "finetune-teacher": (finetune_teacher, {"teacher", "reference"}),
    "evaluate": (evaluate, {"teacher", "reference", "hybrids", "parts_ids", "energy_parts"}),  # per text domain
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

        def average_gradients(self, params, figures=None):
            return figures

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

        def average_gradients(self, params, figures=None):
            return figures + float("nan")

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


# --- the whole computation on a second device ------------------------------------------------------------------


def test_the_stand_in_device_refuses_what_a_gpu_or_mps_refuses():
    with stand_in_device():
        weights = torch.ones(3, 2).to(STAND_IN)
        assert weights.device == STAND_IN and isinstance(weights, OnStandIn)
        assert torch.equal(cpu_copy(weights @ torch.ones(2, 1).to(STAND_IN)), torch.full((3, 1), 2.0))
        assert torch.equal(cpu_copy(weights * torch.tensor(2.0)), torch.full((3, 2), 2.0))  # a CPU scalar is fine
        with pytest.raises(StrayTensor, match=r"mixes tensors on meta with tensors off it: cpu"):
            torch.tensordot(torch.ones(3), weights, dims=1)
        with pytest.raises(StrayTensor, match="float64"):
            weights.double()
        with pytest.raises(StrayTensor, match="float64"):
            torch.zeros(2, dtype=torch.float64, device=STAND_IN)
        made = torch.arange(3, device=weights.device)  # a factory given the device lands on it
        assert isinstance(made, OnStandIn) and torch.equal(cpu_copy(made), torch.arange(3))
        moved = weights.cpu().double()  # float64 on the CPU, after the move, is fine
        assert moved.dtype == torch.float64 and not isinstance(moved, OnStandIn)


MODULES = {"calibrate": calibrate, "convert": convert, "distill": distill, "finetune": finetune,
           "finetune-teacher": finetune_teacher, "evaluate": evaluate}


def run_stage_on(device: torch.device, work, stage: str, monkeypatch) -> None:
    from snn_research.config import load_params
    from snn_research.tracking import Tracker

    monkeypatch.setattr(common.StageContext, "device", property(lambda self: device))
    with inside(work):
        params = load_params("params.yaml")
        context = common.StageContext(params=params, params_path=work / "params.yaml",
                                      tracker=Tracker(params, work / "params.yaml", stage, {}))
        MODULES[stage].run(context)


def before_training(work, stage: str) -> dict:
    """What ``stage`` wrote in ``work`` that it computed before any training step changed a weight: the
    calibration's and the conversion's tensors, evaluate's metrics, and for the training stages the
    validation before the first step and the first step's loss (distill: the first layer-wise block's loss
    before its first step). Later figures part by more than rounding: Adam's first step is about lr times the
    gradient's sign, and a weighted encoder's level flips when rounding moves its input across a step."""
    def tensors(name):
        return safetensors.torch.load_file(str(work / name))

    if stage == "calibrate":
        return tensors("reports/calibration/thresholds.safetensors")
    if stage == "convert":
        return tensors("models/converted/model.safetensors")
    if stage == "evaluate":
        return leaves(json.loads((work / "reports" / "metrics.json").read_text()))
    folder = work / "models" / {"distill": "distilled", "finetune": "finetuned",
                                "finetune-teacher": "teacher_finetuned"}[stage]
    summary = verify_folder(folder, stage)[0].summary
    history = json.loads((folder / "history.json").read_text())
    if stage == "distill":
        return {"layer 0 loss before": history["layerwise"][0]["loss_before"]}
    return {**leaves(summary["start_val"], "start_val"), "first loss": history["train_losses"][0][1]}


def leaves(document, prefix: str = "") -> dict:
    """A JSON document's values by dotted path."""
    if isinstance(document, (dict, list)):
        items = document.items() if isinstance(document, dict) else enumerate(document)
        return {path: value for key, item in items for path, value in leaves(item, f"{prefix}.{key}").items()}
    return {prefix.lstrip("."): document}


@pytest.mark.parametrize("stage", list(MODULES))
def test_every_stage_computes_wholly_on_a_second_device(stage, trained, tmp_path, monkeypatch):
    """The stage runs from its inputs to its written outputs on the stand-in device (no CPU operand, no
    float64 there) and computes what it computes on the CPU, up to float32 rounding."""
    work = copy_pipeline(trained, tmp_path / "work")
    with stand_in_device():
        run_stage_on(STAND_IN, work, stage, monkeypatch)
    made, expected = before_training(work, stage), before_training(trained, stage)
    assert made.keys() == expected.keys() and expected
    if stage in ("calibrate", "convert"):
        for name, tensor in expected.items():
            torch.testing.assert_close(made[name], tensor, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    else:
        # a KL to the teacher (1e-4 here) is a difference of near-equal sums: its rounding is absolute
        assert made == pytest.approx(expected, rel=1e-5, abs=1e-6), stage


def test_each_family_calibrates_converts_runs_and_trains_on_a_second_device(family, tmp_path):
    """Calibration statistics, conversion, a forward, the per-step reference forward and two training steps
    (checkpointed after each) of a tiny hybrid, on the stand-in device and on the CPU: the same numbers up to
    float32 rounding, up to the first optimizer step."""
    teacher = tiny_model(family)
    batches = calibration_batches()
    cpu = run_family(teacher, batches, CPU, tmp_path / "cpu")
    with stand_in_device():
        on_device = cpu_copy(run_family(teacher, batches, STAND_IN, tmp_path / "device"))
    assert sorted(on_device["thresholds"]) == sorted(cpu["thresholds"])
    for key, value in cpu["thresholds"].items():
        torch.testing.assert_close(on_device["thresholds"][key], value, **TOLERANCE, msg=key)
    # the per-step reference equals the one-pass forward on either device; GPT-2's neurons run the eager twin
    # of the CPU's compiled kernel there, which rounds differently
    torch.testing.assert_close(on_device["per_step"], on_device["block"], **TOLERANCE)
    for key in ("logits", "block", "per_step"):
        torch.testing.assert_close(on_device[key], cpu[key], **TOLERANCE, msg=key)
    # the first step's loss and its gradients (averaged and clipped, as the optimizer took them); after it the
    # runs may part by up to a learning rate per weight, since Adam's first step is about lr * sign(gradient)
    assert on_device["first_loss"] == pytest.approx(cpu["first_loss"], rel=1e-5)
    assert sorted(on_device["gradients"]) == sorted(cpu["gradients"]) and cpu["gradients"]
    for name, value in cpu["gradients"].items():
        torch.testing.assert_close(on_device["gradients"][name], value, **TOLERANCE,
                                   msg=lambda m, name=name: f"{name}: {m}")


def run_family(teacher, batches, device: torch.device, checkpoints) -> dict:
    """Calibrate a copy of ``teacher`` on ``device``, convert it, run it, and train it two steps there."""
    teacher = copy.deepcopy(teacher)
    teacher.set_attn_implementation("eager")  # the same attention kernels on both devices (see TOLERANCE)
    teacher = place(device, teacher=teacher)
    calibrator = Calibrator(teacher)
    calibrator.run([batch.to(device) for batch in batches])
    calibrator.remove_hooks()
    thresholds = calibrator.result(99.9).thresholds("channel")
    hybrid = copy.deepcopy(teacher)
    hybridize(hybrid, HybridPlan(time_steps=4, encoder="if" if teacher.config.model_type == "gpt2" else "weighted",
                                 learnable_threshold=True), thresholds)
    hybrid = place(device, hybrid=hybrid)
    block = next(spiking_mlps(hybrid))
    x = torch.randn(2, 5, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        logits = hybrid(input_ids=batches[0].to(device)).logits
        block_out, per_step = block(x), block.forward_per_step(x)
    seen = {}

    def loss_fn(model, batch, step):
        if step == 1:  # the first step's gradients are still there
            seen["gradients"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                 if p.grad is not None}
        return model(input_ids=batch, use_cache=False).logits.square().mean(), {"step": float(step)}

    settings = LoopSettings(steps=2, batch_size=2, lr=1e-3, threshold_lr=1e-2, weight_decay=0.0, warmup_steps=0,
                            grad_clip=1.0, eval_every=10, checkpoint_every=1, seed=0, time_steps=4,
                            device=str(device))
    result = train(hybrid, torch.cat(batches), loss_fn, lambda model: {"objective": 0.0}, settings, checkpoints, "fp")
    assert json.loads((checkpoints / "progress.json").read_text())["device"] == device.type
    return {"thresholds": thresholds, "logits": logits, "block": block_out, "per_step": per_step,
            "first_loss": result.train_losses[0][1], "gradients": seen["gradients"]}


# --- resuming on another device or process count ----------------------------------------------------------------


class Killed(Exception):
    """Stands for the process being killed after a checkpoint."""


def small_run(folder, device: torch.device = CPU, killed_at: int | None = None):
    """Six AdamW steps of a small MLP on ``device``, checkpointed every other step; killed after step
    ``killed_at`` when given. Returns the trained state (on the CPU) and the loop's result."""
    torch.manual_seed(0)
    model = place(device, model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)))
    blocks = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

    def progress(step, loss):
        if step == killed_at:
            raise Killed

    settings = LoopSettings(steps=6, batch_size=4, lr=1e-2, threshold_lr=0.0, weight_decay=0.01, warmup_steps=0,
                            grad_clip=1.0, eval_every=10, checkpoint_every=2, seed=0, device=str(device))
    result = train(model, blocks, lambda m, batch, step: (m(batch).square().mean(), {}), lambda m: {"objective": 0.0},
                   settings, folder, "fp", progress=progress,
                   param_groups=[{"params": list(model.parameters()), "lr": 1e-2, "weight_decay": 0.01}])
    return cpu_copy(model.state_dict()), result


def test_a_checkpoint_resumes_on_another_device_type_to_the_uninterrupted_result(tmp_path, monkeypatch):
    expected, _ = small_run(tmp_path / "straight")

    # made on a GPU: the optimizer state's storages tagged cuda:0, the device type in the progress
    with pytest.raises(Killed):
        small_run(tmp_path / "gpu", killed_at=3)
    state = torch.load(tmp_path / "gpu" / "optimizer.pt", weights_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / "gpu" / "optimizer.pt")
    progress = json.loads((tmp_path / "gpu" / "progress.json").read_text())
    (tmp_path / "gpu" / "progress.json").write_text(json.dumps({**progress, "device": "cuda"}))
    resumed, result = small_run(tmp_path / "gpu")
    assert result.resumed_from == 2
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name

    # made on the CPU, continued on the second device
    with pytest.raises(Killed):
        small_run(tmp_path / "cpu", killed_at=3)
    assert json.loads((tmp_path / "cpu" / "progress.json").read_text())["device"] == "cpu"
    with stand_in_device():
        resumed, result = small_run(tmp_path / "cpu", device=STAND_IN)
    assert result.resumed_from == 2
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_checkpoint_written_by_another_process_count_is_refused_naming_both(tmp_path):
    with pytest.raises(Killed):
        small_run(tmp_path / "ckpt", killed_at=3)
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["processes"] == 1
    (tmp_path / "ckpt" / "progress.json").write_text(json.dumps({**progress, "processes": 2}))
    with pytest.raises(ResumeRefused, match=r"at step 2 was written by 2 process\(es\) and this launch has 1; .*"
                                            r"Launch 2 process\(es\) to continue it, or delete .* to start afresh"):
        small_run(tmp_path / "ckpt")


def test_a_manifest_records_the_type_of_device_its_stage_computed_on(tmp_path):
    from snn_research.artifacts import read_manifest, write_manifest

    (tmp_path / "weights.bin").write_bytes(b"\0")
    for device, recorded in ((torch.device("cuda", 1), "cuda"), ("cpu", "cpu"), ("mps", "mps"), (None, None)):
        write_manifest(tmp_path, "convert", {}, device=device)
        assert read_manifest(tmp_path, "convert").device == recorded, device
    assert json.loads((tmp_path / "manifest.json").read_text())["device"] is None  # no model ran: said so

"""Where stages compute, and how training splits over processes.

Device. The params' ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or
``mps``) is resolved once per stage by ``resolve_device``: ``auto`` takes a
GPU when PyTorch sees one and the CPU otherwise; a device this machine lacks
is refused with exit 2, naming the field. Every model a stage runs, its token
batches and whatever its losses read (a teacher, cached targets) go to that
device through ``place``, which then checks with ``check_devices`` that all of
them sit there: a stray tensor is named instead of failing deep inside a
matmul. The neuron kernel's compiled C++ path is CPU-only; on a GPU the same
step runs as its eager PyTorch twin (``hybrid/neuron_kernel.py``), and the
closed-form encoders of the gated families are plain tensor code on any device.

Processes. Under ``accelerate launch --multi_gpu --num_processes N`` (or
torchrun), Accelerate's ``PartialState`` sets up the process group (NCCL on
GPUs, gloo on the CPU) and ``current_shard`` describes this process: each
training step's batch is split into N equal row slices, one per rank, and the
trainable tensors' gradients are averaged over the ranks before the optimizer
step (``Shard.average_gradients``: the trainable tensors' gradients only,
what DistributedDataParallel would do, without wrapping a model whose frozen
analog part is most of its weights and whose losses reach into its modules).
The gradients travel flattened into buckets of at most ``BUCKET_BYTES``, one
all-reduce per bucket (one in all for a small model), and the step's loss and
its parts ride in the same all-reduce. Every rank then takes the same step, so
the replicas stay equal. Only rank 0 writes outputs, checkpoints and MLflow
records. A training checkpoint resumes on another device type but not under
another process count (``training/loop.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
# gradients per all-reduce: big enough to use the link's bandwidth, small enough that the flat copy made
# beside the gradients costs little memory (DistributedDataParallel's buckets are 25 MB)
BUCKET_BYTES = 64 * 2**20


class DeviceUnavailable(ValueError):
    """The params ask for a device this machine does not have."""


class DeviceMismatch(ValueError):
    """Tensors or modules a stage combines sit on different devices."""


def world_size() -> int:
    """Processes in this launch (``WORLD_SIZE``, set by ``accelerate launch`` and torchrun); 1 when run plainly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _accelerate_state(cpu: bool):
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names on this machine (in a multi-process launch, this rank's device).

    Raises ``DeviceUnavailable`` (whose message names the field ``device``) when it is not there.
    """
    if not re.match(DEVICE_PATTERN, spec):
        raise DeviceUnavailable(f"device: {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    cuda = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"
    if spec.startswith("cuda") and not cuda:
        raise DeviceUnavailable(f"device: {spec!r}, but PyTorch sees no CUDA device on this machine "
                                "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    if spec.startswith("cuda:") and int(spec[5:]) >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device: {spec!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailable("device: 'mps', but the Metal backend is not available on this machine")
    if world_size() > 1:
        if spec not in ("cpu", "cuda"):
            raise DeviceUnavailable(f"device: {spec!r} names one device; a {world_size()}-process launch needs "
                                    "'auto', 'cpu' or 'cuda' (each rank takes its own GPU)")
        device = torch.device(_accelerate_state(cpu=spec == "cpu").device)
        return torch.device("cpu") if device.type == "cpu" else device  # one CPU device: no index
    return torch.device(spec)


def _devices_of(value) -> set[torch.device]:
    if isinstance(value, torch.Tensor):
        return {value.device}
    if isinstance(value, nn.Module):
        return {t.device for t in [*value.parameters(), *value.buffers()]}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return set().union(*(_devices_of(item) for item in value)) if value else set()
    return set()


def _same_device(found: torch.device, wanted: torch.device) -> bool:
    # 'cuda' and 'cuda:0' name the same device when the current one is 0
    if found.type != wanted.type:
        return False
    if found.type == "cuda" and (found.index is None or wanted.index is None):
        return (found.index or torch.cuda.current_device()) == (wanted.index or torch.cuda.current_device())
    return found.index == wanted.index


def check_devices(device: torch.device, **named) -> None:
    """Raise ``DeviceMismatch`` naming every tensor or module in ``named`` that is not wholly on ``device``.

    Values may be tensors, modules, or lists, tuples and dicts of them.
    """
    device = torch.device(device)
    wrong = []
    for name, value in named.items():
        found = _devices_of(value)
        stray = sorted(str(d) for d in found if not _same_device(d, device))
        if stray:
            wrong.append(f"{name} on {', '.join(stray)}")
    if wrong:
        raise DeviceMismatch(f"the stage runs on {device}, but {'; '.join(wrong)}: move them to {device} first")


def _move(value, device: torch.device):
    if isinstance(value, nn.Module):
        return value.to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_move(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _move(item, device) for key, item in value.items()}
    return value


def place(device: torch.device, **named):
    """Move every module (in place) and tensor in ``named`` to ``device``, check them all, and return the
    moved values in the order given (modules are returned too, as the same objects)."""
    moved = {name: _move(value, device) for name, value in named.items()}
    check_devices(device, **moved)
    values = list(moved.values())
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class Shard:
    """This process's share of a training step: rows ``rank`` of ``world`` equal slices of each batch."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int, field: str) -> None:
        if batch_size % self.world:
            raise DeviceUnavailable(f"{field}: {batch_size} does not split evenly over {self.world} processes; "
                                    f"use a multiple of {self.world}")

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return batch
        per = batch.shape[0] // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (every rank gets the same result)."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total / self.world

    def average_gradients(self, params, figures: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replace each parameter's gradient by its mean over the ranks (a rank without one counts zero), and
        return the mean of ``figures`` (a 1-D tensor, e.g. a loss and its parts; None: nothing to return).

        The gradients are flattened into buckets of one dtype and at most ``BUCKET_BYTES``, one all-reduce
        each; the figures and a flag per parameter (whether this rank has its gradient) ride in the first
        float32 bucket. A parameter no rank has a gradient for keeps none, as in one process (the optimizer
        skips it); only a rank that lacks a gradient reads the flags back, so when every rank has every
        gradient nothing here waits on the device.
        """
        if self.world == 1:
            return figures
        params = list(params)
        if not params:
            return self.mean(figures) if figures is not None else None
        device = params[0].device
        missing = [param.grad is None for param in params]
        for param, absent in zip(params, missing):
            if absent:
                param.grad = torch.zeros_like(param)
        flags = torch.tensor([0.0 if absent else 1.0 for absent in missing], dtype=torch.float32, device=device)
        riders = flags if figures is None else torch.cat([figures.detach().float().reshape(-1), flags])
        buckets = _buckets([param.grad for param in params], BUCKET_BYTES)
        home = next((i for i, bucket in enumerate(buckets) if bucket[0].dtype == torch.float32), None)
        if home is None:
            buckets.append([])
            home = len(buckets) - 1
        for index, bucket in enumerate(buckets):
            parts = [*bucket, riders] if index == home else bucket
            flat = torch.cat([part.reshape(-1) for part in parts])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= self.world
            for part, mean in zip(parts, flat.split([part.numel() for part in parts])):
                part.copy_(mean.view_as(part))
        if any(missing):
            holders = riders[-len(params):].tolist()  # the share of ranks that had each gradient
            for param, absent, share in zip(params, missing, holders):
                if absent and share == 0:
                    param.grad = None
        return riders[:-len(params)] if figures is not None else None

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, grouped by dtype into lists of at most ``limit`` bytes (a larger tensor alone)."""
    runs: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    filled: dict[torch.dtype, int] = {}  # bytes in the last bucket of each dtype
    for tensor in tensors:
        buckets = runs.setdefault(tensor.dtype, [[]])
        size = tensor.numel() * tensor.element_size()
        if buckets[-1] and filled[tensor.dtype] + size > limit:
            buckets.append([])
            filled[tensor.dtype] = 0
        buckets[-1].append(tensor)
        filled[tensor.dtype] = filled.get(tensor.dtype, 0) + size
    return [bucket for buckets in runs.values() for bucket in buckets]


def current_shard(device: torch.device | None = None) -> Shard:
    """This process's ``Shard``: rank and world size from Accelerate's state in a multi-process launch."""
    if world_size() == 1:
        return Shard()
    state = _accelerate_state(cpu=device is not None and torch.device(device).type == "cpu")
    return Shard(rank=state.process_index, world=state.num_processes)

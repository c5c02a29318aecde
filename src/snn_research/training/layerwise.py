"""Sequential layer-wise distillation of the spiking FFNs (and any other spiking site of a block).

Block by block, from the first: the hybrid's residual stream entering block l
is computed with the blocks before it already trained (so each block learns on
the inputs it will really see, and can correct the error the earlier blocks
leave), and block l's spiking FFN is trained so that the block's output matches
the teacher's residual stream after block l.

The error is measured where it matters next: as the following norm (the next
block's input norm, or the final norm) sees it, i.e. each channel weighted by
that norm's gain squared and each token by its inverse mean square. A plain MSE
on the stream would be dominated by the few channels of huge magnitude that
these models carry and that the next norm scales away.

Only one block runs per step and only its FFN gets gradients, so a step costs
about one block's forward and its FFN's backward: far cheaper than a pass
through the whole model and its 262k-token LM head.

Resume. With a ``LayerCheckpoint`` every trained block is saved as soon as
it is done (its FFN's trainable tensors, then the progress file, each written
atomically). A rerun with the same fingerprint restores the finished blocks,
recomputes the stream through them (the same operations on the same weights,
so the same values) and goes on with the next block: each block's training
depends only on its input stream, its seed and a fresh optimizer, so the
result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import nn

from snn_research.devices import Shard, check_devices
from snn_research.io import atomic_write_text
from snn_research.models.families import family_for_model
from snn_research.models.hybrid_transformer import SpikingMLP, block_list, spiking_parameter_groups, spiking_units
from snn_research.training.energy_budget import EnergyBudget

@dataclass
class LayerReport:
    layer: int
    loss_before: float
    loss_after: float
    stream_error: float  # weighted relative error of the block's output over all cached blocks


def _norm_gain(norm: nn.Module, channels: int) -> tuple[torch.Tensor, bool]:
    """Per-channel gain of a norm, and whether it centres (LayerNorm) before scaling."""
    if isinstance(norm, nn.LayerNorm) or type(norm).__name__.endswith("LayerNorm") and hasattr(norm, "bias"):
        return norm.weight.detach().float().clone(), True
    weight = next(norm.parameters())
    with torch.no_grad():  # RMSNorm variants (with or without Gemma's 1 + w): the gain is norm(ones)
        probe = torch.ones(1, channels, dtype=weight.dtype, device=weight.device)
        return norm(probe).float().reshape(-1).clone(), False


def _reader_norms(model: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """For each block l, the gain of the norm that reads its output (block l+1's input norm, or the final norm)."""
    family = family_for_model(model)
    _, blocks = block_list(model)
    channels = model.config.hidden_size
    readers = [getattr(blocks[i + 1], family.input_norm) for i in range(len(blocks) - 1)]
    readers.append(model.get_submodule(family.final_norm))
    return [_norm_gain(norm, channels) for norm in readers]


def stream_loss(output: torch.Tensor, target: torch.Tensor, gain: torch.Tensor, centred: bool) -> torch.Tensor:
    if centred:
        output = output - output.mean(-1, keepdim=True)
        target = target - target.mean(-1, keepdim=True)
    token_weight = 1.0 / target.square().mean(-1, keepdim=True).clamp(min=1e-12)
    channel_weight = gain.square()
    error = ((output - target).square() * channel_weight * token_weight).sum(-1).mean()
    reference = (target.square() * channel_weight * token_weight).sum(-1).mean()
    return error / reference


class _BlockCalls:
    """Captures how the model calls each decoder block (the extra args and kwargs besides the stream)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
        self.outputs: list[torch.Tensor] = []
        self.handles = [
            block.register_forward_pre_hook(self._pre(i), with_kwargs=True) for i, block in enumerate(blocks)
        ]
        self.handles.append(blocks[-1].register_forward_hook(self._post))

    def _pre(self, index: int):
        def hook(_module, args, kwargs):
            stream = args[0] if args else kwargs["hidden_states"]
            self.inputs[index].append(stream.detach())
            if index not in self.calls:
                extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls[index] = (tuple(args[1:]), extra)

        return hook

    def _post(self, _module, _args, output):
        self.outputs.append(_first(output).detach())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def run_block(block: nn.Module, stream: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return _first(block(stream, *args, **kwargs))


class LayerCheckpoint:
    """Per-block checkpoints of layer-wise distillation in ``folder``, valid for one ``fingerprint``."""

    PROGRESS = "progress.json"

    def __init__(self, folder: Path, fingerprint: str, write: bool = True) -> None:
        # write=False: read and restore only (the ranks but 0 of a multi-process launch)
        self.folder, self.fingerprint, self.writes = Path(folder), fingerprint, write

    def _block_file(self, index: int) -> Path:
        return self.folder / f"block_{index}.safetensors"

    def read(self) -> tuple[int, list[int], list[LayerReport]] | None:
        """(next block to process, trained blocks, reports so far), or None when there is nothing to resume."""
        path = self.folder / self.PROGRESS
        if not path.is_file():
            return None
        try:
            progress = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged progress file: start afresh
        if progress.get("fingerprint") != self.fingerprint:
            return None  # made with other params, inputs or code
        reports = [LayerReport(**row) for row in progress["reports"]]
        return progress["next_block"], progress["trained"], reports

    def restore(self, index: int, block: nn.Module) -> None:
        saved = safetensors.torch.load_file(str(self._block_file(index)))
        with torch.no_grad():
            for name, param in _trainable(block).items():
                if name not in saved:
                    raise ValueError(f"{self._block_file(index)}: no tensor {name!r}; delete {self.folder} to start afresh")
                param.copy_(saved[name])

    def write(self, next_block: int, trained: list[int], reports: list[LayerReport], block: nn.Module | None) -> None:
        """Save the block just trained (if any), then the progress that points at it."""
        if not self.writes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if block is not None:
            fd, tmp = tempfile.mkstemp(prefix=".block.", suffix=".tmp", dir=self.folder)
            os.close(fd)
            try:
                tensors = {name: p.detach().contiguous().cpu() for name, p in _trainable(block).items()}
                safetensors.torch.save_file(tensors, tmp)
                os.replace(tmp, self._block_file(trained[-1]))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        progress = {"fingerprint": self.fingerprint, "next_block": next_block, "trained": trained,
                    "reports": [asdict(r) for r in reports]}
        atomic_write_text(self.folder / self.PROGRESS, json.dumps(progress))


def _trainable(block: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable tensors of a decoder block's spiking units (its FFN and any site outside it)."""
    weights, dynamics = spiking_parameter_groups(block)
    wanted = {id(p) for p in weights + dynamics}
    return {name: p for name, p in block.named_parameters() if id(p) in wanted}


def layerwise_distill(
    teacher: nn.Module,
    hybrid: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    steps_per_layer: int,
    lr: float,
    threshold_lr: float,
    seed: int = 0,
    progress=None,
    budget_for: Callable[[nn.Module], EnergyBudget] | None = None,
    checkpoint: LayerCheckpoint | None = None,
    shard: Shard = Shard(),
) -> list[LayerReport]:
    """Train every spiking FFN of ``hybrid`` in place, block by block; returns per-layer losses.

    ``budget_for(mlp)``, if given, makes the energy budget each block's FFN trains under.
    ``checkpoint``, if given, saves each finished block and resumes after the last one saved.
    Teacher and hybrid must be on one device; the token blocks are moved there.
    ``shard`` (a multi-process launch): this rank caches and trains on its rows of every batch, and the
    gradients, losses and errors are averaged over the ranks.
    """
    count = (blocks.shape[0] // batch_size) * batch_size
    if count == 0:
        raise ValueError(f"layer-wise distillation needs at least batch_size={batch_size} blocks (got {blocks.shape[0]})")
    device = next(teacher.parameters()).device
    check_devices(device, teacher=teacher, hybrid=hybrid)
    _, teacher_blocks = block_list(teacher)
    _, hybrid_blocks = block_list(hybrid)
    next_block, trained, reports = 0, [], []
    saved = checkpoint.read() if checkpoint is not None else None
    if saved is not None:
        next_block, trained, reports = saved
        for index in trained:
            checkpoint.restore(index, hybrid_blocks[index])
        if next_block >= len(hybrid_blocks):
            return reports  # every block was done: nothing left to compute
    shard.check_batch(batch_size, "batch_size")
    batches = [shard.rows(batch) for batch in blocks[:count].to(device).split(batch_size)]
    recorder = _BlockCalls(teacher_blocks)
    try:
        with torch.no_grad():
            for input_ids in batches:
                teacher.base_model(input_ids=input_ids, use_cache=False)
    finally:
        recorder.remove()
    targets = [recorder.inputs[i] for i in range(1, len(teacher_blocks))] + [recorder.outputs]
    readers = _reader_norms(teacher)
    stream = recorder.inputs[0]  # the embeddings are analog: identical for teacher and hybrid
    for index, block in enumerate(hybrid_blocks):
        call = recorder.calls[index]
        if index < next_block:  # finished before a restart: only its output is needed
            with torch.no_grad():
                stream = [run_block(block, x, call) for x in stream]
            continue
        gain, centred = readers[index]
        mlp = block.get_submodule(family_for_model(hybrid).mlp)
        trains = any(True for _ in spiking_units(block)) and steps_per_layer > 0
        if trains:
            budget = budget_for(mlp) if budget_for is not None and isinstance(mlp, SpikingMLP) else None
            reports.append(
                _train_block(block, stream, targets[index], call, gain, centred,
                             steps_per_layer, lr, threshold_lr, seed + index, index, progress, budget, shard)
            )
            trained.append(index)
        with torch.no_grad():
            stream = [run_block(block, x, call) for x in stream]
        if trains:
            error = sum(stream_loss(o, t, gain, centred) for o, t in zip(stream, targets[index])) / len(stream)
            reports[-1].stream_error = float(shard.mean(error))
        if checkpoint is not None:
            checkpoint.write(index + 1, trained, reports, block if trains else None)
    return reports


def _train_block(block, stream, targets, call, gain, centred, steps, lr, threshold_lr, seed, index, progress,
                 budget: EnergyBudget | None, shard: Shard = Shard()):
    weights, thresholds = spiking_parameter_groups(block)  # every spiking unit of the block
    trainable_before = {id(p): p.requires_grad for p in block.parameters()}
    for param in weights + thresholds:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": thresholds, "lr": threshold_lr}])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(stream), generator=generator)
    first_loss = last_loss = float("nan")
    block.train()
    try:
        for step in range(steps):
            batch = int(order[step % len(stream)])
            for module in block.modules():
                if hasattr(module, "noise_step"):
                    module.noise_step = step
            with budget or contextlib.nullcontext():
                output = run_block(block, stream[batch], call)
                loss = stream_loss(output, targets[batch], gain, centred)
                if budget is not None:
                    loss = loss + budget.penalty(stream[batch].numel() // stream[batch].shape[-1])
            mean_loss = shard.mean(loss.detach())  # before the check: every rank sees a NaN on any rank
            if not torch.isfinite(mean_loss):
                raise FloatingPointError(f"layer-wise distillation of block {index}: loss is {mean_loss.item()} "
                                         f"at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            shard.average_gradients(weights + thresholds)
            optimizer.step()
            last_loss = float(mean_loss)
            if step == 0:
                first_loss = last_loss
            if progress is not None:
                progress(index, step, last_loss)
    finally:
        block.eval()
        for module in block.modules():  # the stream after training runs at step 0's noise, resumed or not
            if hasattr(module, "noise_step"):
                module.noise_step = 0
        for param in block.parameters():
            param.requires_grad_(trainable_before[id(param)])
            param.grad = None
    return LayerReport(layer=index, loss_before=first_loss, loss_after=last_loss, stream_error=float("nan"))

"""The training loop shared by distill, finetune and finetune-teacher; one process or many (``accelerate launch``).

AdamW over parameter groups: by default two (the spiking FFNs' weights, and
their log-thresholds and leaks at their own learning rate), or any explicit set
(the teacher's FFN linears for finetune-teacher); transformers' linear warm-up
then cosine decay, gradient clipping, validation every N steps with the best
state kept, optional early stopping, and resumable checkpoints.

Devices and processes. The model, its batches and whatever the loss and
validation read (a teacher, cached targets) sit on ``settings.device``: stages
move them there (``devices.place``) and the loop checks the model again. In a
multi-process launch each rank computes the loss on its slice of every step's
batch, the trainable gradients are averaged over the ranks before clipping and
the optimizer step (bucketed, with the loss and its parts in the same
all-reduce), and only rank 0 writes checkpoints (see ``devices.py``).
Validation runs whole on every rank, so every rank makes the same best-state
and early-stopping decisions. The loop waits on the device once a step: the
loss, its parts and the gradient norm are read back together for the
divergence check and the logs.

Determinism and resume. The batch of step s is a function of (seed, s) alone
and stochastic encoders draw their noise from (seed, s), so a run resumed from
its checkpoint at step k computes exactly the steps an uninterrupted run would.
Checkpoints hold the trainable tensors (safetensors), the optimizer state
(tensors and numbers only, loaded with ``weights_only=True``) and the loop's
progress (JSON), and are written atomically.

Resume across devices and process counts. A checkpoint records the device type
(``cpu``, ``cuda``, ``mps``) and the number of processes that wrote it. It
resumes on another device type: its tensors are read onto the CPU and moved to
this process's device (the optimizer puts each state tensor beside its
parameter, and keeps its step count on the CPU as a fresh one does), so a run
started on the CPU can continue on a GPU or the other way round; the steps after
the resume are the same computation, rounded as the new device rounds. It is
refused under another process count (``ResumeRefused``, naming both counts):
each rank's slice of a batch, and so its noise draws and per-slice figures,
depend on the count, so the steps after it would not be the ones the run was
making.

A loss or gradient that is NaN or infinite stops the run with the step number;
the last checkpoint stays, and no model is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import safetensors.torch
import torch
from torch import nn

from snn_research.devices import Shard, check_devices
from snn_research.io import atomic_directory
from snn_research.models.hybrid_transformer import set_time_steps, spiking_parameter_groups, spiking_units

STATE_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or infinite."""


class ResumeRefused(ValueError):
    """A checkpoint of this run was written under another number of processes."""


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    lr: float
    threshold_lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    eval_every: int
    checkpoint_every: int
    seed: int
    patience: int | None = None  # early stopping after this many validations without improvement
    time_steps: int | None = None  # the target T
    curriculum_start: int | None = None  # train at this T first, annealing to the target
    curriculum_fraction: float = 0.5
    gradient_checkpointing: bool | None = None  # recompute decoder layers in backward (None: on unless rate noise)
    device: str = "cpu"  # where the model and its batches sit (stages resolve params.device)
    shard: Shard = field(default_factory=Shard)  # this process's slice of each batch (multi-process launches)


@dataclass
class LoopResult:
    history: list[dict] = field(default_factory=list)  # one row per validation
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = -1
    best_objective: float = math.inf
    steps_done: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None


def curriculum_time_steps(step: int, settings: LoopSettings) -> int | None:
    """T for a step: geometric anneal from the start T to the target over the first part of training."""
    if settings.curriculum_start is None or settings.time_steps is None:
        return settings.time_steps
    anneal_steps = max(1, int(settings.steps * settings.curriculum_fraction))
    if step >= anneal_steps:
        return settings.time_steps
    progress = step / anneal_steps
    start, end = settings.curriculum_start, settings.time_steps
    return max(end, int(round(start * (end / start) ** progress)))


def batch_indices(step: int, count: int, batch_size: int, seed: int) -> torch.Tensor:
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def spiking_groups(model: nn.Module, settings: LoopSettings) -> list[dict[str, Any]]:
    """The default optimizer groups: spiking weights at ``lr``, thresholds and leaks at ``threshold_lr``."""
    weights, dynamics = spiking_parameter_groups(model)
    groups = [{"params": weights, "lr": settings.lr, "weight_decay": settings.weight_decay}]
    if dynamics:
        groups.append({"params": dynamics, "lr": settings.threshold_lr, "weight_decay": 0.0})
    return groups


def _named_trainable(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, nn.Parameter]:
    wanted = {id(p) for group in groups for p in group["params"]}
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise ValueError(f"{len(wanted) - len(named)} of the {len(wanted)} parameters to train are not parameters "
                         "of the model being trained")
    return named


def _set_noise_step(model: nn.Module, step: int) -> None:
    for block in spiking_units(model):
        for module in block.modules():
            if hasattr(module, "noise_step"):
                module.noise_step = step


def train(
    model: nn.Module,
    train_blocks: torch.Tensor,
    loss_fn: Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]],
    validate: Callable[[nn.Module], dict[str, float]],
    settings: LoopSettings,
    checkpoint_dir: Path,
    fingerprint: str,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    initial_objective: float = math.inf,
    param_groups: Iterable[dict[str, Any]] | None = None,
) -> LoopResult:
    """Train ``model`` in place; on return it holds the best validated state.

    ``param_groups`` (torch optimizer groups, each with its ``lr`` and
    ``weight_decay``) names what trains; by default the spiking parts
    (``spiking_groups``). ``loss_fn(model, batch, step)`` returns the loss and
    named parts to log; ``validate`` returns metrics including ``objective``
    (lower is better). With ``initial_objective`` (the starting state's
    validation), the starting state counts as step 0 and is kept if no step beats it.
    """
    from transformers import get_cosine_schedule_with_warmup

    shard = settings.shard
    shard.check_batch(settings.batch_size, "batch_size")
    groups = [dict(group) for group in param_groups] if param_groups is not None else spiking_groups(model, settings)
    groups = [group for group in groups if group["params"]]
    named = _named_trainable(model, groups)
    if not named:
        raise ValueError("the model has no parameters to train (was it converted?)")
    for param in model.parameters():
        param.requires_grad_(False)
    for param in named.values():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    recompute = _gradient_checkpointing(model, settings.gradient_checkpointing)
    device = torch.device(settings.device)
    check_devices(device, model=model)

    initial_objective = shard.from_main(initial_objective)
    result = LoopResult(best_objective=initial_objective, best_step=0 if math.isfinite(initial_objective) else -1)
    best_state = {name: p.detach().clone() for name, p in named.items()}
    start, since_best = 0, 0
    checkpoint_dir = Path(checkpoint_dir)
    saved = _read_checkpoint(checkpoint_dir, fingerprint, device, shard.world)
    if saved is not None:
        progress_state, trainable, best, optimizer_state = saved
        with torch.no_grad():
            for name, tensor in trainable.items():
                named[name].copy_(tensor)
        best_state = best
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(progress_state["scheduler"])
        start = progress_state["step"]
        since_best = progress_state["since_best"]
        result.history = progress_state["history"]
        result.train_losses = [tuple(x) for x in progress_state["train_losses"]]
        result.best_step = progress_state["best_step"]
        result.best_objective = progress_state["best_objective"]
        result.resumed_from = start

    step = start
    while step < settings.steps:
        time_steps = curriculum_time_steps(step, settings)
        if time_steps is not None:
            set_time_steps(model, time_steps)
        _set_noise_step(model, step)
        model.train()
        batch = train_blocks[batch_indices(step, train_blocks.shape[0], settings.batch_size, settings.seed)]
        batch = shard.rows(batch).to(device)
        loss, parts = loss_fn(model, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss, parts, grad_norm = _averaged_step(loss, parts, named, settings, device)
        # checked on the averages: a NaN on one rank reaches every rank, so all of them stop together
        if not math.isfinite(loss):
            raise TrainingDiverged(f"step {step}: training loss is {loss}; stopped, last checkpoint kept")
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"step {step}: gradient norm is {grad_norm}; stopped, last checkpoint kept")
        optimizer.step()
        scheduler.step()
        step += 1
        result.train_losses.append((step, loss))
        if log_metrics is not None:
            log_metrics({"train_loss": loss, "lr": scheduler.get_last_lr()[0], "time_steps": float(time_steps or 0),
                         **{f"train_{k}": v for k, v in parts.items()}}, step)
        if progress is not None:
            progress(step, loss)
        if step % settings.eval_every == 0 or step == settings.steps:
            model.eval()
            if settings.time_steps is not None:
                set_time_steps(model, settings.time_steps)
            # rank 0's figures decide for every rank: devices may round differently, and ranks that kept
            # different best states, or where one stopped early, would part ways
            metrics = shard.from_main(validate(model))
            metrics = {**metrics, "step": step}
            result.history.append(metrics)
            if log_metrics is not None:
                log_metrics({f"val_{k}": v for k, v in metrics.items() if k != "step"}, step)
            if metrics["objective"] < result.best_objective:
                result.best_objective, result.best_step, since_best = metrics["objective"], step, 0
                best_state = {name: p.detach().clone() for name, p in named.items()}
            else:
                since_best += 1
            if settings.patience is not None and since_best >= settings.patience:
                result.stopped_early = True
                break
        if step % settings.checkpoint_every == 0 and step < settings.steps and shard.main:
            _write_checkpoint(checkpoint_dir, fingerprint, step, since_best, named, best_state, optimizer, scheduler,
                              result, device, shard.world)

    result.steps_done = step
    if recompute:
        model.activation_checkpointing_disable()
    with torch.no_grad():
        for name, tensor in best_state.items():
            named[name].copy_(tensor)
    for param in model.parameters():
        param.requires_grad_(False)
    if settings.time_steps is not None:
        set_time_steps(model, settings.time_steps)
    model.eval()
    return result


def _gradient_checkpointing(model: nn.Module, wanted: bool | None) -> bool:
    """Turn on the recomputation of decoder layers in the backward pass when ``wanted`` (None: when the model
    supports it and has no 'rate' encoder, whose per-call noise a recomputation would redraw); whether it is on."""
    rate = any(getattr(m, "kind", None) == "rate" for m in model.modules())
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if wanted is None:
        wanted = supported and not rate
    elif wanted and rate:
        raise ValueError("gradient checkpointing recomputes each layer, and the 'rate' encoder draws new noise on "
                         "every call: the recomputed layer would not be the one the loss saw")
    elif wanted and not supported:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if wanted:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return bool(wanted)


def _averaged_step(loss: torch.Tensor, parts: dict[str, float], named: dict[str, nn.Parameter],
                   settings: LoopSettings, device: torch.device) -> tuple[float, dict[str, float], float]:
    """After ``loss.backward()``: average the gradients over the ranks, clip them, and return the mean loss, the
    mean of its parts and the gradient norm before clipping, read back from the device in one go."""
    shard = settings.shard
    figures = loss.detach().reshape(1)
    if shard.world > 1:  # the parts ride in the gradients' all-reduce; one process logs them as given
        figures = torch.cat([figures.float(), torch.tensor(list(parts.values()), dtype=torch.float32, device=device)])
    figures = shard.average_gradients(named.values(), figures)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(named.values()), settings.grad_clip)
    mean_loss, *mean_parts, norm = torch.cat([figures, grad_norm.reshape(1).to(figures)]).tolist()
    return mean_loss, dict(zip(parts, mean_parts)) if shard.world > 1 else parts, norm


def _write_checkpoint(folder, fingerprint, step, since_best, named, best_state, optimizer, scheduler, result,
                      device: torch.device, processes: int) -> None:
    with atomic_directory(folder) as tmp:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in named.items()}, str(tmp / STATE_FILE))
        safetensors.torch.save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp / BEST_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        progress = {
            "fingerprint": fingerprint,
            "device": device.type,  # a resume may change it (module docstring)
            "processes": processes,  # a resume must keep it
            "step": step,
            "since_best": since_best,
            "scheduler": scheduler.state_dict(),
            "history": result.history,
            "train_losses": result.train_losses,
            "best_step": result.best_step,
            "best_objective": result.best_objective,
        }
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress))


def _read_checkpoint(folder: Path, fingerprint: str, device: torch.device, processes: int):
    """This run's checkpoint in ``folder`` with its tensors on ``device`` (the optimizer state on the CPU,
    for ``load_state_dict`` to place); None when there is none or it is another run's."""
    progress_path = folder / PROGRESS_FILE
    if not progress_path.is_file():
        return None
    try:
        progress = json.loads(progress_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if progress.get("fingerprint") != fingerprint:
        return None  # made with other params or inputs: start afresh
    if progress.get("processes") != processes:
        raise ResumeRefused(
            f"{folder}: the checkpoint at step {progress.get('step')} was written by {progress.get('processes')} "
            f"process(es) and this launch has {processes}; each process trains on its slice of every batch, so "
            f"the steps would differ from the run's. Launch {progress.get('processes')} process(es) to continue "
            f"it, or delete {folder} to start afresh")
    trainable, best = (
        {name: tensor.to(device) for name, tensor in safetensors.torch.load_file(str(folder / file)).items()}
        for file in (STATE_FILE, BEST_FILE))
    # onto the CPU, whatever device wrote it: a GPU's checkpoint then loads on a machine without one, and no
    # rank of a multi-GPU launch stages the state on another rank's GPU
    optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return progress, trainable, best, optimizer_state

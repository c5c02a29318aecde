"""Pieces distill, finetune and finetune-teacher share: fingerprints, validation targets, curves, saving."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from snn_research.config import OptimParams
from snn_research.conversion.ann_to_snn_converter import write_hybrid_files
from snn_research.io import atomic_directory, atomic_write_text
from snn_research.stages.common import StageContext
from snn_research.training.loop import LoopResult, LoopSettings

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/snn_research


@functools.cache
def code_version(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the package's own source (``**/*.py`` and ``**/*.cpp``, by relative path, sorted).

    A checkpoint made by other code may hold state that this code would compute
    differently (a loss, a schedule, a neuron): it must not be resumed.
    """
    digest = hashlib.sha256()
    sources = sorted([*root.rglob("*.py"), *root.rglob("*.cpp")], key=lambda path: path.relative_to(root).as_posix())
    for path in sources:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def fingerprint(context: StageContext, sections: dict[str, Any]) -> str:
    """Identifies a training run; a checkpoint resumes only on a match.

    ``sections`` are the params the run reads (e.g. ``{"distill": ..., "energy": ...}``);
    the seed, the exact inputs (their manifests' sha256) and the code version always count.
    """
    payload = json.dumps({"sections": sections, "seed": context.params.seed, "inputs": context.inputs,
                          "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def loop_settings(params: OptimParams, seed: int, time_steps: int, **extra) -> LoopSettings:
    return LoopSettings(
        steps=params.steps,
        batch_size=params.batch_size,
        lr=params.lr,
        threshold_lr=params.threshold_lr,
        weight_decay=params.weight_decay,
        warmup_steps=params.warmup_steps,
        grad_clip=params.grad_clip,
        eval_every=params.eval_every,
        checkpoint_every=params.checkpoint_every,
        seed=seed,
        time_steps=time_steps,
        gradient_checkpointing=params.gradient_checkpointing,
        **extra,
    )


VAL_TOP_K = 256  # teacher tokens cached per validation position
# The validation KL scores the teacher's top VAL_TOP_K tokens plus one bucket for the rest: a lower bound
# of the full KL that ``evaluate`` reports as kl_to_teacher, so it carries its own name.
VAL_KL = f"kl_top{VAL_TOP_K}_to_teacher"


def _sequence_logits(model, batch: torch.Tensor):
    """The logits of ``batch`` one sequence at a time when the model's LM head is a plain linear map (its
    hidden states run as one batch; the full-vocabulary logits exist for one sequence only), else the whole
    batch's: a generator of (rows, logits (n, L, V)) that runs the model's forward when first advanced."""
    from snn_research.training.losses import Head, final_hidden

    head = Head.of(model)
    if head is None:
        yield slice(None), model(input_ids=batch, use_cache=False).logits
        return
    hidden = final_hidden(model, batch)
    for row in range(batch.shape[0]):
        yield slice(row, row + 1), head.logits(hidden[row:row + 1])[0]


def teacher_val_targets(teacher, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k log-probabilities and ids on every validation batch, computed once."""
    from snn_research.training.losses import teacher_top_k

    targets = []
    with torch.no_grad():
        for batch in batches:
            parts = [teacher_top_k(logits, VAL_TOP_K) for _, logits in _sequence_logits(teacher, batch)]
            targets.append((torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])))
    return targets


@dataclass
class BatchScores:
    nll: float  # mean next-token NLL over the batch's predicted tokens
    kl: float  # mean top-k KL bound to the cached target over the batch's positions (0 without a target)
    penalty: float  # the energy budget's penalty (0 without a budget)
    ratio: float  # the budget's measured FFN energy ratio (0 without a budget)


def score_batch(model, batch: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor] | None = None,
                budget=None) -> BatchScores:
    """One validation batch, under no_grad: the model's forward runs (inside ``budget``, which meters it) once,
    and the losses are taken a sequence at a time (``_sequence_logits``); every sequence has the same
    length, so the batch mean is the mean of the sequences' means."""
    from snn_research.training.losses import next_token_nll, top_k_kl

    scores = BatchScores(0.0, 0.0, 0.0, 0.0)
    sequences = _sequence_logits(model, batch)
    with budget or contextlib.nullcontext():
        first = next(sequences)  # the forward, metered
        if budget is not None:
            scores.penalty, scores.ratio = float(budget.penalty(batch.numel())), budget.last_ratio
    for rows, logits in itertools.chain([first], sequences):
        share = logits.shape[0] / batch.shape[0]
        scores.nll += share * float(next_token_nll(logits, batch[rows]))
        if target is not None:
            scores.kl += share * float(top_k_kl(logits, target[0][rows], target[1][rows]))
    return scores


def sampled_positions(block_length: int, count: int, seed: int, step: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` sorted random positions that have a next token; the same for a (seed, step) on every run.

    The LM head (262k x 640 for Gemma 3) dominates a training step: the KL is scored on these only.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randperm(block_length - 1, generator=generator)[:count].sort().values.to(device)


def energy_budget(context: StageContext, model, weight: float):
    """The training-time FFN energy budget of ``energy.ffn_budget`` (None when unset or weight 0)."""
    from snn_research.training.energy_budget import EnergyBudget

    energy = context.params.energy
    if energy.ffn_budget is None or weight == 0:
        return None
    return EnergyBudget(model, energy.ffn_budget, weight, energy.e_mac_pj, energy.e_ac_pj)


def checkpoint_dir(context: StageContext, stage: str) -> Path:
    return context.paths.checkpoints / stage


def write_curves(context: StageContext, stage: str, result: LoopResult) -> dict[str, Path]:
    """DVC plot files: the training loss per step and the validation metrics per evaluation.

    ``<stage>_train.csv``: step, train_loss. ``<stage>_val.csv``: step, then the
    validation metrics in name order (a metric a row lacks is written as nan).
    """
    train_path, val_path = context.paths.plots / f"{stage}_train.csv", context.paths.plots / f"{stage}_val.csv"
    train = pd.DataFrame(result.train_losses, columns=["step", "train_loss"])
    keys = sorted({k for row in result.history for k in row if k != "step"})
    val = pd.DataFrame(result.history, columns=["step", *keys])
    write_table(train_path, train)
    write_table(val_path, val)
    return {"train": train_path, "val": val_path}


def write_table(path: Path, table: pd.DataFrame) -> None:
    """A CSV for DVC plots, written atomically; floats at full precision, missing values as nan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, table.to_csv(index=False, na_rep="nan", lineterminator="\n"))


def save_trained(context: StageContext, stage: str, folder: Path, model, tokenizer, params: dict[str, Any],
                 summary: dict[str, Any], extra_files: dict[str, str]) -> None:
    metadata = model.hybrid_metadata
    model.to("cpu")  # the files are written from CPU tensors on any device
    with atomic_directory(folder) as tmp:
        write_hybrid_files(model, tokenizer, metadata, tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        context.manifest(tmp, stage, params, summary)
    shutil.rmtree(checkpoint_dir(context, stage), ignore_errors=True)  # the run is complete: nothing to resume

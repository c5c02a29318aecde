"""Pieces distill and finetune share: loading, fingerprints, curves, writing the trained hybrid."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from snn_research.config import OptimParams
from snn_research.conversion.ann_to_snn_converter import write_hybrid_files
from snn_research.io import atomic_directory, atomic_write_text
from snn_research.stages.common import StageContext
from snn_research.training.loop import LoopResult, LoopSettings


def fingerprint(context: StageContext, section: dict[str, Any]) -> str:
    """Identifies a training run: its params and the exact inputs; a checkpoint resumes only on a match."""
    payload = json.dumps({"section": section, "seed": context.params.seed, "inputs": context.inputs}, sort_keys=True)
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
        **extra,
    )


VAL_TOP_K = 256  # teacher tokens cached per validation position


def teacher_val_targets(teacher, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k log-probabilities and ids on every validation batch, computed once."""
    from snn_research.training.losses import teacher_top_k

    with torch.no_grad():
        return [teacher_top_k(teacher(input_ids=b, use_cache=False).logits, VAL_TOP_K) for b in batches]


def sampled_positions(block_length: int, count: int, seed: int, step: int) -> torch.Tensor:
    """``count`` sorted random positions that have a next token; the same for a (seed, step) on every run.

    The LM head (262k x 640 for Gemma 3) dominates a training step: the KL is scored on these only.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randperm(block_length - 1, generator=generator)[:count].sort().values


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
    """DVC plot files: the training loss per step and the validation metrics per evaluation."""
    context.paths.plots.mkdir(parents=True, exist_ok=True)
    train_path, val_path = context.paths.plots / f"{stage}_train.csv", context.paths.plots / f"{stage}_val.csv"
    rows = ["step,train_loss"] + [f"{step},{loss:.6g}" for step, loss in result.train_losses]
    atomic_write_text(train_path, "\n".join(rows) + "\n")
    keys = sorted({k for row in result.history for k in row if k != "step"})
    lines = [",".join(["step", *keys])]
    lines += [",".join([str(row["step"]), *[f"{row.get(k, float('nan')):.6g}" for k in keys]]) for row in result.history]
    atomic_write_text(val_path, "\n".join(lines) + "\n")
    return {"train": train_path, "val": val_path}


def save_trained(context: StageContext, stage: str, folder: Path, model, tokenizer, params: dict[str, Any],
                 summary: dict[str, Any], extra_files: dict[str, str]) -> None:
    metadata = model.hybrid_metadata
    with atomic_directory(folder) as tmp:
        write_hybrid_files(model, tokenizer, metadata, tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        context.manifest(tmp, stage, params, summary)
    shutil.rmtree(checkpoint_dir(context, stage), ignore_errors=True)  # the run is complete: nothing to resume


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)

"""Training step: one distillation step of the hybrid vs one fine-tuning step of the teacher.

Same batch (4 x 256 tokens). The distillation step is the one of
``stages/distill.py``: the teacher's logits under ``no_grad``, the hybrid's
forward and backward with the KL to them at temperature 1 over the full 262k
vocabulary, only the spiking parts trainable (linear weights and thresholds),
gradient clipping and an AdamW step. The baseline is a plain fine-tuning step of
the teacher: cross-entropy, every parameter trainable, AdamW. Target: the
distillation step costs at most 2.5 fine-tuning steps. Also measured with
``kl_positions=64`` (logits at 64 random positions per block).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks.common import Row, interleaved, row
from benchmarks.hybrid_setup import BATCH, LENGTH, TIME_STEPS, teacher_and_hybrid, token_batch

TARGET = "<= 2.5"
KL_POSITIONS = 64


def distill_step(teacher, hybrid, kl_positions: int = 0):
    """The closure a training loop would call, built like ``stages/distill.py`` and ``training/loop.py``."""
    from snn_research.models.hybrid_transformer import spiking_parameter_groups
    from snn_research.training.losses import distillation_kl

    weights, dynamics = spiking_parameter_groups(hybrid)
    for param in hybrid.parameters():
        param.requires_grad_(False)
    trainable = weights + dynamics
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": weights, "lr": 1e-5}, {"params": dynamics, "lr": 1e-3, "weight_decay": 0.0}])
    hybrid.train()
    state = {"step": 0}

    def step(batch: torch.Tensor) -> float:
        keep = 0
        if kl_positions:
            generator = torch.Generator().manual_seed(state["step"])
            keep = torch.randperm(batch.shape[1] - 1, generator=generator)[:kl_positions].sort().values
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        logits = hybrid(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        if not kl_positions:
            teacher_logits, logits = teacher_logits[:, :-1], logits[:, :-1]
        loss = distillation_kl(logits, teacher_logits, 1.0, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        state["step"] += 1
        return loss.item()

    return step


def finetune_step(model):
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step(batch: torch.Tensor) -> float:
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def run(repeats: int = 2) -> list[Row]:
    teacher, hybrid, source = teacher_and_hybrid()
    batch = token_batch(teacher.config.vocab_size)
    student = copy.deepcopy(teacher)  # fine-tuned in place; the frozen teacher stays as it is
    full, positions, plain = distill_step(teacher, hybrid), distill_step(teacher, hybrid, KL_POSITIONS), finetune_step(student)
    times = interleaved({"finetune": lambda: plain(batch), "distill": lambda: full(batch),
                         f"distill-kl{KL_POSITIONS}": lambda: positions(batch)}, repeats)
    base = f"teacher fine-tuning step {times['finetune']:.2f} s"
    setup = f"{BATCH} x {LENGTH} tokens, T={TIME_STEPS}; teacher from {source}"
    return [
        row("training", "distill step / teacher fine-tune step", TARGET, times["distill"] / times["finetune"], base,
            f"distill {times['distill']:.2f} s, KL over all positions; {setup}"),
        row("training", f"distill step (kl_positions={KL_POSITIONS}) / fine-tune step", TARGET,
            times[f"distill-kl{KL_POSITIONS}"] / times["finetune"], base,
            f"distill {times[f'distill-kl{KL_POSITIONS}']:.2f} s"),
    ]

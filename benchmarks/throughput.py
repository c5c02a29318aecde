"""Hybrid forward throughput: Gemma 3 270M with 18 spiking FFNs at T=8 vs the teacher.

Forward only, batch 4 x 256 tokens, full logits, ``no_grad``. Target: the
hybrid keeps at least 0.7 of the teacher's tokens/s. Second baseline: the naive
simulation (every spiking block's ``forward_per_step``, which applies each
linear at each of the T steps), to show what running the linears on the decoded
counts saves. Also bf16: the max logit difference of a bf16 hybrid against the
fp32 one, and whether it is faster on this CPU.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from benchmarks.common import Row, TimedForward, interleaved, row
from benchmarks.hybrid_setup import BATCH, LENGTH, TIME_STEPS, teacher_and_hybrid, token_batch

TARGET = ">= 0.7"


@contextmanager
def per_step_simulation(model):
    """Run every spiking block through its naive T-step reference instead of its forward."""
    from snn_research.models.hybrid_transformer import spiking_mlps

    blocks = list(spiking_mlps(model))
    for block in blocks:
        block.forward = block.forward_per_step
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def run(repeats: int = 3) -> list[Row]:
    teacher, hybrid, source = teacher_and_hybrid()
    ids = token_batch(teacher.config.vocab_size)
    tokens = ids.numel()
    spiking = TimedForward(hybrid, ids)
    times = interleaved({"teacher": TimedForward(teacher, ids), "hybrid": spiking}, repeats)
    with per_step_simulation(hybrid):
        per_step = TimedForward(hybrid, ids)
        naive = interleaved({"naive": per_step}, repeats=1, warmup=0)["naive"]
    per_step_diff = float((per_step.logits - spiking.logits).abs().max())
    per_step_agree = float((per_step.logits.argmax(-1) == spiking.logits.argmax(-1)).float().mean())

    half = TimedForward(copy.deepcopy(hybrid).to(torch.bfloat16), ids)
    bf16_times = interleaved({"fp32": spiking, "bf16": half}, repeats=1)
    bf16_diff = float((half.logits.float() - spiking.logits).abs().max())
    bf16_agree = float((half.logits.argmax(-1) == spiking.logits.argmax(-1)).float().mean())
    logit_scale = float(spiking.logits.abs().max())
    del half

    shape = f"{BATCH} x {LENGTH} tokens, T={TIME_STEPS}, 18 spiking FFNs; teacher from {source}"
    teacher_rate, hybrid_rate = tokens / times["teacher"], tokens / times["hybrid"]
    return [
        row("throughput", "hybrid / teacher tokens/s (forward)", TARGET, hybrid_rate / teacher_rate,
            f"teacher {teacher_rate:.0f} tok/s", f"hybrid {hybrid_rate:.0f} tok/s; {shape}"),
        row("throughput", "naive per-step hybrid / teacher tokens/s", "", (tokens / naive) / teacher_rate,
            f"teacher {teacher_rate:.0f} tok/s",
            f"per-step {tokens / naive:.0f} tok/s ({naive / times['hybrid']:.1f}x slower than the hybrid); "
            f"max |logit diff| to the hybrid {per_step_diff:.3g}, same top-1 token at {per_step_agree:.1%} of positions "
            "(float summation order flips counts at quantiser edges, compounding over 18 blocks)"),
        row("throughput", "bf16 hybrid / fp32 hybrid tokens/s", "", bf16_times["fp32"] / bf16_times["bf16"],
            f"fp32 hybrid {tokens / bf16_times['fp32']:.0f} tok/s",
            f"bf16 {tokens / bf16_times['bf16']:.0f} tok/s; max |logit diff| bf16 vs fp32 {bf16_diff:.3g} "
            f"(max |logit| {logit_scale:.3g}), same top-1 token at {bf16_agree:.1%} of positions"),
    ]

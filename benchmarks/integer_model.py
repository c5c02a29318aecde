"""Whole-model forward throughput of the integer hybrid: Gemma 3 270M, every FFN spiking with the weighted code
at T = 5 and 8-bit weights on the int8 kernel, against the FP32 teacher and a W8A8 teacher on the same kernel.

Forward only, batch 4 x 256 tokens, full logits, ``no_grad``, all three timed round-robin (best of 3):
- teacher: the FP32 teacher;
- w8a8: the teacher with every FFN linear on ``hybrid.integer.w8a8_linear`` (per-token dynamic int8
  activations, per-channel int8 weights, int32 sums through ``torch._int_mm``): the deployment a user would
  pick instead, on the same integer kernel;
- integer hybrid: ``convert.weight_bits: 8``, ``set_integer_path`` (spike levels as int8 times the folded
  int8 weights on the same kernel);
- float hybrid: the same hybrid on its float path, for reference.
Targets (issue 22): the integer hybrid at >= 1.5x the FP32 teacher's tokens/s. Thresholds from two batches of
random tokens (they change spike counts, not the work of a forward pass).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.common import Row, TimedForward, interleaved, row
from benchmarks.hybrid_setup import BATCH, LENGTH, token_batch

TIME_STEPS = 5
TARGET = ">= 1.5"


class W8A8Linear(nn.Module):
    """A linear on the int8 kernel: per-token int8 activations times per-channel int8 weights."""

    def __init__(self, linear: nn.Linear) -> None:
        from snn_research.hybrid.integer import quantize_weight

        super().__init__()
        self.weight = quantize_weight(linear.weight, 8)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from snn_research.hybrid.integer import w8a8_linear

        return w8a8_linear(x, self.weight, self.bias).to(x.dtype)


def w8a8_teacher(teacher: nn.Module) -> nn.Module:
    from snn_research.models.hybrid_transformer import find_mlps

    model = copy.deepcopy(teacher)
    for location in find_mlps(model):
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(location.module, name, W8A8Linear(getattr(location.module, name)))
    return model.eval()


def integer_hybrid(teacher: nn.Module) -> nn.Module:
    from snn_research.conversion.calibrator import Calibrator
    from snn_research.models.hybrid_transformer import HybridPlan, hybridize

    calibrator = Calibrator(teacher)
    for seed in range(2):
        calibrator.observe(token_batch(teacher.config.vocab_size, seed=100 + seed))
    calibrator.remove_hooks()
    thresholds = calibrator.result(99.9).thresholds("channel")
    hybrid = copy.deepcopy(teacher)
    hybridize(hybrid, HybridPlan(time_steps=TIME_STEPS, encoder="weighted", weight_bits=8), thresholds)
    return hybrid.eval()


def run(repeats: int = 3) -> list[Row]:
    from benchmarks.common import load_gemma_teacher
    from snn_research.models.hybrid_transformer import set_integer_path

    teacher, source = load_gemma_teacher()
    ids = token_batch(teacher.config.vocab_size)
    tokens = ids.numel()
    ann = w8a8_teacher(teacher)
    hybrid = integer_hybrid(teacher)
    floating = TimedForward(hybrid, ids)
    floating()
    float_logits = floating.logits
    if set_integer_path(hybrid, True) != len(teacher.model.layers):
        raise RuntimeError("not every FFN took the integer path")
    times = interleaved({"teacher": TimedForward(teacher, ids), "w8a8": TimedForward(ann, ids),
                         "integer": (integer := TimedForward(hybrid, ids))}, repeats)
    agree = float((integer.logits.argmax(-1) == float_logits.argmax(-1)).float().mean())
    set_integer_path(hybrid, False)
    times.update(interleaved({"float": floating}, repeats))
    rate = {name: tokens / seconds for name, seconds in times.items()}
    shape = f"{BATCH} x {LENGTH} tokens, T={TIME_STEPS}, weighted code, 8-bit weights; teacher from {source}"
    return [
        row("integer_model", "integer hybrid / FP32 teacher tokens/s (forward)", TARGET, rate["integer"] / rate["teacher"],
            f"teacher {rate['teacher']:.0f} tok/s", f"integer hybrid {rate['integer']:.0f} tok/s; {shape}"),
        row("integer_model", "integer hybrid / W8A8 teacher tokens/s (same int8 kernel)", "",
            rate["integer"] / rate["w8a8"], f"W8A8 {rate['w8a8']:.0f} tok/s",
            f"integer hybrid {rate['integer']:.0f} tok/s"),
        row("integer_model", "float-path hybrid / FP32 teacher tokens/s", "", rate["float"] / rate["teacher"],
            f"teacher {rate['teacher']:.0f} tok/s",
            f"float path {rate['float']:.0f} tok/s; the integer path's top-1 agrees with it at {agree:.1%} of positions"),
    ]

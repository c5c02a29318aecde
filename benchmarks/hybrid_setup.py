"""The hybrid Gemma 3 270M the throughput and training benchmarks share.

All 18 FFNs spike at T=8 with per-channel thresholds. Thresholds come from a
short calibration (two batches of random tokens): their values change spike
counts, not the work a forward pass does, which is what is measured here.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import load_gemma_teacher

BATCH, LENGTH, TIME_STEPS = 4, 256, 8


def token_batch(vocab_size: int, seed: int = 0, batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def build_hybrid(teacher, calibration_batches: int = 2):
    """A spiking copy of ``teacher`` (the teacher itself is left analog)."""
    from snn_research.conversion.calibrator import Calibrator
    from snn_research.models.hybrid_transformer import HybridPlan, hybridize

    calibrator = Calibrator(teacher)
    for seed in range(calibration_batches):
        calibrator.observe(token_batch(teacher.config.vocab_size, seed=100 + seed))
    calibrator.remove_hooks()
    thresholds = calibrator.result(99.9).thresholds("channel")
    hybrid = copy.deepcopy(teacher)
    hybridize(hybrid, HybridPlan(time_steps=TIME_STEPS, granularity="channel"), thresholds)
    hybrid.eval()
    return hybrid


def teacher_and_hybrid():
    teacher, source = load_gemma_teacher()
    return teacher, build_hybrid(teacher), source

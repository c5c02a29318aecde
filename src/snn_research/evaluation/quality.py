"""Perplexity, bits per byte, agreement with the teacher, full-vocabulary KL to the teacher, throughput.

All models see the same test blocks; the teacher runs once per batch and every
hybrid is compared with it on that batch. Bits per byte divide the summed
next-token loss (in bits) by the UTF-8 bytes of the text the predicted tokens
cover, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QualityTotals:
    nll: float = 0.0  # nats, summed over predicted tokens
    tokens: int = 0  # predicted tokens
    forward_tokens: int = 0  # tokens fed forward (for throughput)
    bytes: int = 0
    agree: int = 0
    kl: float = 0.0  # nats, summed over predicted tokens
    seconds: float = 0.0

    def summary(self, teacher: bool) -> dict[str, float]:
        """ppl and bpb, plus top-1 agreement and the full-vocabulary KL to the teacher for any other model."""
        out = {"ppl": math.exp(self.nll / self.tokens), "bpb": self.nll / math.log(2) / self.bytes}
        if not teacher:
            out["agreement_top1"] = self.agree / self.tokens
            # over the whole vocabulary; training's validation KL covers the teacher's top 256 tokens only
            out["kl_full_to_teacher"] = self.kl / self.tokens
        return out

    def __add__(self, other: "QualityTotals") -> "QualityTotals":
        """Both sets of tokens pooled: the ppl of the sum is the token-weighted mean of the parts' (in log)."""
        return QualityTotals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def tokens_per_s(self) -> float:
        return self.forward_tokens / self.seconds if self.seconds > 0 else 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: time them to their end


def _timed_logits(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    _synchronize(input_ids.device)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    _synchronize(input_ids.device)
    return logits, time.perf_counter() - start


@torch.no_grad()
def evaluate_quality(
    teacher: nn.Module,
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    target_bytes: torch.Tensor,
    batch_size: int,
    progress: Callable[[], None] | None = None,
) -> dict[str, QualityTotals]:
    totals = {"teacher": QualityTotals(), **{name: QualityTotals() for name in models}}
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        targets = ids[:, 1:]
        batch_bytes = int(target_bytes[start:start + batch_size].sum())
        teacher_logits, seconds = _timed_logits(teacher, ids)
        teacher_log = teacher_logits.log_softmax(-1)
        teacher_top = teacher_log.argmax(-1)
        _accumulate(totals["teacher"], teacher_log, targets, seconds, ids.numel(), batch_bytes)
        for name, model in models.items():
            logits, seconds = _timed_logits(model, ids)
            log_probs = logits.log_softmax(-1)
            entry = totals[name]
            _accumulate(entry, log_probs, targets, seconds, ids.numel(), batch_bytes)
            entry.agree += int((log_probs.argmax(-1) == teacher_top).sum())
            entry.kl += float(F.kl_div(log_probs, teacher_log, log_target=True, reduction="sum"))
            del logits, log_probs
        if progress is not None:
            progress()
    return totals


def _accumulate(entry: QualityTotals, log_probs, targets, seconds: float, forward_tokens: int, batch_bytes: int) -> None:
    entry.nll -= float(log_probs.gather(-1, targets.unsqueeze(-1)).sum())
    entry.tokens += targets.numel()
    entry.forward_tokens += forward_tokens
    entry.bytes += batch_bytes
    entry.seconds += seconds

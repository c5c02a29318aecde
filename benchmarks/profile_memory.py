"""Where a fine-tuning step's resident memory goes: `python -m benchmarks.profile_memory [--model models/distilled]`.

Runs the pieces of the finetune stage's step on a real hybrid folder (default: the root's distilled
Gemma 3 hybrid) one after another, sampling the process's resident set every 5 ms, and prints the RSS after
each phase and its peak during it (GiB):
- load: ``load_hybrid``;
- validate: one validation batch through ``score_batch`` (no_grad, logits a sequence at a time);
- forward: ``final_hidden`` of one training batch with the graph kept, then the fused cross-entropy;
- backward: ``loss.backward()`` over the spiking FFNs' weights and thresholds (the stage's groups);
- optimizer: AdamW's first step (its moments appear), then the second;
- best copy: the clone of the trainable tensors the loop keeps as the best state;
- validate 2, checkpoint, steps 2 and 3: a validation, a checkpoint's optimizer state and two more steps
  with the moments and gradients alive.
Also the bytes of the model, the trainable tensors and AdamW's state, for the arithmetic. Nothing is written.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

GIB = 2**30


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Sampler:
    """The peak RSS since the last ``mark``, sampled on a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak, self.interval, self._stop = rss(), interval, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def mark(self, phase: str) -> None:
        now = rss()
        print(f"{phase:<12} rss {now / GIB:6.2f}  peak during {max(self.peak, now) / GIB:6.2f}", flush=True)
        self.peak = now

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    from snn_research.conversion.ann_to_snn_converter import load_hybrid
    from snn_research.data import load_blocks
    from snn_research.stages.training_common import score_batch
    from snn_research.training.losses import Head, final_hidden, fused_cross_entropy
    from snn_research.training.loop import LoopSettings, spiking_groups

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/distilled"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true",
                        help="recompute each decoder layer's activations in the backward pass")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sampler = Sampler()
    sampler.mark("start")
    model = load_hybrid(args.model)
    sampler.mark("load")
    batch = load_blocks(args.splits, "train").input_ids[: args.batch_size]
    with torch.no_grad():
        score_batch(model, load_blocks(args.splits, "val").input_ids[: args.batch_size])
    sampler.mark("validate")
    settings = LoopSettings(steps=2, batch_size=args.batch_size, lr=5e-6, threshold_lr=1e-4, weight_decay=0.0,
                            warmup_steps=0, grad_clip=1.0, eval_every=10, checkpoint_every=10, seed=0)
    groups = spiking_groups(model, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for g in groups for p in g["params"]]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups)
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    losses = []
    for step in range(2):
        hidden = final_hidden(model, batch)
        loss = fused_cross_entropy(hidden[:, :-1], batch[:, 1:], Head.of(model))
        losses.append(float(loss))
        sampler.mark(f"forward {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del hidden, loss
        sampler.mark(f"backward {step}")
        optimizer.step()
        sampler.mark(f"optimizer {step}")
    best = [p.detach().clone() for p in trainable]
    sampler.mark("best copy")
    model.eval()
    with torch.no_grad():
        score_batch(model, load_blocks(args.splits, "val").input_ids[: args.batch_size])
    sampler.mark("validate 2")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # what a checkpoint writes: the optimizer's state
        torch.save(optimizer.state_dict(), Path(folder) / "optimizer.pt")
    sampler.mark("checkpoint")
    model.train()
    for step in range(2, 4):
        hidden = final_hidden(model, batch)
        loss = fused_cross_entropy(hidden[:, :-1], batch[:, 1:], Head.of(model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del hidden, loss
        optimizer.step()
        sampler.mark(f"step {step}")
    grad_norm = sum(float(p.detach().double().square().sum()) for p in trainable) ** 0.5
    print(f"losses {losses}, weight norm after 4 steps {grad_norm!r}")
    sampler.stop()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    print(f"model state {model_bytes / GIB:.2f} GiB (tied tensors counted twice), trainable {train_bytes / GIB:.2f}, "
          f"AdamW state {state_bytes / GIB:.2f}, best copy {sum(b.numel() * 4 for b in best) / GIB:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

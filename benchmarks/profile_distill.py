"""Where a distillation step's time goes: `python -m benchmarks.profile_distill [--kl-positions N]`.

Times the phases of one step of ``benchmarks.training.distill_step`` on the
real teacher (4 x 256 tokens, T=8, 18 spiking FFNs) by running them apart, then
prints torch.profiler's operator table for a whole step, grouped by input shape
so that the LM head's (1024, 640) x (640, 262144) products stand out.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.hybrid_setup import teacher_and_hybrid, token_batch
from benchmarks.training import distill_step


def _timed(fn, repeats: int = 2) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def phases(teacher, hybrid, batch, kl_positions: int) -> dict[str, float]:
    from snn_research.models.hybrid_transformer import spiking_mlps
    from snn_research.training.losses import distillation_kl

    keep = torch.arange(kl_positions) * (batch.shape[1] // max(kl_positions, 1)) if kl_positions else 0
    out: dict[str, float] = {}
    with torch.no_grad():
        out["teacher forward, decoder stack"] = _timed(lambda: teacher.model(input_ids=batch, use_cache=False))
        out["teacher forward, with LM head"] = _timed(
            lambda: teacher(input_ids=batch, use_cache=False, logits_to_keep=keep))
        out["hybrid forward, decoder stack (no grad)"] = _timed(lambda: hybrid.model(input_ids=batch, use_cache=False))
        blocks = list(spiking_mlps(hybrid))
        hidden = torch.randn(batch.shape[0], batch.shape[1], hybrid.config.hidden_size)
        out["18 spiking FFNs alone (no grad)"] = _timed(lambda: [b(hidden) for b in blocks])
        out["18 input encoders alone (no grad)"] = _timed(lambda: [b._encode("input", hidden) for b in blocks])
        teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
    student = hybrid(input_ids=batch, use_cache=False, logits_to_keep=keep).logits.detach()

    def kl_forward_backward():
        logits = student.clone().requires_grad_()
        distillation_kl(logits, teacher_logits, 1.0, 0).backward()

    out["KL forward + backward (logits given)"] = _timed(kl_forward_backward)

    def hybrid_forward_backward():
        logits = hybrid(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        distillation_kl(logits, teacher_logits, 1.0, 0).backward()

    out["hybrid forward + KL + backward"] = _timed(hybrid_forward_backward)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl-positions", type=int, default=0)
    parser.add_argument("--rows", type=int, default=25, help="operator rows to print")
    args = parser.parse_args()
    teacher, hybrid, source = teacher_and_hybrid()
    batch = token_batch(teacher.config.vocab_size)
    step = distill_step(teacher, hybrid, args.kl_positions)
    whole = _timed(lambda: step(batch))
    before = resource.getrusage(resource.RUSAGE_SELF)
    step(batch)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"teacher from {source}; one distillation step (kl_positions={args.kl_positions}): {whole:.2f} s; "
          f"CPU time in the kernel {after.ru_stime - before.ru_stime:.2f} s (page faults of fresh allocations: "
          f"{after.ru_minflt - before.ru_minflt:,}), in user space {after.ru_utime - before.ru_utime:.2f} s")
    for name, seconds in phases(teacher, hybrid, batch, args.kl_positions).items():
        print(f"  {name:<45} {seconds:7.2f} s  ({seconds / whole:6.1%} of a step)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step(batch)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                              max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()

"""Calibration memory: peak RSS of calibrating the teacher at 16k, 64k and 256k tokens.

Each size runs in a fresh process (``python -m benchmarks.calibration --tokens N``)
that loads the teacher, streams random token blocks of 4 x 256 through
``conversion.calibrator.Calibrator`` (as the calibrate stage does) and reports
its peak resident set (VmHWM). Target: flat within 10% (max / min <= 1.10). The
rise over the process's size right after loading the teacher is printed too:
that is the calibrator's own memory.

The 256k-token pass runs the decoder stack over 256k tokens, several minutes
on two cores; ``BENCH_CALIBRATION_TOKENS`` (comma-separated) picks other sizes.

Allocator. The processes run with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every freed tensor goes back to the OS and
VmHWM is the peak of live memory. With glibc's default (a threshold that rises
as large blocks are freed) the peak also holds whatever freed memory glibc
keeps, which varies from run to run: the same 16k-token pass peaked anywhere
between 1842 and 2034 MiB (about 10 %), which hides the question asked here.
``BENCH_CALIBRATION_ALLOCATOR=default`` measures with the default allocator.
The fixed threshold costs time (page faults), not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import ROOT, Row, current_rss_mib, peak_rss_mib, row

TARGET = "<= 1.1"
SIZES = (16_384, 65_536, 262_144)
BATCH, LENGTH = 4, 256


def calibrate(tokens: int) -> dict:
    import torch

    from benchmarks.common import load_gemma_teacher
    from snn_research.conversion.calibrator import Calibrator

    model, source = load_gemma_teacher()
    # The weights are mapped lazily from the safetensors file: read them all once, or the embedding rows
    # that random tokens happen to touch would make the resident set grow with the token count.
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    loaded_rss, loaded_peak = current_rss_mib(), peak_rss_mib()
    calibrator = Calibrator(model)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(tokens // (BATCH * LENGTH)):
        calibrator.observe(torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=generator))
    calibrator.remove_hooks()
    result = calibrator.result(99.9)
    return {"tokens": result.tokens, "peak_mib": peak_rss_mib(), "loaded_rss_mib": loaded_rss,
            "loaded_peak_mib": loaded_peak, "seconds": time.perf_counter() - start, "source": source}


def run() -> list[Row]:
    sizes = [int(s) for s in os.environ.get("BENCH_CALIBRATION_TOKENS", ",".join(map(str, SIZES))).split(",")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    allocator = os.environ.get("BENCH_CALIBRATION_ALLOCATOR", "fixed-mmap-threshold")
    if allocator != "default":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    results = []
    for tokens in sizes:
        done = subprocess.run([sys.executable, "-m", "benchmarks.calibration", "--tokens", str(tokens)], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"calibration at {tokens} tokens failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    peaks = [r["peak_mib"] for r in results]
    detail = ", ".join(f"{r['tokens'] // 1024}k: {r['peak_mib']:.0f} MiB (+{r['peak_mib'] - r['loaded_rss_mib']:.0f} "
                       f"over the loaded teacher, {r['seconds']:.0f} s)" for r in results)
    return [row("calibration", "peak RSS max / min over token counts", TARGET, max(peaks) / min(peaks),
                f"smallest peak {min(peaks):.0f} MiB", detail + f"; teacher from {results[0]['source']}; allocator: {allocator}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(calibrate(args.tokens)))


if __name__ == "__main__":
    sys.exit(main())

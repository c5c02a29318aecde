"""Run the benchmarks and write their rows to reports/bench/.

    python -m benchmarks.run                          # all of them (30-45 minutes on 2 cores)
    python -m benchmarks.run --only neuron,throughput

Each benchmark prints its target, the measured ratio against a baseline
measured in the same run, and PASS or FAIL; INFO rows give context. The exit
code is 1 when any target fails.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from datetime import datetime, timezone

from benchmarks.common import BENCH_DIR, Row, print_rows, write_csv

BENCHMARKS = ("neuron", "kernel_binding", "throughput", "integer_linear", "integer_model", "generation", "training",
              "calibration", "pipeline")


def _run_one(name: str) -> list[Row]:
    """One benchmark's rows: each is ``benchmarks/<name>.py``'s ``run()``, imported only when chosen."""
    return importlib.import_module(f"benchmarks.{name}").run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of the spiking core and the pipeline.")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[Row] = []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in chosen:
        start = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            found = _run_one(name)
        except Exception as error:  # one broken benchmark must not hide the others
            traceback.print_exc()
            found = [Row(name, "benchmark failed to run", "", float("nan"), "", "FAIL", (str(error).splitlines() or [type(error).__name__])[0])]
        print_rows(found)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        rows.extend(found)
        write_csv(rows, BENCH_DIR / f"bench-{stamp}.csv")  # after each benchmark, so a stopped run keeps its rows
    path = write_csv(rows, BENCH_DIR / f"bench-{stamp}.csv")
    write_csv(rows, BENCH_DIR / "latest.csv")
    print("\n== summary")
    print_rows(rows)
    print(f"\nrows written to {path}")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

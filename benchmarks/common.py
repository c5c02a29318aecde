"""What every benchmark shares: result rows, interleaved timing, the teacher, peak memory."""

from __future__ import annotations

import csv
import gc
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "reports" / "bench"


@dataclass
class Row:
    benchmark: str
    metric: str
    target: str  # e.g. '>= 2.0' (a ratio), or '' for a row that only informs
    measured: float
    baseline: str  # what the ratio is taken against, measured in the same run
    verdict: str  # PASS, FAIL, INFO or SKIP
    note: str = ""


def judge(value: float, target: str) -> str:
    """'PASS' or 'FAIL' for a target written '>= x', '<= x', '< x' or '> x'."""
    op, bound = target.split()
    bound = float(bound)
    ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound, ">": value > bound}[op]
    return "PASS" if ok else "FAIL"


def row(benchmark: str, metric: str, target: str, measured: float, baseline: str, note: str = "") -> Row:
    verdict = judge(measured, target) if target else "INFO"
    return Row(benchmark, metric, target, measured, baseline, verdict, note)


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best-of-``repeats`` seconds per candidate, timed round-robin.

    Round-robin spreads slow drifts over all candidates alike; the minimum
    drops bursts of background load, which only ever add time.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_teacher_cache: dict[str, object] = {}


def load_gemma_teacher():
    """Gemma 3 270M in float32, eval mode, frozen: models/teacher when its manifest verifies, else the package."""
    if "model" in _teacher_cache:
        return _teacher_cache["model"], _teacher_cache["source"]
    from snn_research.artifacts import verify_folder
    from snn_research.teacher import load_teacher, obtain_teacher

    folder = ROOT / "models" / "teacher"
    model = None
    if (folder / "manifest.json").is_file():
        try:
            manifest, _ = verify_folder(folder, "download-teacher")
            if manifest.params.get("teacher", {}).get("source") == "package:gemma3-270m":
                model, _ = load_teacher(folder)
                source = str(folder.relative_to(ROOT))
        except Exception:  # an unverifiable folder: fall back to the package
            model = None
    if model is None:
        model = obtain_teacher("package:gemma3-270m").model
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        source = "package:gemma3-270m"
    _teacher_cache.update(model=model, source=source)
    return model, source


def write_csv(rows: list[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Row)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    tmp.replace(path)  # an interrupted run never leaves a truncated CSV
    return path


def print_rows(rows: list[Row]) -> None:
    header = f"{'benchmark':<12} {'metric':<44} {'target':>8} {'measured':>10}  {'verdict':<7} baseline / note"
    print(header)
    print("-" * len(header))
    for r in rows:
        note = r.baseline + (f"; {r.note}" if r.note else "")
        print(f"{r.benchmark:<12} {r.metric:<44} {r.target:>8} {r.measured:>10.4g}  {r.verdict:<7} {note}")


def threads() -> int:
    import torch

    return torch.get_num_threads()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class TimedForward:
    """A forward pass to time (``no_grad``, full logits, no cache) that keeps its last logits, so checks need no
    extra pass."""

    def __init__(self, model, ids):
        self.model, self.ids, self.logits = model, ids, None

    def __call__(self):
        import torch

        with torch.no_grad():
            self.logits = self.model(input_ids=self.ids, use_cache=False).logits

"""What a command cost: wall time and peak memory, recorded beside its outputs, never inside them.

Every stage (and sweep point, research step, continual run) is measured by ``snn-research`` around its work
and writes ``reports/timings/<name>.json`` in its pipeline folder, and logs the same figures to its MLflow
run as ``cost_*`` metrics. DVC never sees these files (a timing differs on every run, so an output that held
one could never be reproduced byte for byte), and no stage module imports this one: measuring a stage
changes no stage's code.

Peak resident memory is the high-water mark of this process while the work ran: on Linux the mark is reset
when the work starts (writing 5 to ``/proc/self/clear_refs``) and read from ``VmHWM`` at the end, so what
the interpreter and the imports held before counts, what an earlier stage of the same process peaked at does
not (``peak_rss_scope: stage``). Where the reset is refused, the process's whole-life peak
(``getrusage``) is recorded instead (``peak_rss_scope: process``). The kernel updates the mark lazily, so
the recorded peak is the larger of the mark and the largest sample. The resident size is also sampled once a
second (``rss_timeline``, MiB), which shows where in a stage its peak falls. On a CUDA device the peak of
torch's allocator is recorded too.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MIB = 1 << 20


class StageCost(BaseModel):
    """One command's cost: ``reports/timings/<name>.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the command measured, e.g. distill")
    finished_utc: str = Field(description="when the work ended (ISO 8601, UTC)")
    wall_s: float = Field(ge=0.0, description="wall time of the work (params read to outputs written)")
    peak_rss_bytes: int = Field(ge=0, description="peak resident memory of the process during the work")
    peak_rss_scope: Literal["stage", "process"] = Field(
        description="stage: the mark was reset when the work started; process: the process's whole-life peak")
    peak_gpu_bytes: int | None = Field(None, ge=0, description="peak of torch's CUDA allocator; null off CUDA")
    threads: int = Field(ge=1, description="torch's intra-op threads")
    processes: int = Field(ge=1, description="processes of the launch (WORLD_SIZE)")
    interval_s: float = Field(gt=0.0, description="sampling interval of rss_timeline")
    rss_timeline: list[tuple[float, int]] = Field(
        default_factory=list, description="(seconds since start, resident MiB), one sample per interval")

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics (GiB, seconds)."""
        out = {"cost_wall_s": self.wall_s, "cost_peak_rss_gib": self.peak_rss_bytes / (1 << 30)}
        if self.peak_gpu_bytes is not None:
            out["cost_peak_gpu_gib"] = self.peak_gpu_bytes / (1 << 30)
        return out


def file_name(name: str) -> str:
    """``research-step 0`` -> ``research-step-0.json``: letters, digits, dots and hyphens only."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-.")
    if not slug:
        raise ValueError(f"cost name {name!r} has no letter or digit to name its file")
    return f"{slug}.json"


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0); False where that is refused."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _whole_life_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class CostMeter:
    """``with CostMeter(name) as meter: work()``; then ``meter.cost`` holds the StageCost."""

    def __init__(self, name: str, interval_s: float = 1.0) -> None:
        self.name = name
        self.interval_s = interval_s
        self.cost: StageCost | None = None
        self.error: str | None = None  # why a successful work's cost could not be built
        self._timeline: list[tuple[float, int]] = []
        self._sampled_kib = 0  # the largest resident size sampled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scope: Literal["stage", "process"] = "process"
        self._cuda = False
        self._start = 0.0

    def __enter__(self) -> CostMeter:
        self.cost, self.error = None, None
        self._timeline, self._sampled_kib = [], 0
        self._stop = threading.Event()
        self._scope = "stage" if _reset_peak_rss() else "process"
        self._cuda = _cuda_ready()
        if self._cuda:
            import torch

            for index in range(torch.cuda.device_count()):  # the stage's device need not be the current one
                torch.cuda.reset_peak_memory_stats(index)
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, name=f"cost meter {self.name}", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            rss = _status_kib("VmRSS")
            if rss is not None:
                self._timeline.append((round(time.perf_counter() - self._start, 1), rss // 1024))
                self._sampled_kib = max(self._sampled_kib, rss)
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, kind, error, trace) -> None:
        """Stops the sampler; the cost is built only when the work succeeded (a failure records nothing, and
        its own error is never replaced by one from here). A cost that cannot be built leaves ``cost`` None
        and says why in ``error``."""
        wall = time.perf_counter() - self._start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if kind is not None:
            return
        try:
            self.cost = self._measured(wall)
        except Exception as problem:  # noqa: BLE001 - a cost that cannot be built must not fail finished work
            self.error = f"{type(problem).__name__}: {problem}"

    def _measured(self, wall: float) -> StageCost:
        hwm = _status_kib("VmHWM") if self._scope == "stage" else None
        # the kernel folds per-thread RSS counters into VmHWM lazily, so a sample can exceed it by a little
        peak = max(hwm * 1024 if hwm is not None else _whole_life_peak_bytes(), self._sampled_kib * 1024)
        import torch  # a stage has imported it already

        gpu = None
        if self._cuda or _cuda_ready():
            gpu = max(int(torch.cuda.max_memory_allocated(index)) for index in range(torch.cuda.device_count()))
        return StageCost(
            name=self.name, finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            wall_s=round(wall, 3), peak_rss_bytes=peak, peak_rss_scope="stage" if hwm is not None else "process",
            peak_gpu_bytes=gpu, threads=torch.get_num_threads(), processes=int(os.environ.get("WORLD_SIZE", "1")),
            interval_s=self.interval_s, rss_timeline=self._timeline)


def _cuda_ready() -> bool:
    """True where torch is imported and CUDA initialised (this module never initialises a device itself)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def write_cost(cost: StageCost, folder: Path) -> Path:
    """``folder/<name>.json``, written whole (a temporary file renamed over it)."""
    from snn_research.io import atomic_write_text

    path = Path(folder) / file_name(cost.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cost.model_dump(mode="json"), indent=1) + "\n")
    return path


def read_costs(folder: Path) -> list[StageCost]:
    """Every ``StageCost`` in ``folder`` (other JSON files there, e.g. continual's per-chunk seconds, are
    skipped); a file that claims to be one (has ``peak_rss_bytes``) but does not validate is refused by name."""
    costs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not readable JSON ({error})") from None
        if not isinstance(data, dict) or "peak_rss_bytes" not in data:
            continue
        try:
            costs.append(StageCost.model_validate(data))
        except ValidationError as error:
            fields = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            raise ValueError(f"{path}: not a stage cost ({fields})") from None
    return costs


def cost_table(costs: list[StageCost], order: list[str] | None = None) -> str:
    """A markdown table: seconds and peak resident GiB per command (in ``order`` first, then by name), and
    when each finished: a stage that a later ``dvc repro`` did not rerun keeps its older record."""
    rank = {name: index for index, name in enumerate(order or [])}
    rows = sorted(costs, key=lambda cost: (rank.get(cost.name, len(rank)), cost.name))
    gpu = any(cost.peak_gpu_bytes is not None for cost in rows)
    head = "| stage | seconds | peak resident GiB |" + (" peak GPU GiB |" if gpu else "") + " threads | finished (UTC) |"
    lines = [head, "|---|---|---|" + ("---|" if gpu else "") + "---|---|"]
    for cost in rows:
        scope = "" if cost.peak_rss_scope == "stage" else " (process)"
        cells = [cost.name, f"{cost.wall_s:.0f}", f"{cost.peak_rss_bytes / (1 << 30):.2f}{scope}"]
        if gpu:
            cells.append("-" if cost.peak_gpu_bytes is None else f"{cost.peak_gpu_bytes / (1 << 30):.2f}")
        cells += [str(cost.threads), cost.finished_utc]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(cost.wall_s for cost in rows)
    peak = max((cost.peak_rss_bytes for cost in rows), default=0)
    lines.append(f"| all | {total:.0f} | {peak / (1 << 30):.2f} (max) |" + (" |" if gpu else "") + " | |")
    return "\n".join(lines)

"""What every stage shares: fixed output paths, the run context, progress bars."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from snn_research.config import Params
from snn_research.tracking import Tracker

TEACHER_DIR = Path("models/teacher")
SPLITS_DIR = Path("data/splits")
CALIBRATION_DIR = Path("reports/calibration")
CONVERTED_DIR = Path("models/converted")
CONVERSION_METADATA = Path("reports/conversion_metadata.json")
DISTILLED_DIR = Path("models/distilled")
FINETUNED_DIR = Path("models/finetuned")
CHECKPOINTS_DIR = Path("models/.checkpoints")
REPORTS_DIR = Path("reports")
PLOTS_DIR = Path("reports/plots")
EVALUATION_DIR = Path("reports/evaluation")
METRICS_FILE = Path("reports/metrics.json")

console = Console(stderr=True)


@dataclass
class StageContext:
    params: Params
    params_path: Path
    tracker: Tracker
    started: float = field(default_factory=time.perf_counter)
    inputs: dict[str, str] = field(default_factory=dict)  # input folder -> its manifest's sha256

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def verify(self, folder: Path, stage: str):
        from snn_research.artifacts import verify_folder

        manifest, digest = verify_folder(folder, stage)
        self.inputs[str(folder)] = digest
        return manifest

    def manifest(self, folder: Path, stage: str, params: dict[str, Any], summary: dict[str, Any]) -> None:
        from snn_research.artifacts import write_manifest

        write_manifest(folder, stage, params, self.inputs, {**summary, "seconds": round(self.elapsed(), 2)})


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A rich progress bar on stderr; yields ``advance(n=1, **fields)``."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance

"""What every stage shares: fixed output paths, the run context, progress bars."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from snn_research.config import Params, ParamsError
from snn_research.tracking import Tracker

# stage messages quote user paths and values, which may hold [brackets]: no markup unless asked for
console = Console(stderr=True, markup=False)


@dataclass
class StageContext:
    params: Params
    params_path: Path
    tracker: Tracker
    started: float = field(default_factory=time.perf_counter)
    inputs: dict[str, str] = field(default_factory=dict)  # input folder -> its manifest's sha256

    @property
    def paths(self):
        return self.params.paths

    @functools.cached_property
    def device(self):
        """``params.device`` resolved on this machine (this rank's device in a multi-process launch)."""
        from snn_research.devices import DeviceUnavailable, resolve_device

        try:
            return resolve_device(self.params.device)
        except DeviceUnavailable as error:
            raise ParamsError(f"{self.params_path}: {error}") from None

    @functools.cached_property
    def shard(self):
        """This process's share of training (rank 0 of 1 unless launched with several processes)."""
        from snn_research.devices import current_shard

        return current_shard(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def verify(self, folder: Path, stage: str):
        from snn_research.artifacts import verify_folder

        manifest, digest = verify_folder(folder, stage)
        self.inputs[str(folder)] = digest
        return manifest

    def manifest(self, folder: Path, stage: str, params: dict[str, Any], summary: dict[str, Any]) -> None:
        """Write ``folder``'s manifest; the stage's wall-clock time goes to MLflow, never into a DVC output,
        whose bytes must not change from one run to the next."""
        from snn_research.artifacts import write_manifest

        device = self.__dict__.get("device")  # resolved (cached_property) only by stages that compute on it
        write_manifest(folder, stage, params, self.inputs, summary, device=device)
        self.tracker.log_metrics({"seconds": round(self.elapsed(), 2)})


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A rich progress bar on a terminal, a line every 30 s otherwise (DVC and CI logs); yields ``advance``."""
    if not console.is_terminal:
        state = {"done": 0, "last": time.perf_counter(), "start": time.perf_counter()}

        def advance_plain(n: int = 1, info: str = "") -> None:
            state["done"] += n
            now = time.perf_counter()
            if now - state["last"] >= 30 or state["done"] == total:
                state["last"] = now
                of_total = f"/{total}" if total else ""
                console.print(f"{description}: {state['done']}{of_total} ({now - state['start']:.0f} s) {info}")

        yield advance_plain
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance

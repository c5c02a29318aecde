"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

A pipeline run is identified by a key: ``SNN_RESEARCH_RUN_KEY`` when set (e.g.
by CI); else, when the stage runs under ``dvc repro`` / ``dvc exp run``, that
DVC process (its pid and start time, from /proc), so each invocation gets its
own parent run; else (a stage run by hand) the sha256 of the params file, the
git commit and the pipeline folder. The first stage of a run creates the parent (all params, the git commit);
every stage adds a nested run with its own params, metrics (with steps) and
artifacts, and tags the parent with the dvc.lock hash it found.

Tracking never costs a result: if the tracking server or store fails, the
stage still writes its outputs, prints that tracking failed, and exits non-zero
only when ``tracking.strict`` is set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from snn_research.config import Params

console = Console(stderr=True)


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def git_commit(folder: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _sha256_or_none(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


def dvc_invocation(max_depth: int = 8) -> str | None:
    """``dvc-<pid>-<start time>`` of the ``dvc repro``/``dvc exp`` process this one runs under, else None.

    Walks up the process tree through /proc (Linux); elsewhere, or when no DVC
    ancestor is found within ``max_depth`` levels, returns None.
    """
    pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        try:
            args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        names = [Path(a).name for a in args[:3]]  # "dvc ..." or "python .../dvc ..."
        if "dvc" in names and ("repro" in args or "exp" in args):
            return f"dvc-{pid}-{fields[19]}"  # field 22 of stat: start time in clock ticks since boot
        try:
            pid = int(fields[1])  # field 4: the parent's pid
        except (IndexError, ValueError):
            return None
    return None


def run_key(params_path: Path, commit: str) -> str:
    if os.environ.get("SNN_RESEARCH_RUN_KEY"):
        return os.environ["SNN_RESEARCH_RUN_KEY"]
    invocation = dvc_invocation()
    if invocation is not None:
        return hashlib.sha256(f"{invocation}\0{Path.cwd().resolve()}".encode()).hexdigest()[:32]
    digest = hashlib.sha256()
    digest.update(Path(params_path).read_bytes())
    digest.update(commit.encode())
    digest.update(str(Path.cwd().resolve()).encode())
    return digest.hexdigest()[:32]


class Tracker:
    """Best-effort MLflow logging for one stage; ``failed`` says whether anything was lost."""

    def __init__(self, params: Params, params_path: Path, stage: str, stage_params: dict[str, Any]) -> None:
        self.params = params
        self.stage = stage
        self.enabled = params.tracking.enabled
        self.failed: str | None = None
        self._mlflow = None
        self._nested = None
        self._parent_id = None
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._guard(self._start, Path(params_path), stage_params)

    def _guard(self, function, *args) -> None:
        if self.failed or not self.enabled:
            return
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - any tracking fault must not cost the stage's results
            self.failed = f"{type(error).__name__}: {error}"
            console.print(f"[yellow]MLflow tracking failed ({escape(self.failed)}); the stage's outputs are still written[/]")
            self._end_quietly()

    def _start(self, params_path: Path, stage_params: dict[str, Any]) -> None:
        import mlflow

        self._mlflow = mlflow
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(user_uri or self.params.tracking.uri)
        if user_uri is None:  # set_tracking_uri exports the variable too; only the user's own may override params
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        experiment = mlflow.set_experiment(self.params.tracking.experiment)
        commit = git_commit(Path.cwd())
        key = run_key(params_path, commit)
        found = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.run_key = '{key}' and tags.role = 'pipeline'",
            output_format="list",
            max_results=1,
        )
        lock = _sha256_or_none(Path("dvc.lock"))
        if found:
            self._parent_id = found[0].info.run_id
            parent = mlflow.start_run(run_id=self._parent_id)
        else:
            parent = mlflow.start_run(
                run_name=f"pipeline {Path.cwd().name} {commit[:8]}",
                tags={"role": "pipeline", "run_key": key, "git_commit": commit, "pipeline_dir": str(Path.cwd())},
            )
            self._parent_id = parent.info.run_id
            mlflow.log_params(flatten("", self.params.model_dump(mode="json"), {}))
        mlflow.set_tag("dvc_lock_sha256", lock)
        self._nested = mlflow.start_run(
            run_name=self.stage, nested=True, tags={"role": "stage", "stage": self.stage, "git_commit": commit,
                                                    "dvc_lock_sha256": lock}
        )
        if stage_params:
            mlflow.log_params(flatten("", stage_params, {}))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._nested is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        self._guard(lambda: self._mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self._nested is None or not Path(path).exists():
            return
        if Path(path).is_dir():
            self._guard(lambda: self._mlflow.log_artifacts(str(path), artifact_path=folder))
        else:
            self._guard(lambda: self._mlflow.log_artifact(str(path), artifact_path=folder))

    def within_run(self, work: Callable[[str, str], Any]) -> Any:
        """``work(tracking_uri, experiment)`` inside this stage's run, guarded like every other record (a
        failure is reported and counted, never raised); None when tracking is off or has failed."""
        if self._nested is None:
            return None
        done = []
        self._guard(lambda: done.append(work(self._mlflow.get_tracking_uri(), self.params.tracking.experiment)))
        return done[0] if done else None

    def finish(self, status: str = "FINISHED") -> None:
        if self._nested is None:
            return
        self._guard(self._end, status)
        self._nested = None

    def _end(self, status: str) -> None:
        self._mlflow.end_run(status=status)  # the nested stage run
        self._mlflow.end_run(status=status)  # the parent; the next stage reopens it

    def _end_quietly(self) -> None:
        if self._mlflow is None:
            return
        try:
            while self._mlflow.active_run() is not None:
                self._mlflow.end_run(status="FAILED")
        except Exception:  # noqa: BLE001
            pass
        self._nested = None

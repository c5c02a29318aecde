"""Pipeline overhead: a no-op ``dvc repro`` and the smoke pipeline's full run.

Works in a throw-away copy of what the smoke pipeline reads (src/ and its
dvc.yaml and params.yaml), so nothing in the real tree or its DVC cache changes:
``dvc repro -f`` of pipelines/smoke there gives the full time (target < 120 s),
then ``dvc repro`` again, now a no-op, gives the overhead (target < 3 s, the
median of two). The default pipeline's time per stage is printed from
reports/evaluation/summary.md when that exists; it is never run here.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Row, row

NOOP_TARGET = "< 3"
FULL_TARGET = "< 120"


def copy_smoke_tree(destination: Path) -> None:
    """What the smoke pipeline reads: the package source and its dvc.yaml and params.yaml."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "src"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    names = [*filter(None, listed), "pipelines/smoke/dvc.yaml", "pipelines/smoke/params.yaml"]
    for name in names:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=destination, check=True, env=dvc_env())


def dvc_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy tracks into its own mlflow.db, never a shared server
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _dvc(folder: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(["dvc", "repro", *args], cwd=folder, env=dvc_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro {' '.join(args)} in {folder} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def default_stage_times() -> str | None:
    summary = ROOT / "reports" / "evaluation" / "summary.md"
    if not summary.is_file():
        return None
    lines = summary.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Time per stage"), None)
    if start is None:
        return None
    table = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.strip():
            table.append(line)
    return "\n".join(table)


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        copy = Path(tmp)
        copy_smoke_tree(copy)
        smoke = copy / "pipelines" / "smoke"
        full = _dvc(smoke, "-f")
        noop = statistics.median(_dvc(smoke) for _ in range(2))
    rows = [
        row("pipeline", "no-op dvc repro (smoke) seconds", NOOP_TARGET, noop, "absolute: a fixed budget",
            "dvc repro right after a full run, nothing to do"),
        row("pipeline", "smoke pipeline full run seconds", FULL_TARGET, full, "absolute: a fixed budget",
            "dvc repro -f of all seven stages in a fresh copy"),
    ]
    table = default_stage_times()
    if table is None:
        print("pipeline: reports/evaluation/summary.md not found; the default pipeline has not finished a run")
    else:
        print("pipeline: the default pipeline's time per stage (reports/evaluation/summary.md):\n" + table)
        total = [line for line in table.splitlines() if "total" in line.lower()]
        rows.append(row("pipeline", "default pipeline total seconds", "", float(total[0].split("|")[2])
                        if total else float("nan"), "reports/evaluation/summary.md", "not run here"))
    return rows

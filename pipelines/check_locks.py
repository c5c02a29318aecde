"""Check that every committed dvc.lock matches the committed code and params.

A result in git is only as good as its lock: when a stage's code, params or
command changed after its dvc.lock was written, the committed numbers no longer
come from the committed code. For each pipeline with a committed dvc.lock this
runs ``dvc status`` (nothing is run or pulled) and fails naming each stage and
what changed. Missing outputs are fine: a fresh clone has none.

Run from the repository root: `python pipelines/check_locks.py` (`make check-locks`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the stage is marked to run on every repro: not a sign of a stale lock
IGNORED = {"always changed"}


def unlocked_pipelines() -> list[Path]:
    """The folders with a dvc.yaml tracked by git but no tracked dvc.lock: DVC collects every dvc.yaml, so
    such a pipeline shows as changed in every folder's `dvc status` (a never-run pipeline is committed as
    dvc.template.yaml instead; see pipelines/render_dvc.py)."""
    listed = subprocess.run(["git", "ls-files", "--", "dvc.yaml", "pipelines/*/dvc.yaml"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    locked = set(committed_locks())
    return [(ROOT / path).parent for path in listed if (ROOT / path).parent not in locked]


def committed_locks() -> list[Path]:
    """The folders whose dvc.lock is tracked by git."""
    listed = subprocess.run(["git", "ls-files", "--", "dvc.lock", "pipelines/*/dvc.lock"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [(ROOT / path).parent for path in listed]


def locked_outputs(folder: Path) -> set[str]:
    """Every output path that the lock records, absolute (a pipeline may read another's outputs)."""
    stages = yaml.safe_load((folder / "dvc.lock").read_text()).get("stages", {})
    return {os.path.normpath(folder / out["path"]) for stage in stages.values() for out in stage.get("outs", [])}


def problems(status: dict, outputs: set[str], folder: Path = ROOT) -> list[str]:
    """What ``dvc status --json`` reports beyond missing outputs: one line per stage and change.

    ``outputs`` are absolute paths; a deleted dep that is one of them (this or another committed
    pipeline's output, e.g. the root's models read by pipelines/continual) is absent in a fresh clone."""
    found = []
    for stage, changes in status.items():
        name = stage.rsplit(":", 1)[-1]
        for change in changes:
            if isinstance(change, str):
                if change not in IGNORED:
                    found.append(f"stage '{name}': {change}")
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # a params file: key -> state
                    found.extend(f"stage '{name}': param {key} {value} in {path}" for key, value in state.items())
                elif state == "deleted" and os.path.normpath(folder / path) in outputs:
                    continue  # an upstream stage's output, absent in a fresh clone
                else:
                    found.append(f"stage '{name}': dependency {path} {state}")
    return found


def check(folder: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return [f"dvc status failed ({done.returncode}): {done.stderr.strip()[-2000:]}"]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    status = json.loads(lines[-1]) if lines else {}
    outputs = set().union(*(locked_outputs(other) for other in committed_locks()))
    return problems(status, outputs, folder)


def main() -> int:
    failed = False
    for folder in unlocked_pipelines():
        failed = True
        print(f"{folder.relative_to(ROOT).as_posix() or '.'}: dvc.yaml is committed without a dvc.lock; run it and "
              "commit the lock, or commit it as dvc.template.yaml (pipelines/render_dvc.py UNRUN)")
    for folder in committed_locks():
        name = folder.relative_to(ROOT).as_posix() if folder != ROOT else "root pipeline"
        found = check(folder)
        if found:
            failed = True
            print(f"{name}: dvc.lock does not match the committed code and params "
                  f"(rerun `dvc repro` in {folder.relative_to(ROOT).as_posix() or '.'} and commit dvc.lock):")
            print("\n".join(f"  {line}" for line in found))
        else:
            print(f"{name}: dvc.lock matches")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

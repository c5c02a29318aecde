"""Sharing a run through a DVC remote, and the CI workflow that reruns the smoke pipeline.

`make push REMOTE=<folder>` then, in a fresh clone, `make pull REMOTE=<folder>` must leave nothing for
`dvc repro` to do. The round trip runs on a throw-away project of two chained one-liner stages: the smoke
pipeline's own first run takes about a minute, and the remote bookkeeping under test is the same for any
pipeline (a file output and a folder output, as the smoke pipeline has).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_dvc import dvc, git, ran

from benchmarks.pipeline import dvc_env

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "pipeline.yml"
SHELL_OPERATORS = {"&&", "||", "|", ";"}

# `write` makes a folder of numbers, `total` sums them: the second stage reads the first one's output
PIPELINE = {
    "stages": {
        "write": {
            "cmd": "python -c \"import os; os.makedirs('numbers'); "
                   "[open(f'numbers/{i}.txt', 'w').write(str(i)) for i in range(4)]\"",
            "outs": ["numbers"],
        },
        "total": {
            "cmd": "python -c \"import pathlib; numbers = pathlib.Path('numbers').iterdir(); "
                   "open('total.txt', 'w').write(str(sum(int(p.read_text()) for p in numbers)))\"",
            "deps": ["numbers"],
            "outs": ["total.txt"],
        },
    }
}
OUTPUTS = ["numbers/0.txt", "numbers/1.txt", "numbers/2.txt", "numbers/3.txt", "total.txt"]


def make(folder: Path, *args: str) -> str:
    # -o: the running venv (BIN) stands in for the one `make setup` would build in the copy
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}", *args]
    done = subprocess.run(command, cwd=folder, env=dvc_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"make {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_outputs_pushed_to_a_local_remote_are_pulled_into_a_fresh_clone_with_nothing_to_rerun(tmp_path):
    origin, clone, store = tmp_path / "origin", tmp_path / "clone", tmp_path / "store"
    origin.mkdir()
    git(origin, "init", "-q")
    git(origin, "config", "user.name", "test")  # a CI runner may have no identity
    git(origin, "config", "user.email", "test@example.org")
    dvc(origin, "init", "-q")
    shutil.copy2(ROOT / "Makefile", origin / "Makefile")
    (origin / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    assert ran(dvc(origin, "repro")) == ["write", "total"]
    assert (origin / "total.txt").read_text() == "6"
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "run")

    make(origin, "push", f"REMOTE={store}")
    # the remote's path is this machine's: it goes to the git-ignored config.local, never the committed config
    assert str(store) not in (origin / ".dvc" / "config").read_text()
    assert str(store) in (origin / ".dvc" / "config.local").read_text()

    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "total.txt").exists()
    make(clone, "pull", f"REMOTE={store}")
    assert json.loads(dvc(clone, "status", "--json")) == {}
    repro = dvc(clone, "repro")
    assert ran(repro) == [] and "Data and pipelines are up to date." in repro, repro
    for name in OUTPUTS:
        assert (clone / name).read_bytes() == (origin / name).read_bytes(), name


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def step_commands() -> list[list[list[str]]]:
    """Each step's shell lines, split into words."""
    steps = [step for job in workflow()["jobs"].values() for step in job["steps"]]
    return [[shlex.split(line) for line in step.get("run", "").splitlines()] for step in steps]


def test_workflow_runs_make_targets_that_exist():
    # a rule of its own, not `make --dry-run`: that passes for a name left only in .PHONY
    rules = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for words in itertools.chain.from_iterable(step_commands()):
        if "make" in words:
            arguments = itertools.takewhile(lambda w: w not in SHELL_OPERATORS, words[words.index("make") + 1:])
            targets = {w for w in arguments if "=" not in w and not w.startswith("-")}
            assert targets and targets <= rules, f"{shlex.join(words)}: no Makefile rule for {sorted(targets - rules)}"


def test_workflow_reads_pipelines_and_metrics_that_exist():
    for step in step_commands():
        folder = ROOT  # each step is a fresh shell in the repository root
        for words in step:
            for word, following in zip(words, words[1:]):
                if word == "cd":
                    folder = folder / following
                    assert (folder / "dvc.yaml").is_file(), f"{shlex.join(words)}: no {folder / 'dvc.yaml'}"
                elif word == "--targets":
                    assert (folder / following).is_file(), f"{shlex.join(words)}: no {folder / following}"


def test_workflow_triggers_on_paths_that_exist():
    triggers = workflow()[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["push"]["paths"] == triggers["pull_request"]["paths"]
    for pattern in triggers["push"]["paths"]:
        assert any(ROOT.glob(pattern)), f"{pattern} matches nothing in the repository"

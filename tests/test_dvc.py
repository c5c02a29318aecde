"""DVC on the smoke pipeline, in a throw-away copy: a second repro does nothing, ``dvc exp run -S
finetune.lr=...`` reruns only the stages that read it, ``dvc metrics show`` lists the metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.pipeline import copy_smoke_tree, dvc_env

pytestmark = pytest.mark.slow


def dvc(folder: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=folder, env=dvc_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def git(folder: Path, *args: str) -> None:
    done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"git {' '.join(args)} failed:\n{done.stderr}"


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc")
    copy_smoke_tree(root)
    git(root, "config", "user.name", "test")  # dvc exp run commits: a CI runner may have no identity
    git(root, "config", "user.email", "test@example.org")
    folder = root / "pipelines" / "smoke"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = dvc(folder, "repro")
    assert ran(first) == ["download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher",
                          "evaluate", "report"]
    git(root, "add", "-A")
    git(root, "commit", "-qm", "smoke run")
    return folder


def test_second_repro_does_nothing(smoke):
    assert ran(dvc(smoke, "repro")) == []


def test_exp_run_with_a_changed_finetune_lr_reruns_only_the_stages_that_read_it(smoke):
    output = dvc(smoke, "exp", "run", "-S", "finetune.lr=1e-5")
    # the analog baseline is fine-tuned with the same recipe, so it reads finetune.* too
    assert ran(output) == ["finetune", "finetune-teacher", "evaluate", "report"]
    metrics = json.loads(dvc(smoke, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    for key in ("ppl", "agreement_top1", "ffn_energy_ratio", "time_steps"):
        assert key in shown, key
    experiments = dvc(smoke, "exp", "show", "--no-pager", "--csv")
    assert "finetune.lr" in experiments and "1e-05" in experiments

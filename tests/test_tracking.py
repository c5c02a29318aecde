"""The parent-run key: one MLflow parent per `dvc repro` invocation, shared by all its stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snn_research.tracking import dvc_invocation, run_key

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")

CHILD = "from snn_research.tracking import dvc_invocation; print(dvc_invocation())"


def fake_dvc(tmp_path: Path) -> Path:
    """An executable named dvc that runs two 'stages', each printing the invocation it sees."""
    script = tmp_path / "dvc"
    script.write_text(f"#!{sys.executable}\n"
                      "import subprocess, sys\n"
                      "for _ in range(2):\n"
                      f"    subprocess.run(['/bin/sh', '-c', sys.executable + ' -c \"{CHILD}\"'], check=True)\n")
    script.chmod(0o755)
    return script


def stages_of_one_invocation(script: Path, *args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_stages_of_one_repro_share_a_key_and_invocations_differ(tmp_path):
    script = fake_dvc(tmp_path)
    first = stages_of_one_invocation(script, "repro")
    second = stages_of_one_invocation(script, "repro")
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-"), first
    assert second[0] == second[1] and second[0] != first[0]


def test_other_dvc_commands_and_plain_runs_have_no_invocation(tmp_path):
    assert stages_of_one_invocation(fake_dvc(tmp_path), "status") == ["None", "None"]
    assert dvc_invocation() is None  # pytest does not run under dvc repro


def test_run_key_outside_dvc_depends_on_params_and_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("SNN_RESEARCH_RUN_KEY", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    key = run_key(params, "abc")
    assert key == run_key(params, "abc") and key != run_key(params, "abd")
    params.write_text("seed: 1\n")
    assert run_key(params, "abc") != key
    monkeypatch.setenv("SNN_RESEARCH_RUN_KEY", "ci-42")
    assert run_key(params, "abc") == "ci-42"


def test_each_stage_in_one_process_logs_to_its_own_params_store(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI, which the tracker obeys as the user's override:
    left set, the first stage's store would capture every later stage run in the same process."""
    from mlflow.tracking import MlflowClient

    from snn_research.config import Params
    from snn_research.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    uris = [f"sqlite:///{tmp_path / name}.db" for name in ("first", "second")]
    for uri in uris:
        tracker = Tracker(Params.model_validate({"tracking": {"uri": uri}}), tmp_path / "params.yaml", "split", {})
        assert tracker.failed is None
        tracker.finish()
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for uri in uris:
        runs = MlflowClient(tracking_uri=uri).search_runs(
            [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments()])
        assert sorted(r.data.tags.get("stage", "pipeline") for r in runs) == ["pipeline", "split"]

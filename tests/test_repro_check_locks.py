"""pipelines/check_locks.py: a stale dvc.lock is named by stage and change; missing outputs are not stale."""

from __future__ import annotations

from pipelines.check_locks import ROOT, problems

STATUS = {
    "dvc.yaml:split": [{"changed deps": {"models/teacher": "deleted", "../../src/snn_research/data.py": "modified"}},
                       {"changed outs": {"data/splits": "not in cache"}}],
    "dvc.yaml:convert": [{"changed deps": {"params.yaml": {"calibrate": "new", "convert": "modified"}}},
                         "changed command"],
    "dvc.yaml:calibrate": [{"changed deps": {"models/teacher": "deleted", "data/splits": "deleted"}},
                           {"changed outs": {"reports/calibration": "deleted"}}, "always changed"],
}


def test_changed_code_params_and_command_are_named_missing_outputs_are_not():
    outputs = {str(ROOT / name) for name in ("models/teacher", "data/splits", "reports/calibration")}
    assert problems(STATUS, outputs) == [
        "stage 'split': dependency ../../src/snn_research/data.py modified",
        "stage 'convert': param calibrate new in params.yaml",
        "stage 'convert': param convert modified in params.yaml",
        "stage 'convert': changed command",
    ]


def test_a_deleted_dependency_that_no_stage_makes_is_named():
    assert problems({"dvc.yaml:split": [{"changed deps": {"../../src/snn_research/data.py": "deleted"}}]}, set()) == [
        "stage 'split': dependency ../../src/snn_research/data.py deleted"]


def test_another_pipelines_output_read_as_a_dependency_is_not_stale_when_missing():
    continual = ROOT / "pipelines" / "continual"
    status = {"dvc.yaml:adapt@none": [{"changed deps": {"../../models/finetuned": "deleted",
                                                        "../../models/teacher": "deleted"}}]}
    assert problems(status, {str(ROOT / "models" / "finetuned")}, continual) == [
        "stage 'adapt@none': dependency ../../models/teacher deleted"]

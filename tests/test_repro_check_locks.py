"""pipelines/check_locks.py: a stale dvc.lock is named by stage and change; missing outputs are not stale."""

from __future__ import annotations

from pipelines.check_locks import problems

STATUS = {
    "dvc.yaml:split": [{"changed deps": {"models/teacher": "deleted", "../../src/snn_research/data.py": "modified"}},
                       {"changed outs": {"data/splits": "not in cache"}}],
    "dvc.yaml:convert": [{"changed deps": {"params.yaml": {"calibrate": "new", "convert": "modified"}}},
                         "changed command"],
    "dvc.yaml:calibrate": [{"changed deps": {"models/teacher": "deleted", "data/splits": "deleted"}},
                           {"changed outs": {"reports/calibration": "deleted"}}, "always changed"],
}


def test_changed_code_params_and_command_are_named_missing_outputs_are_not():
    outputs = {"models/teacher", "data/splits", "reports/calibration"}
    assert problems(STATUS, outputs) == [
        "stage 'split': dependency ../../src/snn_research/data.py modified",
        "stage 'convert': param calibrate new in params.yaml",
        "stage 'convert': param convert modified in params.yaml",
        "stage 'convert': changed command",
    ]


def test_a_deleted_dependency_that_no_stage_makes_is_named():
    assert problems({"dvc.yaml:split": [{"changed deps": {"../../src/snn_research/data.py": "deleted"}}]}, set()) == [
        "stage 'split': dependency ../../src/snn_research/data.py deleted"]

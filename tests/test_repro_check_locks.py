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


def test_every_committed_dvc_yaml_has_a_committed_lock():
    from pipelines.check_locks import unlocked_pipelines

    # a lockless dvc.yaml shows as changed in every folder's `dvc status`: never-run pipelines are templates
    assert unlocked_pipelines() == []


def test_a_template_pipeline_is_enabled_by_writing_its_dvc_yaml(tmp_path, monkeypatch):
    from pipelines import render_dvc

    monkeypatch.setattr(render_dvc, "ROOT", tmp_path)
    assert render_dvc.main(["--enable", "gemma3-long"]) == 0
    written = (tmp_path / "pipelines" / "gemma3-long" / "dvc.yaml").read_text()
    assert written == render_dvc.rendered()[tmp_path / "pipelines" / "gemma3-long" / render_dvc.TEMPLATE]
    assert render_dvc.main(["--enable", "smoke"]) == 2  # not a template: it is live already

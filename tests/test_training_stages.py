"""The training stages really train: run through the CLI on a tiny random Gemma 3, distill, finetune and
finetune-teacher change the weights they own and improve what they validate; devices are checked at the
stage boundary; a checkpoint of other energy params or other code is not resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from pipeline_support import copy_pipeline, invoke, prepare, run_stages, set_dotted, tiny_params, write_params

from snn_research.artifacts import verify_folder
from snn_research.stages import distill as distill_stage
from snn_research.stages import training_common
from snn_research.stages.training_common import VAL_KL
from snn_research.teacher import load_teacher

# No layer-wise stage: what changes is the end-to-end loop's doing. T=2 and no energy budget: conversion
# costs the tiny teacher something measurable, and the KL alone decides.
END_TO_END = {"convert.time_steps": 2, "energy.ffn_budget": None, "distill.curriculum.start_time_steps": None,
              "distill.lr": 1e-4, "distill.layerwise.enabled": False, "distill.steps": 6, "distill.eval_every": 2,
              "distill.checkpoint_every": 2, "finetune.steps": 6, "finetune.eval_every": 2, "finetune.patience": 3,
              "finetune.checkpoint_every": 2}
CHECKPOINTS = Path("models/.checkpoints")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    params = set_dotted(tiny_params(), END_TO_END)
    return prepare(tmp_path_factory.mktemp("converted"), params, ("download-teacher", "split", "calibrate", "convert"))


@pytest.fixture(scope="module")
def distilled(converted, tmp_path_factory) -> Path:
    folder = copy_pipeline(converted, tmp_path_factory.mktemp("distilled"))
    return prepare(folder, set_dotted(tiny_params(), END_TO_END), ("distill",))


def spiking_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    return {name: t for name, t in tensors.items() if ".mlp." in name and name.endswith("proj.weight")}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert sorted(before) == sorted(after) and before
    return [name for name in before if not torch.equal(before[name], after[name])]


def test_distill_changes_every_spiking_weight_and_lowers_the_validation_kl(distilled):
    summary = verify_folder(distilled / "models" / "distilled", "distill")[0].summary
    assert summary["best_step"] > 0, "no end-to-end step improved on the converted model"
    assert summary["final_val"][VAL_KL] < summary["start_val"][VAL_KL]
    before = spiking_weights(distilled / "models" / "converted")
    assert changed(before, spiking_weights(distilled / "models" / "distilled")) == sorted(before, key=list(before).index)
    curves = (distilled / "reports" / "plots" / "distill_val.csv").read_text().splitlines()
    assert curves[0] == f"step,{VAL_KL},objective,ppl"
    history = json.loads((distilled / "models" / "distilled" / "history.json").read_text())["history"]
    assert [row["step"] for row in history] == [2, 4, 6] and all(VAL_KL in row for row in history)


def test_finetune_changes_the_distilled_weights_and_lowers_its_objective(distilled, tmp_path, monkeypatch):
    work = copy_pipeline(distilled, tmp_path / "work")
    monkeypatch.chdir(work)
    run_stages("finetune")
    summary = verify_folder(work / "models" / "finetuned", "finetune")[0].summary
    assert summary["best_step"] > 0 and summary["final_val"]["objective"] < summary["start_val"]["objective"]
    before = spiking_weights(work / "models" / "distilled")
    assert len(changed(before, spiking_weights(work / "models" / "finetuned"))) == len(before)


def test_finetune_teacher_trains_only_the_converted_ffn_linears(distilled, tmp_path, monkeypatch):
    work = copy_pipeline(distilled, tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {**END_TO_END, "convert.layers": [1], "finetune.kl_weight": 0.5,
                                            "finetune.kl_positions": 8}))
    result = run_stages("finetune-teacher")["finetune-teacher"]
    folder = work / "models" / "teacher_finetuned"
    manifest = verify_folder(folder, "finetune-teacher")[0]
    assert set(manifest.inputs) == {"models/teacher", "data/splits"}
    summary = manifest.summary
    assert summary["final_val"]["objective"] < summary["start_val"]["objective"]
    assert VAL_KL in summary["final_val"]  # the anchor's KL is validated like finetune's
    tuned, _ = load_teacher(folder)
    original, _ = load_teacher(work / "models" / "teacher")
    mine, theirs = tuned.state_dict(), original.state_dict()
    different = {name for name in theirs if not torch.equal(mine[name], theirs[name])}
    assert different == {f"model.layers.1.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
    assert "-> models/teacher_finetuned" in result.output
    assert not (work / CHECKPOINTS / "finetune-teacher").exists()


def test_distill_refuses_validation_targets_on_another_device(converted, tmp_path, monkeypatch):
    work = copy_pipeline(converted, tmp_path / "work")
    monkeypatch.chdir(work)

    def on_meta(teacher, batches):
        return [(torch.empty(b.shape[0], b.shape[1], 4, device="meta"), torch.empty(1, device="meta")) for b in batches]

    monkeypatch.setattr(distill_stage, "teacher_val_targets", on_meta)
    result = invoke("distill", "-p", "params.yaml")
    assert result.exit_code == 1, result.output
    assert "val_targets on meta" in result.output and "the stage runs on cpu" in result.output
    assert not (work / "models" / "distilled").exists()


def test_distill_under_an_energy_budget_validates_the_objective_it_trains(converted, tmp_path, monkeypatch):
    work = copy_pipeline(converted, tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {**END_TO_END, "energy.ffn_budget": 0.1}))
    run_stages("distill")
    summary = verify_folder(work / "models" / "distilled", "distill")[0].summary
    start, final = summary["start_val"], summary["final_val"]
    assert start["energy_ratio"] > 0.1, "the budget binds from the start"
    assert summary["best_step"] > 0, "steps that trade quality for energy under the budget count as progress"
    assert final["objective"] < start["objective"] and final["energy_ratio"] < start["energy_ratio"]
    # the penalty is part of what is validated: above the budget the objective exceeds the KL by it
    assert start["objective"] > start[VAL_KL] and final["objective"] > final[VAL_KL]


@pytest.fixture
def interrupted(converted, tmp_path, monkeypatch) -> Path:
    """A distill run that failed after training, leaving its step-2 and step-4 checkpoints (the last at 4)."""
    work = copy_pipeline(converted, tmp_path / "interrupted")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {**END_TO_END, "energy.ffn_budget": 0.9}))

    def fail(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(distill_stage, "write_curves", fail)
        assert invoke("distill", "-p", "params.yaml").exit_code == 1
    assert json.loads((work / CHECKPOINTS / "distill" / "loop" / "progress.json").read_text())["step"] == 4
    return work


def resumed_from(work: Path, changes: dict) -> int | None:
    write_params(set_dotted(tiny_params(), {**END_TO_END, "energy.ffn_budget": 0.9, **changes}))
    run_stages("distill")
    return verify_folder(work / "models" / "distilled", "distill")[0].summary["resumed_from"]


def test_distill_resumes_a_checkpoint_of_the_same_run(interrupted):
    assert resumed_from(interrupted, {}) == 4


def test_distill_does_not_resume_a_checkpoint_of_another_energy_budget(interrupted):
    assert resumed_from(interrupted, {"energy.ffn_budget": 0.8}) is None


def test_distill_does_not_resume_a_checkpoint_of_other_code(interrupted, monkeypatch):
    monkeypatch.setattr(training_common, "code_version", lambda: "f" * 64)
    assert resumed_from(interrupted, {}) is None

"""The seven stage commands, in pipeline order, on tiny random teachers: outputs, manifests, metrics shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pipeline_support import (
    STAGES,
    copy_pipeline,
    inside,
    prepare,
    run_stages,
    save_tiny_model_folder,
    set_dotted,
    tiny_params,
    write_params,
)

from snn_research.artifacts import verify_folder
from snn_research.conversion.ann_to_snn_converter import METADATA_FILE, THRESHOLDS_FILE, load_hybrid
from snn_research.data import SPLITS, load_blocks

HYBRID_METRICS = {"ppl", "bpb", "agreement_top1", "kl_to_teacher", "spike_rate", "ffn_energy_ratio",
                  "model_energy_ratio", "tokens_per_s"}
HYBRID_FILES = {"config.json", "model.safetensors", METADATA_FILE, THRESHOLDS_FILE, "tokenizer.json"}
# stage -> (output folder, files it must hold besides manifest.json)
OUTPUTS = {
    "download-teacher": ("models/teacher", {"config.json", "model.safetensors", "tokenizer.json"}),
    "split": ("data/splits", {f"{name}.safetensors" for name in SPLITS}),
    "calibrate": ("reports/calibration", {"calibration.json"}),
    "convert": ("models/converted", HYBRID_FILES),
    "distill": ("models/distilled", HYBRID_FILES | {"history.json"}),
    "finetune": ("models/finetuned", HYBRID_FILES | {"history.json"}),
    "evaluate": ("reports/evaluation", {"summary.md", "energy.json", "layers.json"}),
}
# stage -> the stages whose outputs it reads (their manifests' hashes are its manifest's inputs)
INPUTS = {
    "download-teacher": set(),
    "split": {"models/teacher"},
    "calibrate": {"models/teacher", "data/splits"},
    "convert": {"models/teacher", "reports/calibration"},
    "distill": {"models/teacher", "data/splits", "models/converted"},
    "finetune": {"data/splits", "models/distilled"},
    "evaluate": {"models/teacher", "data/splits", "reports/calibration", "models/converted", "models/distilled",
                 "models/finetuned"},
}
# the smallest run that still takes every code path: two steps of each kind
QUICK = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 2, "finetune.steps": 2, "distill.eval_every": 1,
         "finetune.eval_every": 1, "evaluate.max_blocks": 2, "evaluate.batch_size": 2}


def assert_metrics_shape(metrics: dict, timing: bool) -> None:
    assert set(metrics) == {"time_steps", "teacher", "converted", "distilled", "finetuned"}
    assert isinstance(metrics["time_steps"], int)
    assert set(metrics["teacher"]) == {"ppl", "bpb", "tokens_per_s"}
    for name in ("converted", "distilled", "finetuned"):
        assert set(metrics[name]) == HYBRID_METRICS, name
    for name in ("teacher", "converted", "distilled", "finetuned"):
        for key, value in metrics[name].items():
            if key == "tokens_per_s" and not timing:
                assert value is None, (name, key)
            else:
                assert isinstance(value, float) and math.isfinite(value), (name, key, value)
                assert value >= 0, (name, key, value)
        if timing:
            assert metrics[name]["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, dict]:
    """All seven stages, one command at a time, in a fresh folder (random:gemma3)."""
    folder = tmp_path_factory.mktemp("pipeline")
    results = {}
    with inside(folder):
        write_params(tiny_params())
        for stage in STAGES:
            results[stage] = run_stages(stage)[stage]
    return folder, results


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_writes_a_verified_output(pipeline, stage):
    folder, results = pipeline
    output, files = OUTPUTS[stage]
    manifest, _ = verify_folder(folder / output, stage)
    assert files <= set(manifest.files), set(manifest.files)
    assert set(manifest.inputs) == INPUTS[stage]
    for name, digest in manifest.inputs.items():
        assert verify_folder(folder / name)[1] == digest, f"{stage}'s input {name} changed after it ran"
    assert manifest.summary["seconds"] > 0
    assert f"{stage}: done in" in results[stage].output


def test_stages_report_what_they_made(pipeline):
    folder, results = pipeline
    teacher = verify_folder(folder / "models" / "teacher")[0].summary
    assert teacher["source"] == "random:gemma3" and teacher["model_type"] == "gemma3_text"
    assert teacher["num_layers"] == 2
    splits = verify_folder(folder / "data" / "splits")[0].summary
    for name in SPLITS:
        blocks = load_blocks(folder / "data" / "splits", name)
        assert 1 <= blocks.input_ids.shape[0] <= 8 and blocks.input_ids.shape[1] == 32
        assert splits[name]["blocks"] == blocks.input_ids.shape[0]
        assert splits[name]["tokens"] == blocks.input_ids.numel()
    assert sum(splits[name]["n_documents"] for name in SPLITS) >= 8
    assert verify_folder(folder / "reports" / "calibration")[0].summary["sites"] == 4  # 2 layers x 2 gated sites
    conversion = json.loads((folder / "reports" / "conversion_metadata.json").read_text())
    assert conversion == json.loads((folder / "models" / "converted" / METADATA_FILE).read_text())
    distilled = verify_folder(folder / "models" / "distilled")[0].summary
    assert distilled["steps_done"] == 4 and distilled["resumed_from"] is None
    assert len(distilled["layerwise"]) == 2
    assert math.isfinite(distilled["final_val"]["kl_to_teacher"])
    finetuned = verify_folder(folder / "models" / "finetuned")[0].summary
    assert finetuned["steps_done"] <= 4 and math.isfinite(finetuned["final_val"]["ppl"])
    for stage in ("distill", "finetune"):
        assert not (folder / "models" / ".checkpoints" / stage).exists(), "a finished run keeps no checkpoint"
    for name in ("distill_train.csv", "distill_val.csv", "finetune_train.csv", "layer_spike_rates.csv", "layers.png"):
        assert (folder / "reports" / "plots" / name).is_file(), name
    assert "-> models/teacher" in results["download-teacher"].output


def test_metrics_have_the_fixed_shape(pipeline):
    folder, _ = pipeline
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert_metrics_shape(metrics, timing=False)
    assert metrics["time_steps"] == 8
    assert 0 <= metrics["finetuned"]["agreement_top1"] <= 1
    assert 0 < metrics["converted"]["spike_rate"] < 1


def test_summary_has_the_time_per_stage(pipeline):
    folder, _ = pipeline
    summary = (folder / "reports" / "evaluation" / "summary.md").read_text()
    assert "## Time per stage" in summary
    table = summary.split("## Time per stage", 1)[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"stage", *STAGES, "total"}
    recorded = verify_folder(folder / "reports" / "evaluation", "evaluate")[0].summary["stage_seconds"]
    assert list(recorded) == list(STAGES)
    for stage in STAGES:
        assert rows[stage] == f"{recorded[stage]:.1f}", stage
        assert recorded[stage] > 0
    for stage in STAGES[:-1]:  # each stage's own manifest says how long it took
        assert recorded[stage] == verify_folder(folder / OUTPUTS[stage][0])[0].summary["seconds"], stage
    assert rows["total"] == f"{sum(recorded.values()):.1f}"


def test_evaluate_with_timing_reports_tokens_per_second(pipeline, tmp_path, monkeypatch):
    work = copy_pipeline(pipeline[0], tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {"evaluate.timing": True}))
    run_stages("evaluate")
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert_metrics_shape(metrics, timing=True)
    before = json.loads((pipeline[0] / "reports" / "metrics.json").read_text())
    for name in ("converted", "distilled", "finetuned"):  # timing changes no quality figure
        assert {k: v for k, v in metrics[name].items() if k != "tokens_per_s"} == \
            {k: v for k, v in before[name].items() if k != "tokens_per_s"}


def test_hybrid_checkpoint_reloads_and_generates(pipeline):
    model = load_hybrid(pipeline[0] / "models" / "finetuned")
    prompt = torch.tensor([[1, 80, 81, 82]])
    out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], prompt)


@pytest.mark.parametrize("source", ["random:gpt2", "random:llama", "path"])
def test_every_offline_teacher_source_runs_the_pipeline(source, tmp_path):
    if source == "path":
        source = f"path:{save_tiny_model_folder(tmp_path / 'saved-teacher', 'gpt2', seed=3)}"
    params = set_dotted(tiny_params(), {**QUICK, "teacher.source": source})
    folder = prepare(tmp_path / "pipeline", params, STAGES)

    teacher = verify_folder(folder / "models" / "teacher", "download-teacher")[0].summary
    assert teacher["source"] == source
    assert teacher["model_type"] == {"random:llama": "llama"}.get(source, "gpt2")
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert_metrics_shape(metrics, timing=False)
    for stage in STAGES:
        verify_folder(folder / OUTPUTS[stage][0], stage)


def test_finetune_with_a_teacher_kl_anchor(pipeline, tmp_path, monkeypatch):
    work = copy_pipeline(pipeline[0], tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {"finetune.kl_weight": 0.5, "finetune.kl_positions": 8}))
    run_stages("finetune")
    manifest = verify_folder(work / "models" / "finetuned", "finetune")[0]
    assert set(manifest.inputs) == INPUTS["finetune"] | {"models/teacher"}  # the teacher is read, so hashed
    final = manifest.summary["final_val"]
    assert math.isfinite(final["kl_to_teacher"]) and final["kl_to_teacher"] >= 0
    assert final["objective"] == pytest.approx(final["nll"] + 0.5 * final["kl_to_teacher"])
    history = json.loads((work / "models" / "finetuned" / "history.json").read_text())
    assert all("kl_to_teacher" in row for row in history["history"]), "every validation scores the KL"

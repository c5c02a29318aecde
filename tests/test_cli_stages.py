"""The stage commands, in pipeline order, on tiny random teachers: outputs, manifests, metrics shape."""

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

HYBRID_METRICS = {
    "ppl", "bpb", "agreement_top1", "kl_full_to_teacher", "ppl_ratio_to_teacher", "ppl_ratio_to_teacher_finetuned",
    "spike_rate", "break_even_spike_rate", "break_even_spike_rate_int8",
    "ffn_energy_ratio", "model_energy_ratio", "ffn_energy_ratio_int8", "model_energy_ratio_int8", "activation_bits",
    "ffn_energy_ratio_lowbit", "model_energy_ratio_lowbit",
    "ffn_memory_ratio_per_step", "model_memory_ratio_per_step", "ffn_memory_ratio_per_token",
    "model_memory_ratio_per_token",
}
HYBRID_FILES = {"config.json", "model.safetensors", METADATA_FILE, THRESHOLDS_FILE, "tokenizer.json"}
# stage -> (output folder, files it must hold besides manifest.json)
OUTPUTS = {
    "download-teacher": ("models/teacher", {"config.json", "model.safetensors", "tokenizer.json"}),
    "split": ("data/splits", {f"{name}.safetensors" for name in SPLITS}),
    "calibrate": ("reports/calibration", {"calibration.json"}),
    "convert": ("models/converted", HYBRID_FILES),
    "distill": ("models/distilled", HYBRID_FILES | {"history.json"}),
    "finetune": ("models/finetuned", HYBRID_FILES | {"history.json"}),
    "finetune-teacher": ("models/teacher_finetuned", {"config.json", "model.safetensors"}),
    "evaluate": ("reports/evaluation", {"summary.md", "energy.json", "layers.json"}),
}
# stage -> the stages whose outputs it reads (their manifests' hashes are its manifest's inputs)
INPUTS = {
    "download-teacher": set(),
    "split": {"models/teacher"},
    "calibrate": {"models/teacher", "data/splits"},
    "convert": {"models/teacher", "reports/calibration", "data/splits"},  # splits: the clipping search
    "distill": {"models/teacher", "data/splits", "models/converted"},
    "finetune": {"data/splits", "models/distilled"},
    "finetune-teacher": {"models/teacher", "data/splits"},
    "evaluate": {"models/teacher", "data/splits", "reports/calibration", "models/converted", "models/distilled",
                 "models/finetuned", "models/teacher_finetuned"},
}
# the smallest run that still takes every code path: two steps of each kind
QUICK = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 2, "finetune.steps": 2, "distill.eval_every": 1,
         "finetune.eval_every": 1, "evaluate.max_blocks": 2, "evaluate.batch_size": 2}


def assert_metrics_shape(metrics: dict) -> None:
    base = {"time_steps", "teacher", "teacher_finetuned", "converted", "distilled", "finetuned", "teacher_w8a8"}
    assert set(metrics) in (base, base | {"teacher_w8ab"})  # W8Ab for the weighted code only
    assert isinstance(metrics["time_steps"], int)
    assert set(metrics["teacher"]) == {"ppl", "bpb"}
    assert set(metrics["teacher_finetuned"]) == {"ppl", "bpb", "agreement_top1", "kl_full_to_teacher"}
    for name in ("converted", "distilled", "finetuned"):
        assert set(metrics[name]) == HYBRID_METRICS, name
    quantized = [name for name in ("teacher_w8a8", "teacher_w8ab") if name in metrics]
    for name in quantized:
        assert set(metrics[name]) == {"ppl", "bpb", "agreement_top1", "kl_full_to_teacher"}
    for name in ("teacher", "teacher_finetuned", "converted", "distilled", "finetuned", *quantized):
        for key, value in metrics[name].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
            assert value >= 0, (name, key, value)


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
    assert "seconds" not in manifest.summary  # timings go to MLflow: a DVC output must not change with them
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
    assert list(splits["domains"]) == ["shakespeare"]
    assert sum(splits["domains"]["shakespeare"][name]["n_documents"] for name in SPLITS) >= 8
    assert verify_folder(folder / "reports" / "calibration")[0].summary["sites"] == 4  # 2 layers x 2 gated sites
    conversion = json.loads((folder / "reports" / "conversion_metadata.json").read_text())
    assert conversion == json.loads((folder / "models" / "converted" / METADATA_FILE).read_text())
    distilled = verify_folder(folder / "models" / "distilled")[0].summary
    assert distilled["steps_done"] == 4 and distilled["resumed_from"] is None
    assert len(distilled["layerwise"]) == 2
    assert math.isfinite(distilled["final_val"]["kl_top256_to_teacher"])
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
    assert_metrics_shape(metrics)
    assert "teacher_w8ab" in metrics  # the smoke recipe is the weighted code
    assert metrics["time_steps"] == tiny_params()["convert"]["time_steps"]
    assert 0 <= metrics["finetuned"]["agreement_top1"] <= 1
    assert 0 < metrics["converted"]["spike_rate"] < 1


def test_evaluate_with_timing_changes_no_dvc_output(pipeline, tmp_path, monkeypatch):
    work = copy_pipeline(pipeline[0], tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {"evaluate.timing": True}))
    run_stages("evaluate")
    # tokens/s goes to MLflow only: the metrics file stays byte for byte what it was
    assert (work / "reports" / "metrics.json").read_bytes() == (pipeline[0] / "reports" / "metrics.json").read_bytes()


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
    if source != "random:llama":  # GPT-2 teachers: the weighted code is offered for gated FFNs only
        params = set_dotted(params, {"convert.encoder": "if"})
    folder = prepare(tmp_path / "pipeline", params, STAGES)

    teacher = verify_folder(folder / "models" / "teacher", "download-teacher")[0].summary
    assert teacher["source"] == source
    assert teacher["model_type"] == {"random:llama": "llama"}.get(source, "gpt2")
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert_metrics_shape(metrics)
    for stage in STAGES:
        verify_folder(folder / OUTPUTS[stage][0], stage)


def test_finetune_with_a_teacher_kl_anchor(pipeline, tmp_path, monkeypatch):
    work = copy_pipeline(pipeline[0], tmp_path / "work")
    monkeypatch.chdir(work)
    # no energy budget: the validation objective is then exactly nll + kl_weight * kl
    write_params(set_dotted(tiny_params(), {"finetune.kl_weight": 0.5, "finetune.kl_positions": 8,
                                            "energy.ffn_budget": None}))
    run_stages("finetune")
    manifest = verify_folder(work / "models" / "finetuned", "finetune")[0]
    assert set(manifest.inputs) == INPUTS["finetune"] | {"models/teacher"}  # the teacher is read, so hashed
    final = manifest.summary["final_val"]
    assert math.isfinite(final["kl_top256_to_teacher"]) and final["kl_top256_to_teacher"] >= 0
    assert final["objective"] == pytest.approx(final["nll"] + 0.5 * final["kl_top256_to_teacher"])
    history = json.loads((work / "models" / "finetuned" / "history.json").read_text())
    assert all("kl_top256_to_teacher" in row for row in history["history"]), "every validation scores the KL"

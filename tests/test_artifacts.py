"""Manifests guard every stage's inputs: a tampered, missing or damaged artifact is refused with its file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_support import (
    assert_clean_failure,
    copy_pipeline,
    invoke,
    prepare,
    rewrite_manifest_hash,
    save_tiny_model_folder,
    set_dotted,
    tiny_params,
    write_params,
)

from snn_research.artifacts import verify_folder
from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.teacher import check_model_folder, obtain_teacher


@pytest.fixture(scope="module")
def split_ready(tmp_path_factory) -> Path:
    """download-teacher and split have run (random:gemma3)."""
    return prepare(tmp_path_factory.mktemp("split"), tiny_params(), ("download-teacher", "split"))


@pytest.fixture(scope="module")
def converted_ready(tmp_path_factory, split_ready) -> Path:
    """... and calibrate and convert too."""
    folder = copy_pipeline(split_ready, tmp_path_factory.mktemp("converted"))
    return prepare(folder, tiny_params(), ("calibrate", "convert"))


@pytest.fixture
def work(split_ready, tmp_path, monkeypatch) -> Path:
    """A private copy of ``split_ready`` as the working directory."""
    monkeypatch.chdir(copy_pipeline(split_ready, tmp_path / "work"))
    return Path.cwd()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_prepared_folders_verify(split_ready):
    teacher, teacher_digest = verify_folder(split_ready / "models" / "teacher", "download-teacher")
    splits, _ = verify_folder(split_ready / "data" / "splits", "split")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(teacher.files)
    assert set(splits.files) == {f"{name}.safetensors" for name in ("train", "calib", "val", "test")}
    assert splits.inputs == {"models/teacher": teacher_digest}
    assert splits.params["data"]["block_length"] == 32
    assert "torch" in splits.versions


def test_changed_byte_in_a_split_is_refused(work):
    flip_byte(work / "data" / "splits" / "train.safetensors", -1)
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "data/splits/train.safetensors: sha256" in result.output
    assert "does not match its manifest" in result.output
    assert not (work / "reports" / "calibration").exists()


def test_missing_listed_file_is_refused(work):
    (work / "data" / "splits" / "val.safetensors").unlink()
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "data/splits/val.safetensors: listed in data/splits/manifest.json but missing" in result.output


def test_deleted_manifest_is_refused(work):
    (work / "models" / "teacher" / "manifest.json").unlink()
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "models/teacher/manifest.json: manifest is missing" in result.output
    # nothing written: the reports folder holds only the earlier stages' costs
    assert [path.name for path in (work / "reports").iterdir()] == ["timings"]
    assert not (work / "reports" / "timings" / "calibrate.json").exists()


# the field path and the value are asserted, never pydantic's own wording (which changes between releases)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("{not json", ["manifest.json: invalid manifest: not JSON (", "line 1 column 2"], id="invalid-json"),
        pytest.param(json.dumps({"stage": "download-teacher"}), ["invalid manifest: files: field required"],
                     id="no-files"),
        pytest.param(json.dumps({"stage": "upload", "files": {}}), ["invalid manifest: stage: ", "(got 'upload')"],
                     id="unknown-stage"),
        pytest.param(json.dumps({"stage": "download-teacher", "files": {}, "extra": 1}),
                     ["invalid manifest: extra: unknown key (value 1)"], id="unknown-key"),
        pytest.param(json.dumps([1, 2]), ["invalid manifest: the top level must be a JSON object (got list)"], id="list"),
    ],
)
def test_invalid_manifest_is_refused_naming_it(work, content, expected):
    (work / "models" / "teacher" / "manifest.json").write_text(content)
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    line = next(line for line in result.output.splitlines() if "models/teacher/manifest.json: invalid manifest" in line)
    assert all(part in line for part in expected), line


def test_manifest_of_another_stage_is_refused(work):
    (work / "models" / "teacher" / "manifest.json").write_text((work / "data" / "splits" / "manifest.json").read_text())
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "models/teacher/manifest.json: made by stage 'split', expected 'download-teacher'" in result.output


@pytest.mark.parametrize(
    ("stage", "missing", "maker"),
    [("calibrate", "data/splits", "split"), ("split", "models/teacher", "download-teacher"),
     ("convert", "reports/calibration", "calibrate"), ("distill", "models/converted", "convert")],
)
def test_missing_input_folder_says_which_stage_to_run(work, stage, missing, maker):
    if missing in ("data/splits", "models/teacher"):
        import shutil

        shutil.rmtree(work / missing)
    result = invoke(stage)
    assert_clean_failure(result, 1)
    assert f"{missing}: input folder is missing (run 'snn-research {maker}' first)" in result.output


def test_damaged_teacher_weights_with_matching_manifest_are_refused(work):
    weights = work / "models" / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: only the safetensors reader can tell
    rewrite_manifest_hash(work / "models" / "teacher", "model.safetensors")
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "models/teacher/model.safetensors: cannot load the weights" in result.output


def test_damaged_split_file_with_matching_manifest_is_refused(work):
    split = work / "data" / "splits" / "calib.safetensors"
    split.write_bytes(split.read_bytes()[:-10])
    rewrite_manifest_hash(work / "data" / "splits", "calib.safetensors")
    result = invoke("calibrate")
    assert_clean_failure(result, 1)
    assert "data/splits/calib.safetensors: unreadable split file" in result.output


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_damaged_hybrid_weights_are_refused(converted_ready, tmp_path, monkeypatch, damage):
    work = copy_pipeline(converted_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    weights = work / "models" / "converted" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])

    with pytest.raises(ValueError, match=r"models/converted/model\.safetensors: cannot load hybrid weights"):
        load_hybrid(work / "models" / "converted")

    rewrite_manifest_hash(work / "models" / "converted", "model.safetensors")
    result = invoke("distill")
    assert_clean_failure(result, 1)
    assert "models/converted/model.safetensors: cannot load hybrid weights" in result.output
    assert not (work / "models" / "distilled").exists()


def test_intact_converted_folder_verifies_and_loads(converted_ready):
    manifest, _ = verify_folder(converted_ready / "models" / "converted", "convert")
    assert "model.safetensors" in manifest.files
    model = load_hybrid(converted_ready / "models" / "converted")
    assert model.hybrid_metadata.plan.time_steps == tiny_params()["convert"]["time_steps"]


# --- teacher folders: refused before any weights are read ------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path) -> Path:
    return save_tiny_model_folder(tmp_path / "teacher-folder", "llama")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if anything reads model weights."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the folder was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_model_folder_is_accepted(model_folder):
    assert check_model_folder(model_folder) == "hf"
    teacher = obtain_teacher(f"path:{model_folder}")
    assert teacher.model.config.model_type == "llama"
    assert teacher.source == f"path:{model_folder}"


def test_folder_without_tokenizer_is_refused(model_folder, no_weight_reads):
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (model_folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"teacher-folder: no tokenizer file"):
        obtain_teacher(f"path:{model_folder}")


def test_folder_with_only_pickle_weights_is_refused(model_folder, no_weight_reads):
    (model_folder / "model.safetensors").rename(model_folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(found pickle files \['pytorch_model\.bin'\]"):
        obtain_teacher(f"path:{model_folder}")


def test_remote_code_folder_is_refused(model_folder, no_weight_reads):
    config_path = model_folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: the model needs remote code \(auto_map\), which is never trusted"):
        obtain_teacher(f"path:{model_folder}")


def test_unsupported_model_type_is_refused(model_folder, no_weight_reads):
    config_path = model_folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported"):
        check_model_folder(model_folder)


def test_refused_path_teacher_through_the_cli(model_folder, workdir, no_weight_reads):
    (model_folder / "tokenizer.json").unlink()
    write_params(set_dotted(tiny_params(), {"teacher.source": f"path:{model_folder}"}))
    result = invoke("download-teacher")
    assert_clean_failure(result, 1)
    assert f"{model_folder}: no tokenizer file" in result.output
    assert not (workdir / "models" / "teacher").exists()


def test_trust_remote_code_cannot_be_set(workdir):
    write_params(set_dotted(tiny_params(), {"teacher.trust_remote_code": True}))
    result = invoke("download-teacher")
    assert_clean_failure(result, 2)
    assert "teacher.trust_remote_code: unknown key (value True)" in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


def test_messages_with_square_brackets_are_printed_verbatim(workdir):
    # rich would read '[/x]' as a closing markup tag and crash while reporting the error
    write_params(set_dotted(tiny_params(), {"teacher.source": "path:[/x]/[bold]model"}))
    result = invoke("download-teacher")
    assert_clean_failure(result, 1)
    assert "error in download-teacher: [/x]/[bold]model: teacher path is not a folder" in result.output
    assert "loading path:[/x]/[bold]model" in result.output

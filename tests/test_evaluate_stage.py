"""The evaluate stage on a tiny pipeline: metric names, the fine-tuned teacher reference, host-free outputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from pipeline_support import inside, run_stages, tiny_params, write_params

from snn_research.artifacts import MANIFEST, verify_folder, write_manifest

HYBRID_METRICS = [
    "ppl", "bpb", "agreement_top1", "kl_full_to_teacher", "ppl_ratio_to_teacher", "ppl_ratio_to_teacher_finetuned",
    "spike_rate", "break_even_spike_rate", "break_even_spike_rate_int8", "ffn_energy_ratio", "model_energy_ratio",
    "ffn_energy_ratio_int8", "model_energy_ratio_int8", "activation_bits", "ffn_energy_ratio_lowbit",
    "model_energy_ratio_lowbit", "ffn_memory_ratio_per_step", "model_memory_ratio_per_step",
    "ffn_memory_ratio_per_token", "model_memory_ratio_per_token",
]


def copy_as(source: Path, target: Path, stage: str, change=None) -> None:
    """``source``'s files in ``target`` (``change``d) with a manifest that says ``stage`` made them."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST))
    if change is not None:
        change(target)
    write_manifest(target, stage, {})


def perturb_norms(folder: Path) -> None:
    """Shift every norm weight of the saved model: a reference that differs from the teacher."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v + 0.5 if k.endswith("norm.weight") else v for k, v in tensors.items()}, path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """Teacher, split, calibration and conversion run; the converted hybrid stands in for the trained ones and a
    teacher with shifted norm weights for the fine-tuned teacher."""
    folder = tmp_path_factory.mktemp("evaluate")
    with inside(folder):
        write_params(tiny_params())
        run_stages("download-teacher", "split", "calibrate", "convert")
        copy_as(folder / "models" / "converted", folder / "models" / "distilled", "distill")
        copy_as(folder / "models" / "converted", folder / "models" / "finetuned", "finetune")
        copy_as(folder / "models" / "teacher", folder / "models" / "teacher_finetuned", "finetune-teacher",
                change=perturb_norms)
        run_stages("evaluate")
    return folder


def test_metrics_name_every_figure_and_nothing_host_dependent(evaluated):
    metrics = json.loads((evaluated / "reports" / "metrics.json").read_text())
    assert list(metrics) == ["time_steps", "teacher", "teacher_finetuned", "converted", "distilled", "finetuned",
                             "teacher_w8a8", "teacher_w8ab"]  # the quantised ANNs after the hybrids
    assert list(metrics["teacher"]) == ["ppl", "bpb"]
    for name in ("teacher_finetuned", "teacher_w8a8", "teacher_w8ab"):
        assert list(metrics[name]) == ["ppl", "bpb", "agreement_top1", "kl_full_to_teacher"], name
    convert = tiny_params()["convert"]
    levels = 2 ** convert["time_steps"] - 1 if convert["encoder"] == "weighted" else convert["time_steps"]
    bits = math.ceil(math.log2(2 * levels + 1))  # a signed count in [-L, L]
    for name in ("converted", "distilled", "finetuned"):
        assert list(metrics[name]) == HYBRID_METRICS, name
        row = metrics[name]
        assert row["ppl_ratio_to_teacher"] == pytest.approx(row["ppl"] / metrics["teacher"]["ppl"], rel=1e-5)
        assert row["activation_bits"] == bits, (name, convert)
        assert row["ffn_energy_ratio_int8"] > row["ffn_energy_ratio"], "the INT8 FFN is cheaper than the FP32 one"
        assert row["ffn_memory_ratio_per_step"] > row["ffn_memory_ratio_per_token"]
    summary = verify_folder(evaluated / "reports" / "evaluation", "evaluate")[0].summary
    assert set(summary) == {"test_tokens", "metrics_sha256"}, "no timings in a DVC output"


def test_hybrids_are_measured_against_both_references(evaluated):
    metrics = json.loads((evaluated / "reports" / "metrics.json").read_text())
    reference, teacher = metrics["teacher_finetuned"], metrics["teacher"]
    assert reference["ppl"] != teacher["ppl"] and reference["agreement_top1"] < 1
    assert reference["kl_full_to_teacher"] > 0
    for name in ("converted", "distilled", "finetuned"):
        row = metrics[name]
        assert row["ppl_ratio_to_teacher"] == pytest.approx(row["ppl"] / teacher["ppl"], rel=1e-5)
        assert row["ppl_ratio_to_teacher_finetuned"] == pytest.approx(row["ppl"] / reference["ppl"], rel=1e-5)


def test_a_copy_of_the_teacher_scores_as_the_teacher(evaluated, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(evaluated, work)
    shutil.rmtree(work / "models" / "teacher_finetuned")
    copy_as(work / "models" / "teacher", work / "models" / "teacher_finetuned", "finetune-teacher")
    with inside(work):
        run_stages("evaluate")
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    reference, teacher = metrics["teacher_finetuned"], metrics["teacher"]
    assert reference["ppl"] == teacher["ppl"] and reference["bpb"] == teacher["bpb"]
    assert reference["agreement_top1"] == 1.0 and reference["kl_full_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_summary_and_tables_name_the_full_kl_and_keep_their_columns(evaluated):
    summary = (evaluated / "reports" / "evaluation" / "summary.md").read_text()
    assert "kl_full_to_teacher" in summary and "| teacher_finetuned |" in summary
    assert "Time per stage" not in summary and "tokens/s" not in summary
    assert "Integer hybrids" not in summary and "FP32 accumulate" in summary  # float weights: no integer table
    plots = evaluated / "reports" / "plots"
    with open(plots / "layer_spike_rates.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["layer", *[f"{n}_{s}" for n in ("converted", "distilled", "finetuned")
                                  for s in ("input", "second")]]
    assert [int(row[0]) for row in rows[1:]] == [0, 1]
    with open(plots / "layer_ffn_error.csv") as handle:
        assert next(csv.reader(handle)) == ["layer", "converted", "distilled", "finetuned"]
    energy = json.loads((evaluated / "reports" / "evaluation" / "energy.json").read_text())
    site = energy["finetuned"]["sites"][0]
    assert {"spike_rate", "break_even_spike_rate", "break_even_spike_rate_int8"} <= set(site)


def test_timing_goes_to_mlflow_only(evaluated, monkeypatch):
    from snn_research.tracking import Tracker

    logged: dict[str, float] = {}
    monkeypatch.setattr(Tracker, "log_metrics", lambda self, metrics, step=None: logged.update(metrics))
    before = (evaluated / "reports" / "metrics.json").read_bytes()
    with inside(evaluated):
        write_params(tiny_params(evaluate__timing=True), "timed.yaml")
        run_stages("evaluate", params="timed.yaml")
    assert (evaluated / "reports" / "metrics.json").read_bytes() == before
    assert logged["finetuned.tokens_per_s"] > 0 and logged["teacher_finetuned.tokens_per_s"] > 0
    assert logged["finetuned.kl_full_to_teacher"] == json.loads(before)["finetuned"]["kl_full_to_teacher"]


def test_evaluate_registers_the_finetuned_hybrid_and_moves_the_champion_only_on_a_win(evaluated, tmp_path):
    import mlflow

    from snn_research.generate import GenerationOptions, generate, load_model_folder

    work = tmp_path / "work"
    shutil.copytree(evaluated, work)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params(tracking__enabled=True, tracking__uri=uri, tracking__strict=True,
                         evaluate__registry__name="tiny-evaluated")
    with inside(work):
        write_params(params)
        first = run_stages("evaluate")["evaluate"]
        again = run_stages("evaluate")["evaluate"]
    assert "registered tiny-evaluated version 1, which is now champion: no champion yet" in first.output
    # the same hybrid again: equal ppl does not beat the champion
    assert "registered tiny-evaluated version 2, which is not champion" in again.output

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("tiny-evaluated", "champion")
    assert int(champion.version) == 1
    run = client.get_run(champion.run_id)
    assert run.data.tags["stage"] == "evaluate", "logged into the evaluate stage's own run"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "conversion")] == ["conversion/hybrid.json"]
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert float(champion.tags["metric_value"]) == metrics["finetuned"]["ppl"]

    loaded = mlflow.pyfunc.load_model("models:/tiny-evaluated@champion")
    text = loaded.predict(["To be, or"], params={"max_new_tokens": 3})
    model, tokenizer, kind = load_model_folder(work / "models" / "finetuned")
    assert kind == "hybrid"
    assert text == [generate(model, tokenizer, "To be, or", GenerationOptions(max_new_tokens=3)).text]


def test_evaluate_without_a_registry_name_registers_nothing(evaluated, tmp_path):
    import mlflow

    work = tmp_path / "work"
    shutil.copytree(evaluated, work)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with inside(work):
        write_params(tiny_params(tracking__enabled=True, tracking__uri=uri, evaluate__registry__name=None))
        result = run_stages("evaluate")["evaluate"]
    assert "registered" not in result.output
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().search_registered_models() == []


def test_the_evaluation_record_holds_the_hash_of_the_metrics_it_wrote(evaluated):
    """``register`` binds a metrics file to its evaluation through this hash."""
    from snn_research.io import sha256_file

    record = json.loads((evaluated / "reports" / "evaluation" / "manifest.json").read_text())
    assert record["summary"]["metrics_sha256"] == sha256_file(evaluated / "reports" / "metrics.json")

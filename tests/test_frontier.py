"""The frontier command of pipelines/sweep-t: metrics files of several T -> one CSV and one plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pipeline_support import assert_clean_failure, invoke

from snn_research.evaluation.report import MetricsDocument
from snn_research.evaluation.frontier import frontier_points, write_frontier

# the columns plots and READMEs read: the first nine as before (the KL now named for the full vocabulary)
COLUMNS = ["time_steps", "model", "ppl", "bpb", "agreement_top1", "kl_full_to_teacher", "spike_rate",
           "ffn_energy_ratio", "model_energy_ratio", "ffn_energy_ratio_int8", "ffn_energy_ratio_lowbit",
           "ffn_memory_ratio_per_step", "ffn_memory_ratio_per_token"]


def metrics(time_steps: int, ppl: float, energy: float) -> dict:
    hybrid = {"ppl": ppl, "bpb": 2.0, "agreement_top1": 0.7, "kl_full_to_teacher": 0.3,
              "ppl_ratio_to_teacher": ppl / 70.0, "ppl_ratio_to_teacher_finetuned": ppl / 60.0, "spike_rate": 0.1,
              "break_even_spike_rate": 0.3, "break_even_spike_rate_int8": 0.02, "ffn_energy_ratio": energy,
              "model_energy_ratio": 0.8, "ffn_energy_ratio_int8": energy * 20, "model_energy_ratio_int8": 1.5,
              "activation_bits": 5, "ffn_energy_ratio_lowbit": energy * 30, "model_energy_ratio_lowbit": 1.7,
              "ffn_memory_ratio_per_step": 4.0, "model_memory_ratio_per_step": 3.0,
              "ffn_memory_ratio_per_token": 0.6, "model_memory_ratio_per_token": 0.9}
    return {"time_steps": time_steps, "teacher": {"ppl": 70.0, "bpb": 1.8},
            "teacher_finetuned": {"ppl": 60.0, "bpb": 1.7, "agreement_top1": 0.8, "kl_full_to_teacher": 0.1},
            "converted": {**hybrid, "ppl": ppl * 2}, "distilled": {**hybrid, "ppl": ppl * 1.5}, "finetuned": hybrid}


def write(folder: Path, name: str, document: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(document))
    return path


def test_frontier_writes_one_row_per_time_steps_and_model(tmp_path):
    files = [write(tmp_path, f"t{t}.json", metrics(t, 100.0 / t, 0.05 * t)) for t in (8, 2, 4)]
    result = invoke("frontier", *map(str, files), "--csv", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "f.png"))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "f.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    finetuned = [r for r in rows if r["model"] == "finetuned"]
    assert [int(r["time_steps"]) for r in finetuned] == [2, 4, 8]
    assert [float(r["ppl"]) for r in finetuned] == [50.0, 25.0, 12.5]
    assert [float(r["ffn_energy_ratio"]) for r in finetuned] == pytest.approx([0.1, 0.2, 0.4])
    converted = [r for r in rows if r["model"] == "converted"]
    assert [float(r["ppl"]) for r in converted] == [100.0, 50.0, 25.0]
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "finetuned T=  8  ppl 12.500" in result.output
    assert list(rows[0]) == COLUMNS
    assert [float(r["ffn_energy_ratio_int8"]) for r in finetuned] == pytest.approx([2.0, 4.0, 8.0])


def test_frontier_table_keeps_the_columns_and_the_values(tmp_path):
    files = [write(tmp_path, f"t{t}.json", metrics(t, 100.0 / t, 0.05 * t)) for t in (4, 2)]
    points = write_frontier(files, tmp_path / "f.csv", tmp_path / "f.png")
    with open(tmp_path / "f.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS
    assert [(r["model"], int(r["time_steps"])) for r in rows] == [
        ("converted", 2), ("converted", 4), ("distilled", 2), ("distilled", 4), ("finetuned", 2), ("finetuned", 4)]
    assert [float(r["kl_full_to_teacher"]) for r in rows] == [0.3] * 6
    assert [float(r["ffn_memory_ratio_per_step"]) for r in rows] == [4.0] * 6
    assert points[0]["ppl"] == 100.0 and points[-1]["ffn_energy_ratio_lowbit"] == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("{not json", "not JSON", id="not-json"),
        pytest.param(json.dumps({"time_steps": 8}), "teacher", id="missing-section"),
        pytest.param(json.dumps({**metrics(8, 10, 0.2), "extra": 1}), "extra", id="unknown-key"),
        pytest.param(json.dumps({**metrics(8, 10, 0.2), "teacher": {"ppl": 70.0, "bpb": 1.8, "tokens_per_s": 9.0}}),
                     "tokens_per_s", id="host-dependent-figure"),
        pytest.param(json.dumps({**metrics(8, 10, 0.2), "time_steps": 0}), "time_steps", id="bad-time-steps"),
    ],
)
def test_bad_metrics_file_is_refused_naming_it(tmp_path, content, expected):
    good = write(tmp_path, "good.json", metrics(4, 10, 0.2))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = invoke("frontier", str(good), str(bad), "--csv", str(tmp_path / "f.csv"), "--plot", str(tmp_path / "f.png"))
    assert_clean_failure(result, 1)
    assert "bad.json" in result.output and expected in result.output
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "f.png").exists()


def test_missing_file_and_repeated_time_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="absent.json: cannot read"):
        frontier_points([tmp_path / "absent.json"])
    first = write(tmp_path, "a.json", metrics(8, 10, 0.2))
    second = write(tmp_path, "b.json", metrics(8, 11, 0.2))
    with pytest.raises(ValueError, match="b.json: T=8 again"):
        frontier_points([first, second])


def test_metrics_document_is_the_documented_shape():
    MetricsDocument.model_validate(metrics(8, 10, 0.2))
    with pytest.raises(ValueError):
        MetricsDocument.model_validate({**metrics(8, 10, 0.2), "finetuned": {"ppl": 1.0}})


def test_unwritable_output_is_refused_naming_it(tmp_path):
    good = write(tmp_path, "good.json", metrics(4, 10, 0.2))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("frontier", str(good), "--csv", str(blocker / "f.csv"), "--plot", str(tmp_path / "f.png"))
    assert_clean_failure(result, 1)
    assert "a-file" in result.output

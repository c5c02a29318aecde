"""reports/metrics.json as evaluate writes it: the documented shape, and files that are refused naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snn_research.evaluation.report import MetricsDocument, read_metrics


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
    assert read_metrics(write(tmp_path, "good.json", metrics(4, 10, 0.2))).time_steps == 4
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json") as error:
        read_metrics(bad)
    assert expected in str(error.value)


def test_a_missing_metrics_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="absent.json: cannot read"):
        read_metrics(tmp_path / "absent.json")



def test_metrics_document_is_the_documented_shape():
    MetricsDocument.model_validate(metrics(8, 10, 0.2))
    with pytest.raises(ValueError):
        MetricsDocument.model_validate({**metrics(8, 10, 0.2), "finetuned": {"ppl": 1.0}})

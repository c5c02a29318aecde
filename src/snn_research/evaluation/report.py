"""The DVC metrics document and the Markdown summary of an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snn_research.errors import format_validation_error
from snn_research.evaluation.energy import EnergyReport
from snn_research.evaluation.quality import QualityTotals

HYBRID_KEYS = ("ppl", "bpb", "agreement_top1", "kl_to_teacher", "spike_rate", "ffn_energy_ratio",
               "model_energy_ratio", "tokens_per_s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TeacherMetrics(_Strict):
    ppl: float = Field(gt=0)
    bpb: float = Field(ge=0)
    tokens_per_s: float | None = Field(ge=0)


class HybridMetrics(_Strict):
    ppl: float = Field(gt=0)
    bpb: float = Field(ge=0)
    agreement_top1: float = Field(ge=0, le=1)
    kl_to_teacher: float = Field(ge=0)
    spike_rate: float = Field(ge=0)
    ffn_energy_ratio: float = Field(ge=0)
    model_energy_ratio: float = Field(ge=0)
    tokens_per_s: float | None = Field(ge=0)


class MetricsDocument(_Strict):
    """The fixed shape of ``reports/metrics.json``."""

    time_steps: int = Field(ge=1)
    teacher: TeacherMetrics
    converted: HybridMetrics
    distilled: HybridMetrics
    finetuned: HybridMetrics


def read_metrics(path: Path | str) -> MetricsDocument:
    """A metrics.json, validated; ValueError naming the file and the field otherwise."""
    try:
        return MetricsDocument.model_validate(json.loads(Path(path).read_text()))
    except OSError as error:
        raise ValueError(f"{path}: cannot read metrics ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not a metrics.json") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    except ValidationError as error:
        raise ValueError(f"{path}: not a metrics.json of the evaluate stage: {format_validation_error(error)}") from None


def metrics_document(time_steps: int, totals: dict[str, QualityTotals], energy: dict[str, EnergyReport],
                     timing: bool) -> dict:
    """``{"time_steps", "teacher": {ppl, bpb, tokens_per_s}, <hybrid>: {the eight HYBRID_KEYS}}``."""
    document: dict = {"time_steps": time_steps, "teacher": totals["teacher"].summary(teacher=True, timing=timing)}
    for name, report in energy.items():
        quality = totals[name].summary(teacher=False, timing=timing)
        values = {
            **quality,
            "spike_rate": report.mean_spike_rate,
            "ffn_energy_ratio": report.ffn_energy_ratio,
            "model_energy_ratio": report.model_energy_ratio,
        }
        document[name] = {key: _round(values[key]) for key in HYBRID_KEYS}
    document["teacher"] = {key: _round(value) for key, value in document["teacher"].items()}
    try:  # the documented shape; a NaN or infinite figure is refused rather than written
        MetricsDocument.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"metrics.json would not be valid, so it was not written: "
                         f"{format_validation_error(error)}") from None
    return document


def _round(value: float | None) -> float | None:
    # 6 significant digits: stable text for DVC diffs, far below run-to-run differences that matter
    return None if value is None else float(f"{value:.6g}")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_markdown(metrics: dict, layer_rows: list[dict], hybrids: list[str], stage_seconds: dict,
                     test_tokens: int) -> str:
    teacher = metrics["teacher"]
    lines = [
        f"# Evaluation at T = {metrics['time_steps']} ({test_tokens:,} test tokens)",
        "",
        "| model | ppl | ppl / teacher | bpb | top-1 agreement | KL to teacher | spike rate | FFN energy | model energy | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | {_fmt(teacher['ppl'], 2)} | 1.000 | {_fmt(teacher['bpb'])} | | | | 1.000 | 1.000 | "
        f"{_fmt(teacher['tokens_per_s'], 0)} |",
    ]
    for name in hybrids:
        row = metrics[name]
        lines.append(
            f"| {name} | {_fmt(row['ppl'], 2)} | {_fmt(row['ppl'] / teacher['ppl'])} | {_fmt(row['bpb'])} | "
            f"{_fmt(row['agreement_top1'])} | {_fmt(row['kl_to_teacher'], 4)} | {_fmt(row['spike_rate'], 4)} | "
            f"{_fmt(row['ffn_energy_ratio'])} | {_fmt(row['model_energy_ratio'])} | {_fmt(row['tokens_per_s'], 0)} |"
        )
    lines += ["", "## Per layer (finetuned unless noted)", "",
              "| layer | input spike rate | second-site spike rate | FFN output error (rel. sq.) |", "|---|---|---|---|"]
    last = hybrids[-1]
    for row in layer_rows:
        lines.append(f"| {row['layer']} | {_fmt(row[f'{last}_input'], 4)} | {_fmt(row[f'{last}_second'], 4)} | "
                     f"{_fmt(row[f'{last}_error'], 5)} |")
    worst = sorted(layer_rows, key=lambda r: -r[f"{last}_error"])[:3]
    lines += ["", "Layers adding the most FFN error: " + ", ".join(f"{r['layer']} ({r[f'{last}_error']:.4f})"
                                                                  for r in worst), ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    total = 0.0
    for stage, seconds in stage_seconds.items():
        lines.append(f"| {stage} | {_fmt(seconds, 1)} |")
        total += seconds or 0.0
    lines += [f"| total | {total:.1f} |", ""]
    return "\n".join(lines)

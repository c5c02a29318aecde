"""The DVC metrics document, the Markdown summary and the CSV tables of an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snn_research.errors import format_validation_error
from snn_research.evaluation.quality import QualityTotals

REFERENCES = ("teacher", "teacher_finetuned")  # the ANN references every hybrid is measured against
QUANTIZED = ("teacher_w8a8", "teacher_w8ab")  # the quantised ANNs a user would deploy instead


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TeacherMetrics(_Strict):
    ppl: float = Field(gt=0)
    bpb: float = Field(ge=0)


class ReferenceMetrics(_Strict):
    """The teacher fine-tuned with the hybrids' recipe: what the same training does without spikes."""

    ppl: float = Field(gt=0)
    bpb: float = Field(ge=0)
    agreement_top1: float = Field(ge=0, le=1)
    kl_full_to_teacher: float = Field(ge=0, description="KL(teacher || model) over the full vocabulary, nats/token")


class HybridMetrics(_Strict):
    ppl: float = Field(gt=0)
    bpb: float = Field(ge=0)
    agreement_top1: float = Field(ge=0, le=1)
    kl_full_to_teacher: float = Field(ge=0, description="KL(teacher || model) over the full vocabulary, nats/token")
    ppl_ratio_to_teacher: float = Field(gt=0)
    ppl_ratio_to_teacher_finetuned: float = Field(gt=0)
    spike_rate: float = Field(ge=0, description="spikes per neuron per time step, all sites")
    break_even_spike_rate: float = Field(ge=0, description="rate at which the spiking FFNs cost as much as FP32 ones")
    break_even_spike_rate_int8: float = Field(ge=0, description="the same against INT8 FFNs")
    ffn_energy_ratio: float = Field(ge=0, description="against the FP32 teacher")
    model_energy_ratio: float = Field(ge=0)
    ffn_energy_ratio_int8: float = Field(ge=0, description="against the teacher with INT8 weights and activations")
    model_energy_ratio_int8: float = Field(ge=0)
    activation_bits: int = Field(ge=1, description="bits of the low-bit baseline's FFN activations")
    ffn_energy_ratio_lowbit: float = Field(ge=0, description="against 8-bit weights x activation_bits activations")
    model_energy_ratio_lowbit: float = Field(ge=0)
    ffn_memory_ratio_per_step: float = Field(ge=0, description="FP32, weights read once per time step")
    model_memory_ratio_per_step: float = Field(ge=0)
    ffn_memory_ratio_per_token: float = Field(ge=0, description="FP32, weights read once per token")
    model_memory_ratio_per_token: float = Field(ge=0)
    # an integer-weight hybrid only (convert.weight_bits): against the integer ANNs, priced with the same parts
    ffn_energy_ratio_w8a8: float | None = Field(None, ge=0, description="against the W8A8 ANN's FFNs")
    model_energy_ratio_w8a8: float | None = Field(None, ge=0)
    ffn_energy_ratio_w8ab: float | None = Field(None, ge=0, description="against 8-bit weights x b-bit activations")
    model_energy_ratio_w8ab: float | None = Field(None, ge=0)
    synaptic_events_per_synapse: float | None = Field(None, ge=0, description="events a synapse carries per token")
    break_even_spike_rate_w8a8: float | None = Field(None, ge=0)
    ffn_memory_ratio_w8a8_batch1: float | None = Field(None, ge=0, description="with int8 weight reads at batch 1, "
                                                       "the hybrid reading the columns of inputs that spiked")
    ffn_memory_ratio_w8a8_read_batch: float | None = Field(None, ge=0, description="the same for read_batch "
                                                           "sequences decoded together")
    read_batch: int | None = Field(None, ge=1, description="sequences per batch of the read_batch figure")
    silent_input_fraction: float | None = Field(None, ge=0, le=1, description="synapses whose input did not spike "
                                                "for a token, weighted by fan-out")


HYBRID_KEYS = tuple(HybridMetrics.model_fields)
INTEGER_KEYS = ("ffn_energy_ratio_w8a8", "model_energy_ratio_w8a8", "ffn_energy_ratio_w8ab",
                "model_energy_ratio_w8ab", "synaptic_events_per_synapse", "break_even_spike_rate_w8a8",
                "ffn_memory_ratio_w8a8_batch1", "ffn_memory_ratio_w8a8_read_batch", "read_batch",
                "silent_input_fraction")
HYBRIDS = ("converted", "distilled", "finetuned")


class DomainMetrics(_Strict):
    """Every model on one text domain's test blocks; spike rate and energy move with the text, so they are here too."""

    seen: bool = Field(description="whether calibration and training drew from this domain (weight > 0)")
    test_tokens: int = Field(ge=1, description="predicted tokens scored")
    teacher: TeacherMetrics
    teacher_finetuned: ReferenceMetrics
    converted: HybridMetrics
    distilled: HybridMetrics
    finetuned: HybridMetrics
    teacher_w8a8: ReferenceMetrics | None = None
    teacher_w8ab: ReferenceMetrics | None = None


class MetricsDocument(_Strict):
    """The fixed shape of ``reports/metrics.json``: nothing in it depends on the host or the time.

    With several text domains the top-level figures pool every domain's test tokens (for ppl, the
    token-weighted mean of the domains' log-perplexities) and ``domains`` holds each domain's own.
    """

    time_steps: int = Field(ge=1)
    teacher: TeacherMetrics
    teacher_finetuned: ReferenceMetrics
    converted: HybridMetrics
    distilled: HybridMetrics
    finetuned: HybridMetrics
    teacher_w8a8: ReferenceMetrics | None = Field(None, description="the teacher, spiking FFNs quantised W8A8")
    teacher_w8ab: ReferenceMetrics | None = Field(None, description="the teacher, spiking FFNs with 8-bit weights "
                                                  "and the converted hybrid's activation quantiser")
    domains: dict[str, DomainMetrics] | None = Field(None, description="per text domain (runs with several)")


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


def metrics_document(time_steps: int, totals: dict[str, QualityTotals], energy: dict[str, dict[str, float]],
                     domains: dict[str, tuple[bool, dict[str, QualityTotals], dict[str, dict[str, float]]]] | None = None,
                     ) -> dict:
    """metrics.json: quality of every model, and for each hybrid its ppl ratios and ``energy[name]``
    (``baselines.compare`` of its energy report, plus ``spike_rate``); with ``domains`` (name -> seen, that
    domain's totals and energy figures) each domain's own figures too."""
    document = _models_document(totals, energy)
    document = {"time_steps": time_steps, **document}
    if domains is not None:
        document["domains"] = {
            name: {"seen": seen, "test_tokens": domain_totals["teacher"].tokens,
                   **_models_document(domain_totals, domain_energy)}
            for name, (seen, domain_totals, domain_energy) in domains.items()}
    try:  # the documented shape; a NaN or infinite figure is refused rather than written
        MetricsDocument.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"metrics.json would not be valid, so it was not written: "
                         f"{format_validation_error(error)}") from None
    return document


def _models_document(totals: dict[str, QualityTotals], energy: dict[str, dict[str, float]]) -> dict:
    teacher = totals["teacher"].summary(teacher=True)
    reference = totals["teacher_finetuned"].summary(teacher=False)
    document: dict = {"teacher": teacher, "teacher_finetuned": reference}
    for name, figures in energy.items():
        quality = totals[name].summary(teacher=False)
        values = {**quality, **figures, "ppl_ratio_to_teacher": quality["ppl"] / teacher["ppl"],
                  "ppl_ratio_to_teacher_finetuned": quality["ppl"] / reference["ppl"]}
        document[name] = {key: _round(values[key]) for key in HYBRID_KEYS
                          if key not in INTEGER_KEYS or key in values}
        document[name]["activation_bits"] = int(values["activation_bits"])
        if "read_batch" in document[name]:
            document[name]["read_batch"] = int(values["read_batch"])
    for name in QUANTIZED:
        if name in totals:
            document[name] = totals[name].summary(teacher=False)
    for name in (*REFERENCES, *QUANTIZED):
        if name in document:
            document[name] = {key: _round(value) for key, value in document[name].items()}
    return document


def _round(value: float) -> float:
    # 6 significant digits: stable text for DVC diffs, far below run-to-run differences that matter
    return float(f"{value:.6g}")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def summary_markdown(metrics: dict, layer_rows: list[dict], hybrids: list[str], test_tokens: int) -> str:
    """The evaluation at a glance: quality, energy against each baseline, spike rates per layer."""
    teacher, reference = metrics["teacher"], metrics["teacher_finetuned"]
    lines = [
        f"# Evaluation at T = {metrics['time_steps']} ({test_tokens:,} test tokens)",
        "",
        "KL is KL(teacher || model) over the full vocabulary (nats per token); training's validation KL "
        "covers the teacher's top 256 tokens only and is a lower bound of it.",
        "",
        "| model | ppl | ppl / teacher | ppl / teacher finetuned | bpb | top-1 agreement | kl_full_to_teacher |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {_fmt(teacher['ppl'], 2)} | 1.000 | {_fmt(teacher['ppl'] / reference['ppl'])} | "
        f"{_fmt(teacher['bpb'])} | | |",
        f"| teacher_finetuned | {_fmt(reference['ppl'], 2)} | {_fmt(reference['ppl'] / teacher['ppl'])} | 1.000 | "
        f"{_fmt(reference['bpb'])} | {_fmt(reference['agreement_top1'])} | {_fmt(reference['kl_full_to_teacher'], 4)} |",
    ]
    for name in QUANTIZED:
        if metrics.get(name):
            row = metrics[name]
            lines.append(f"| {name} | {_fmt(row['ppl'], 2)} | {_fmt(row['ppl'] / teacher['ppl'])} | "
                         f"{_fmt(row['ppl'] / reference['ppl'])} | {_fmt(row['bpb'])} | {_fmt(row['agreement_top1'])} | "
                         f"{_fmt(row['kl_full_to_teacher'], 4)} |")
    for name in hybrids:
        row = metrics[name]
        lines.append(
            f"| {name} | {_fmt(row['ppl'], 2)} | {_fmt(row['ppl_ratio_to_teacher'])} | "
            f"{_fmt(row['ppl_ratio_to_teacher_finetuned'])} | {_fmt(row['bpb'])} | {_fmt(row['agreement_top1'])} | "
            f"{_fmt(row['kl_full_to_teacher'], 4)} |"
        )
    if metrics.get("domains"):
        lines += ["", *domain_table(metrics["domains"], hybrids)]
    integer = [name for name in hybrids if metrics[name].get("ffn_energy_ratio_w8a8") is not None]
    lines += ["", "## Energy against each baseline (hybrid / baseline, per token)", ""]
    if integer:
        lines += [*integer_energy_table(metrics, integer), ""]
    lines += [
        ("Every spike priced as an FP32 accumulate (45 nm FP32 table), whatever the hybrid's weights"
         + (f" ({', '.join(integer)} hold int8 weights and run on integer adds: the table above prices them so)"
            if integer else "") + "; the INT8 and low-bit ANNs re-price the teacher; memory adds weight reads, "
         "the spiking linears' weights read once per time step or once per token."),
        "",
        "| model | spike rate | break-even FP32 | break-even INT8 | FFN FP32 | FFN INT8 | FFN low-bit (bits) | "
        "FFN +memory per step | FFN +memory per token | model FP32 | model INT8 | model low-bit | "
        "model +memory per step | model +memory per token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in hybrids:
        row = metrics[name]
        lines.append(
            f"| {name} | {_fmt(row['spike_rate'], 4)} | {_fmt(row['break_even_spike_rate'], 4)} | "
            f"{_fmt(row['break_even_spike_rate_int8'], 4)} | {_fmt(row['ffn_energy_ratio'])} | "
            f"{_fmt(row['ffn_energy_ratio_int8'])} | {_fmt(row['ffn_energy_ratio_lowbit'])} ({row['activation_bits']}) | "
            f"{_fmt(row['ffn_memory_ratio_per_step'])} | {_fmt(row['ffn_memory_ratio_per_token'])} | "
            f"{_fmt(row['model_energy_ratio'])} | {_fmt(row['model_energy_ratio_int8'])} | "
            f"{_fmt(row['model_energy_ratio_lowbit'])} | {_fmt(row['model_memory_ratio_per_step'])} | "
            f"{_fmt(row['model_memory_ratio_per_token'])} |"
        )
    last = hybrids[-1]
    lines += ["", f"## Per layer ({last})", "",
              "| layer | input spike rate | break-even FP32 / INT8 | second-site spike rate | break-even FP32 / INT8 "
              "| FFN output error (rel. sq.) |", "|---|---|---|---|---|---|"]
    for row in layer_rows:
        lines.append(
            f"| {row['layer']} | {_fmt(row[f'{last}_input'], 4)} | {_fmt(row[f'{last}_input_break_even'], 4)} / "
            f"{_fmt(row[f'{last}_input_break_even_int8'], 4)} | {_fmt(row[f'{last}_second'], 4)} | "
            f"{_fmt(row[f'{last}_second_break_even'], 4)} / {_fmt(row[f'{last}_second_break_even_int8'], 4)} | "
            f"{_fmt(row[f'{last}_error'], 5)} |")
    worst = sorted(layer_rows, key=lambda r: -r[f"{last}_error"])[:3]
    lines += ["", "Layers adding the most FFN error: " + ", ".join(f"{r['layer']} ({r[f'{last}_error']:.4f})"
                                                                  for r in worst), ""]
    return "\n".join(lines)


def integer_energy_table(metrics: dict, hybrids: list[str]) -> list[str]:
    """Markdown lines: integer-weight hybrids against the integer ANNs, both priced with the same parts."""
    bits = metrics[hybrids[-1]].get("activation_bits")
    batch = metrics[hybrids[-1]].get("read_batch")
    lines = ["Integer hybrids against the integer ANNs a user would deploy, both sides priced with the same parts "
             "(an int32 accumulate per synaptic event or per MAC, an int8 multiply per MAC on the ANN's side): "
             f"W8A8 (per-token 8-bit activations) and W8A{bits} (the hybrid's {bits} activation bits); "
             "+reads adds the int8 weight bytes read, the hybrid reading only the columns of inputs that spiked "
             f"(batch 1, and {batch} sequences decoded together).", "",
             "| model | events per synapse | spike rate | break-even W8A8 | FFN W8A8 | FFN W8Ab | model W8A8 | "
             "model W8Ab | FFN +reads W8A8 batch 1 | FFN +reads W8A8 batch b | silent inputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in hybrids:
        row = metrics[name]
        lines.append(
            f"| {name} | {_fmt(row['synaptic_events_per_synapse'])} | {_fmt(row['spike_rate'], 4)} | "
            f"{_fmt(row['break_even_spike_rate_w8a8'], 4)} | {_fmt(row['ffn_energy_ratio_w8a8'])} | "
            f"{_fmt(row['ffn_energy_ratio_w8ab'])} | {_fmt(row['model_energy_ratio_w8a8'])} | "
            f"{_fmt(row['model_energy_ratio_w8ab'])} | {_fmt(row.get('ffn_memory_ratio_w8a8_batch1'))} | "
            f"{_fmt(row.get('ffn_memory_ratio_w8a8_read_batch'))} (b = {row.get('read_batch', 'n/a')}) | "
            f"{_fmt(row.get('silent_input_fraction'))} |")
    return lines


def domain_table(domains: dict, hybrids: list[str]) -> list[str]:
    """Markdown lines: per domain the teacher's ppl and each model's ppl ratio (agreement, KL), FFN energy."""
    # an integer hybrid's FFN against the W8A8 ANN (the same integer parts), a float one's against FP32
    integer = all(entry["finetuned"].get("ffn_energy_ratio_w8a8") is not None for entry in domains.values())
    energy_key = "ffn_energy_ratio_w8a8" if integer else "ffn_energy_ratio"
    energy_label = "FFN energy / W8A8 (finetuned)" if integer else "FFN energy (FP32, finetuned)"
    lines = ["## Per text domain", "",
             "Each cell: ppl over the teacher's (top-1 agreement, KL); the fine-tuned hybrid also over "
             "teacher_finetuned's. Unseen: no stage calibrated or trained on it.", "",
             "| domain | tokens | teacher ppl | teacher_finetuned | " + " | ".join(hybrids)
             + f" | finetuned / teacher_finetuned | {energy_label} |",
             "|---|---|---|---|" + "---|" * len(hybrids) + "---|---|"]
    for name, entry in domains.items():
        teacher, reference = entry["teacher"], entry["teacher_finetuned"]
        cells = [f"{_fmt(entry[h]['ppl_ratio_to_teacher'])} ({_fmt(entry[h]['agreement_top1'])}, "
                 f"{_fmt(entry[h]['kl_full_to_teacher'])})" for h in hybrids]
        label = name if entry["seen"] else f"{name} (unseen)"
        lines.append(f"| {label} | {entry['test_tokens']:,} | {_fmt(teacher['ppl'], 2)} | "
                     f"{_fmt(reference['ppl'] / teacher['ppl'])} | " + " | ".join(cells)
                     + f" | {_fmt(entry['finetuned']['ppl_ratio_to_teacher_finetuned'])} | "
                     f"{_fmt(entry['finetuned'][energy_key])} |")
    return lines


def write_table(table: pd.DataFrame, path: Path) -> None:
    """``table`` as CSV, atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)

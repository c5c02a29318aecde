"""evaluate: teacher, converted, distilled and finetuned side by side on the test split.

Writes ``reports/metrics.json`` (DVC metrics, a fixed shape), per-layer plots
data, a Markdown summary with the time every stage took, and the full energy
reports under ``reports/evaluation/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from snn_research.artifacts import read_manifest
from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.evaluation.energy import measure_energy
from snn_research.evaluation.layers import ffn_output_errors
from snn_research.evaluation.plots import plot_layers
from snn_research.evaluation.quality import evaluate_quality
from snn_research.evaluation.report import metrics_document, summary_markdown
from snn_research.io import atomic_directory, atomic_write_text
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.stages.training_common import write_csv
from snn_research.teacher import load_teacher



def stage_folders(paths) -> dict[str, Path]:
    return {"download-teacher": paths.teacher, "split": paths.splits, "calibrate": paths.calibration,
            "convert": paths.converted, "distill": paths.distilled, "finetune": paths.finetuned}


def run(context: StageContext) -> None:
    params = context.params.evaluate
    folders = stage_folders(context.paths)
    for stage, folder in folders.items():
        context.verify(folder, stage)
    teacher, _ = load_teacher(context.paths.teacher)
    hybrids = {name: load_hybrid(folders[stage]) for name, stage in
               (("converted", "convert"), ("distilled", "distill"), ("finetuned", "finetune"))}
    time_steps = hybrids["finetuned"].hybrid_metadata.plan.time_steps
    test = spread(load_blocks(context.paths.splits, "test"), params.max_blocks)
    ids, target_bytes = test.input_ids, test.target_bytes
    batches = -(-ids.shape[0] // params.batch_size)
    with progress_bar("evaluating", batches) as advance:
        totals = evaluate_quality(teacher, hybrids, ids, target_bytes, params.batch_size, progress=advance)
    energy_ids = spread(test, params.energy_blocks).input_ids
    energy = {name: measure_energy(model, energy_ids, context.params.energy.e_mac_pj, context.params.energy.e_ac_pj) for name, model in hybrids.items()}
    layer_errors = {name: ffn_output_errors(teacher, model, energy_ids) for name, model in hybrids.items()}

    metrics = metrics_document(time_steps, totals, energy, params.timing)
    atomic_write_text(context.paths.metrics, json.dumps(metrics, indent=2) + "\n")
    layer_rows = _layer_rows(energy, layer_errors)
    write_csv(context.paths.plots / "layer_spike_rates.csv", ["layer", *[f"{n}_{s}" for n in hybrids for s in ("input", "second")]],
              [[row["layer"], *[row[f"{n}_{s}"] for n in hybrids for s in ("input", "second")]] for row in layer_rows])
    write_csv(context.paths.plots / "layer_ffn_error.csv", ["layer", *hybrids],
              [[row["layer"], *[row[f"{n}_error"] for n in hybrids]] for row in layer_rows])
    plot_layers(layer_rows, list(hybrids), context.paths.plots / "layers.png")
    stage_seconds = {stage: read_manifest(folder).summary.get("seconds") for stage, folder in folders.items()}
    stage_seconds["evaluate"] = round(context.elapsed(), 2)
    summary = summary_markdown(metrics, layer_rows, list(hybrids), stage_seconds, ids.numel())
    with atomic_directory(context.paths.evaluation) as tmp:
        (tmp / "summary.md").write_text(summary)
        (tmp / "energy.json").write_text(json.dumps({n: _energy_dict(r) for n, r in energy.items()}, indent=2))
        (tmp / "layers.json").write_text(json.dumps(layer_rows, indent=2))
        context.manifest(tmp, "evaluate", {"evaluate": params.model_dump(), "seed": context.params.seed},
                         {"test_tokens": int(ids.numel()), "stage_seconds": stage_seconds})
    for name, values in metrics.items():
        if isinstance(values, dict):
            context.tracker.log_metrics({f"{name}.{k}": v for k, v in values.items() if v is not None})
    for path in (context.paths.metrics, context.paths.evaluation / "summary.md", context.paths.plots / "layers.png"):
        context.tracker.log_artifact(path)
    console.print(summary)


def _layer_rows(energy, layer_errors) -> list[dict]:
    layers = sorted({int(site.key.split(".mlp:")[0].rsplit(".", 1)[-1]) for r in energy.values() for site in r.sites})
    rows = []
    for layer in layers:
        row: dict = {"layer": layer}
        for name, report in energy.items():
            rates = [s.spike_rate for s in report.sites if s.key.split(".mlp:")[0].endswith(f".{layer}")]
            row[f"{name}_input"], row[f"{name}_second"] = (rates + [float("nan")] * 2)[:2]
            row[f"{name}_error"] = layer_errors[name].get(layer, float("nan"))
        rows.append(row)
    return rows


def _energy_dict(report) -> dict:
    return {
        **report.summary(),
        "tokens": report.tokens,
        "sequence_length": report.sequence_length,
        "sites": [site.__dict__ for site in report.sites],
        "hybrid_ops_per_token": {k: {"macs": v[0], "acs": v[1]} for k, v in report.hybrid_ops.items()},
        "teacher_ops_per_token": {k: {"macs": v[0], "acs": v[1]} for k, v in report.teacher_ops.items()},
    }

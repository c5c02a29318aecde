"""frontier: one point per T from the sweep's metrics files -> a CSV (DVC plots) and a PNG.

Not one of the seven stages: it closes the ``pipelines/sweep-t`` profile, which runs
convert -> distill -> finetune -> evaluate once per T.
"""

from __future__ import annotations

import json
from pathlib import Path

from snn_research.evaluation.plots import plot_frontier
from snn_research.stages.training_common import write_csv

COLUMNS = ("time_steps", "model", "ppl", "bpb", "agreement_top1", "kl_to_teacher", "spike_rate", "ffn_energy_ratio",
           "model_energy_ratio")


def frontier_points(metrics_files: list[Path]) -> tuple[list[dict], float]:
    points, teacher_ppl = [], None
    for path in metrics_files:
        try:
            metrics = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read metrics ({error})") from None
        teacher_ppl = metrics["teacher"]["ppl"]
        for model in ("converted", "distilled", "finetuned"):
            points.append({"time_steps": metrics["time_steps"], "model": model,
                           **{key: metrics[model][key] for key in COLUMNS[2:]}})
    if not points:
        raise ValueError("no metrics files given")
    return sorted(points, key=lambda p: (p["model"], p["time_steps"])), teacher_ppl


def write_frontier(metrics_files: list[Path], csv_path: Path, plot_path: Path) -> list[dict]:
    points, teacher_ppl = frontier_points(metrics_files)
    write_csv(csv_path, list(COLUMNS), [[p[c] for c in COLUMNS] for p in points])
    plot_frontier(points, plot_path, teacher_ppl)
    return points

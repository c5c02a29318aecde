"""frontier: one point per T from the sweep's metrics files -> a CSV (DVC plots) and a PNG.

Not one of the seven stages: it closes the ``pipelines/sweep-t`` profile, which runs
convert -> distill -> finetune -> evaluate once per T.
"""

from __future__ import annotations

from pathlib import Path

from snn_research.evaluation.plots import plot_frontier
from snn_research.evaluation.report import read_metrics
from snn_research.stages.training_common import write_csv

COLUMNS = ("time_steps", "model", "ppl", "bpb", "agreement_top1", "kl_to_teacher", "spike_rate", "ffn_energy_ratio",
           "model_energy_ratio")


def frontier_points(metrics_files: list[Path]) -> tuple[list[dict], float]:
    """One row per (T, model) from the evaluate stage's metrics files; ValueError naming a bad file."""
    if not metrics_files:
        raise ValueError("no metrics files given")
    points, teacher_ppl, seen = [], None, {}
    for path in metrics_files:
        metrics = read_metrics(path)
        if metrics.time_steps in seen:
            raise ValueError(f"{path}: T={metrics.time_steps} again (already in {seen[metrics.time_steps]})")
        seen[metrics.time_steps] = path
        teacher_ppl = metrics.teacher.ppl
        for model in ("converted", "distilled", "finetuned"):
            values = getattr(metrics, model).model_dump()
            points.append({"time_steps": metrics.time_steps, "model": model, **{key: values[key] for key in COLUMNS[2:]}})
    return sorted(points, key=lambda p: (p["model"], p["time_steps"])), teacher_ppl


def write_frontier(metrics_files: list[Path], csv_path: Path, plot_path: Path) -> list[dict]:
    points, teacher_ppl = frontier_points(metrics_files)
    for path in (csv_path, plot_path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{path}: cannot create its folder ({error.strerror or error})") from None
    try:  # the plot first: a plot that fails leaves the old CSV and PNG as a pair
        plot_frontier(points, plot_path, teacher_ppl)
        write_csv(csv_path, list(COLUMNS), [[p[c] for c in COLUMNS] for p in points])
    except OSError as error:
        raise ValueError(f"{error.filename or csv_path}: cannot write ({error.strerror or error})") from None
    return points

"""The quality/energy frontier of a T sweep: one row per (T, hybrid) from the evaluate stage's metrics files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from snn_research.evaluation.plots import plot_frontier
from snn_research.evaluation.report import HYBRIDS, read_metrics, write_table

COLUMNS = ("time_steps", "model", "ppl", "bpb", "agreement_top1", "kl_full_to_teacher", "spike_rate",
           "ffn_energy_ratio", "model_energy_ratio", "ffn_energy_ratio_int8", "ffn_energy_ratio_lowbit",
           "ffn_memory_ratio_per_step", "ffn_memory_ratio_per_token")


def frontier_table(metrics_files: list[Path]) -> tuple[pd.DataFrame, float]:
    """(rows sorted by model then T, the teacher's ppl); ValueError naming a bad or repeated file."""
    if not metrics_files:
        raise ValueError("no metrics files given")
    rows, teacher_ppl, seen = [], None, {}
    for path in metrics_files:
        metrics = read_metrics(path)
        if metrics.time_steps in seen:
            raise ValueError(f"{path}: T={metrics.time_steps} again (already in {seen[metrics.time_steps]})")
        seen[metrics.time_steps] = path
        teacher_ppl = metrics.teacher.ppl
        for model in HYBRIDS:
            values = getattr(metrics, model).model_dump()
            rows.append({"time_steps": metrics.time_steps, "model": model, **{key: values[key] for key in COLUMNS[2:]}})
    table = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["model", "time_steps"], ignore_index=True)
    return table, teacher_ppl


def frontier_points(metrics_files: list[Path]) -> tuple[list[dict], float]:
    table, teacher_ppl = frontier_table(metrics_files)
    return table.to_dict("records"), teacher_ppl


def write_frontier(metrics_files: list[Path], csv_path: Path, plot_path: Path) -> list[dict]:
    table, teacher_ppl = frontier_table(metrics_files)
    points = table.to_dict("records")
    for path in (csv_path, plot_path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{path}: cannot create its folder ({error.strerror or error})") from None
    try:  # the plot first: a plot that fails leaves the old CSV and PNG as a pair
        plot_frontier(points, plot_path, teacher_ppl)
        write_table(table, csv_path)
    except OSError as error:
        raise ValueError(f"{error.filename or csv_path}: cannot write ({error.strerror or error})") from None
    return points


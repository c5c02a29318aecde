"""The quality/energy frontier of a sweep: one row per point file (``evaluation/sweep.py``), a CSV and a plot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from snn_research.evaluation.plots import plot_frontier
from snn_research.evaluation.report import write_table
from snn_research.evaluation.sweep import SweepPoint, read_point

COLUMNS = tuple(SweepPoint.model_fields)


def frontier_table(point_files: list[Path]) -> pd.DataFrame:
    """Rows sorted by series then T; ValueError naming a bad or repeated file, or points from two teachers."""
    if not point_files:
        raise ValueError("no sweep point files given")
    rows, seen = [], {}
    for path in point_files:
        point = read_point(path)
        key = (point.series, point.time_steps)
        if key in seen:
            raise ValueError(f"{path}: {point.series} at T={point.time_steps} again (already in {seen[key]})")
        seen[key] = path
        rows.append(point.model_dump())
    teachers = {(row["teacher_ppl"], row["test_tokens"]) for row in rows}
    if len(teachers) > 1:
        raise ValueError(f"the points were scored on different teachers or test sets (teacher ppl, test tokens): "
                         f"{sorted(teachers)}")
    return pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["series", "time_steps"], ignore_index=True)


def write_frontier(point_files: list[Path], csv_path: Path, plot_path: Path) -> list[dict]:
    table = frontier_table(point_files)
    rows = table.to_dict("records")
    for path in (csv_path, plot_path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{path}: cannot create its folder ({error.strerror or error})") from None
    try:  # the plot first: a plot that fails leaves the old CSV and PNG as a pair
        plot_frontier([{**row, "model": row["series"]} for row in rows], plot_path, rows[0]["teacher_ppl"])
        write_table(table, csv_path)
    except OSError as error:
        raise ValueError(f"{error.filename or csv_path}: cannot write ({error.strerror or error})") from None
    return rows

"""The continual pipeline's summary: every setting's per-chunk curves in one CSV, one PNG, one table.

The CSV and the markdown table hold only what a rerun reproduces bit for bit; seconds per chunk (from
the ``--timings`` folder adapt writes outside DVC's outputs) are printed beside the table, not stored in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from snn_research.continual.adapt import CURVE_COLUMNS
from snn_research.io import atomic_write_text

PANELS = (("new_ppl", "new-domain ppl (held out)"), ("old_ppl", "old-domain ppl (test split)"),
          ("bwt", "backward transfer (nats; < 0: forgetting)"), ("spike_rate", "spike rate"))


def read_curves(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: curves file not found (written by `snn-research adapt` with adapt.curves)")
        frame = pd.read_csv(path)
        missing = [c for c in CURVE_COLUMNS if c not in frame.columns]
        if missing or frame.empty:
            raise ValueError(f"{path}: not an adapt curves file (missing columns {missing} or no rows)")
        frames.append(frame.assign(setting=Path(path).stem)[["setting", *CURVE_COLUMNS]])
    if not frames:
        raise ValueError("no curves files given")
    return pd.concat(frames, ignore_index=True)


def last_rows(curves: pd.DataFrame) -> pd.DataFrame:
    """Per setting: its start and its last chunk side by side."""
    rows = []
    for setting, frame in curves.groupby("setting", sort=False):
        start, last = frame.iloc[0], frame.iloc[-1]
        rows.append({"setting": setting, "chunks": int(last["chunk"]), "new_ppl_start": start["new_ppl"],
                     "new_ppl": last["new_ppl"], "new_gain": last["new_gain"], "old_ppl_start": start["old_ppl"],
                     "old_ppl": last["old_ppl"], "forgetting": last["forgetting"], "bwt": last["bwt"],
                     "spike_rate": last["spike_rate"], "ffn_energy_ratio": last["ffn_energy_ratio"],
                     "trainable_parameters": int(last["trainable_parameters"])})
    return pd.DataFrame(rows)


def markdown_table(summary: pd.DataFrame, seconds: dict[str, float] | None = None) -> str:
    header = ["setting", "chunks", "new ppl (start -> end)", "new gain", "old ppl (start -> end)", "forgetting",
              "BWT (nats)", "spike rate", "FFN energy", "trainable"]
    if seconds:
        header.append("s / chunk (median)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.itertuples(index=False):
        spike = "-" if pd.isna(row.spike_rate) else f"{row.spike_rate:.3f}"
        cells = [row.setting, str(row.chunks), f"{row.new_ppl_start:.2f} -> {row.new_ppl:.2f}",
                 f"{100 * row.new_gain:+.1f} %", f"{row.old_ppl_start:.2f} -> {row.old_ppl:.2f}",
                 f"{100 * row.forgetting:+.2f} %", f"{row.bwt:+.4f}", spike, f"{row.ffn_energy_ratio:.3f}",
                 f"{row.trainable_parameters / 1e6:.1f} M"]
        if seconds:
            value = seconds.get(row.setting)
            cells.append("-" if value is None else f"{value:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_seconds(folder: Path | None, settings: list[str]) -> dict[str, float]:
    """Median seconds per chunk per setting from ``<folder>/<setting>.json`` (absent files are skipped): the
    median, so that a chunk slowed by other work on a shared machine does not set the figure."""
    import statistics

    seconds = {}
    for setting in settings if folder is not None else []:
        path = Path(folder) / f"{setting}.json"
        if path.is_file():
            values = json.loads(path.read_text()).get("seconds_per_chunk") or []
            if values:
                seconds[setting] = statistics.median(values)
    return seconds


def plot(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for axis, (column, title) in zip(axes, PANELS):
        for setting, frame in curves.groupby("setting", sort=False):
            if frame[column].notna().any():
                axis.plot(frame["chunk"], frame[column], marker="o", markersize=3, label=setting)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("chunk")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(figure)
    tmp.replace(path)


def write_report(curve_paths: list[Path], csv_path: Path, plot_path: Path, table_path: Path,
                 timings: Path | None = None) -> str:
    """Write the CSV, PNG and table; returns the table with seconds per chunk when timings are there."""
    from snn_research.stages.training_common import write_table

    curves = read_curves(curve_paths)
    summary = last_rows(curves)
    write_table(Path(csv_path), curves)
    plot(curves, Path(plot_path))
    table_path = Path(table_path)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table_path, markdown_table(summary))
    return markdown_table(summary, read_seconds(timings, list(summary["setting"])))

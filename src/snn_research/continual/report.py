"""The continual pipeline's summary: every run's per-chunk curves in one CSV, one PNG, one table.

A run's curves file is named ``<setting>-s<seed>.csv`` (``<setting>.csv`` is seed 0). The table gives, per
setting, the mean over its seeds with the spread (min ... max) beside it, in absolute perplexities, and each
run's new- and old-domain ppl over the reference setting's (the ANN adapted the same way) with the same seed,
at the start and at the end. The CSV and the markdown table hold only what a rerun reproduces bit for bit;
seconds per chunk (from the ``--timings`` folder adapt writes outside DVC's outputs) are printed beside the
table, not stored in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from snn_research.continual.adapt import CURVE_COLUMNS
from snn_research.io import atomic_write_text

PANELS = (("new_ppl", "new-domain ppl (held out)"), ("old_ppl", "old-domain ppl (test split)"),
          ("bwt_stream", "BWT of the stream's chunks (nats)"), ("forgetting", "old-domain forgetting"))
RUN_NAME = re.compile(r"^(?P<setting>.+?)(?:-s(?P<seed>\d+))?$")
# per setting, the figures the table gives (the last row of each run), with their spread over seeds
SUMMARY_COLUMNS = ("new_ppl_start", "new_ppl", "new_gain", "old_ppl_start", "old_ppl", "forgetting", "bwt", "bwt_old",
                   "bwt_stream", "spike_rate", "ffn_energy_ratio", "new_vs_reference_start", "new_vs_reference",
                   "old_vs_reference_start", "old_vs_reference")


def run_name(path: Path) -> tuple[str, int]:
    """``reports/curves/meta-s2.csv`` -> ("meta", 2); a name without ``-s<seed>`` is seed 0."""
    match = RUN_NAME.match(Path(path).stem)
    return match["setting"], int(match["seed"] or 0)


def read_curves(paths: list[Path]) -> pd.DataFrame:
    frames, seen = [], set()
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: curves file not found (written by `snn-research adapt` with adapt.curves)")
        frame = pd.read_csv(path)
        missing = [c for c in CURVE_COLUMNS if c not in frame.columns]
        if missing or frame.empty:
            raise ValueError(f"{path}: not an adapt curves file (missing columns {missing} or no rows)")
        setting, seed = run_name(path)
        if (setting, seed) in seen:
            raise ValueError(f"{path}: a second curves file for setting {setting!r} with seed {seed}")
        seen.add((setting, seed))
        frames.append(frame.assign(setting=setting, seed=seed)[["setting", "seed", *CURVE_COLUMNS]])
    if not frames:
        raise ValueError("no curves files given")
    return pd.concat(frames, ignore_index=True)


def last_rows(curves: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """Per run: its start and its last row side by side, and its ppl over the reference run of its seed."""
    rows = []
    for (setting, seed), frame in curves.groupby(["setting", "seed"], sort=False):
        start, last = frame.iloc[0], frame.iloc[-1]
        rows.append({"setting": setting, "seed": seed, "chunks": int(last["chunk"]),
                     "new_ppl_start": start["new_ppl"], "old_ppl_start": start["old_ppl"],
                     **{c: last[c] for c in ("new_ppl", "new_gain", "old_ppl", "forgetting", "bwt", "bwt_old",
                                             "bwt_stream", "spike_rate", "ffn_energy_ratio")},
                     "trainable_parameters": int(last["trainable_parameters"])})
    runs = pd.DataFrame(rows)
    if reference is not None:
        if reference not in set(runs["setting"]):
            raise ValueError(f"reference setting {reference!r} has no curves (settings: "
                             f"{', '.join(dict.fromkeys(runs['setting']))})")
        yardstick = runs[runs["setting"] == reference].set_index("seed")
        missing = sorted(set(runs["seed"]) - set(yardstick.index))
        if missing:
            raise ValueError(f"reference setting {reference!r} has no run with seed(s) {missing}")
        unequal = runs[runs["chunks"] != runs["seed"].map(yardstick["chunks"])]
        if not unequal.empty:
            row = unequal.iloc[0]
            raise ValueError(f"run {row['setting']}-s{row['seed']} ends after chunk {row['chunks']}, the reference's "
                             f"run with its seed after chunk {yardstick.loc[row['seed'], 'chunks']}: the ratio "
                             "would compare different amounts of adaptation")
        for domain in ("new", "old"):
            for suffix in ("_start", ""):
                ref = runs["seed"].map(yardstick[f"{domain}_ppl{suffix}"])
                runs[f"{domain}_vs_reference{suffix}"] = runs[f"{domain}_ppl{suffix}"] / ref
    return runs


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting (in first-seen order): seeds, chunks, trainable, and mean / min / max of each figure."""
    rows = []
    for setting, frame in runs.groupby("setting", sort=False):
        row = {"setting": setting, "seeds": len(frame), "chunks": int(frame["chunks"].max()),
               "trainable_parameters": int(frame["trainable_parameters"].max())}
        for column in SUMMARY_COLUMNS:
            if column in frame:
                values = frame[column]
                row.update({f"{column}_mean": values.mean(), f"{column}_min": values.min(),
                            f"{column}_max": values.max()})
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(row, column: str, fmt: str, scale: float = 1.0) -> str:
    mean, low, high = (row[f"{column}_{k}"] * scale for k in ("mean", "min", "max"))
    if pd.isna(mean):
        return "-"
    if low == high:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(low, fmt)} ... {format(high, fmt)})"


def markdown_table(summary: pd.DataFrame, seconds: dict[str, float] | None = None) -> str:
    """Means over seeds, the spread (min ... max) in brackets where the seeds differ."""
    has_reference = "new_vs_reference_mean" in summary
    header = ["setting", "seeds", "chunks", "new ppl start", "new ppl end", "new gain", "old ppl start",
              "old ppl end", "forgetting", "BWT old (nats)", "BWT chunks (nats)"]
    if has_reference:
        header += ["new ppl / ref. (start -> end)", "old ppl / ref. (start -> end)"]
    header += ["spike rate", "FFN energy", "trainable"]
    if seconds:
        header.append("s / chunk (median)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [row["setting"], str(row["seeds"]), str(row["chunks"]), _spread(row, "new_ppl_start", ".2f"),
                 _spread(row, "new_ppl", ".2f"), _spread(row, "new_gain", "+.1f", 100) + " %",
                 _spread(row, "old_ppl_start", ".2f"), _spread(row, "old_ppl", ".2f"),
                 _spread(row, "forgetting", "+.2f", 100) + " %", _spread(row, "bwt_old", "+.4f"),
                 _spread(row, "bwt_stream", "+.4f")]
        if has_reference:
            cells += [f"{_spread(row, 'new_vs_reference_start', '.3f')} -> {_spread(row, 'new_vs_reference', '.3f')}",
                      f"{_spread(row, 'old_vs_reference_start', '.3f')} -> {_spread(row, 'old_vs_reference', '.3f')}"]
        cells += [_spread(row, "spike_rate", ".3f"), _spread(row, "ffn_energy_ratio", ".3f"),
                  f"{row['trainable_parameters'] / 1e6:.1f} M"]
        if seconds:
            value = seconds.get(row["setting"])
            cells.append("-" if value is None else f"{value:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_seconds(folder: Path | None, runs: pd.DataFrame) -> dict[str, float]:
    """Median seconds per chunk per setting, over every chunk of its runs' ``<folder>/<run>.json`` (absent
    files are skipped): the median, so that a chunk slowed by other work on a shared machine does not set it."""
    import statistics

    values: dict[str, list[float]] = {}
    for setting, seed in zip(runs["setting"], runs["seed"]) if folder is not None else []:
        for name in (f"{setting}-s{seed}", setting if seed == 0 else None):
            path = Path(folder) / f"{name}.json" if name else None
            if path is not None and path.is_file():
                values.setdefault(setting, []).extend(json.loads(path.read_text()).get("seconds_per_chunk") or [])
                break
    return {setting: statistics.median(v) for setting, v in values.items() if v}


def plot(curves: pd.DataFrame, path: Path) -> None:
    """Per panel, each setting's mean over seeds by chunk, with its min ... max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for axis, (column, title) in zip(axes, PANELS):
        for setting, frame in curves.groupby("setting", sort=False):
            by_chunk = frame.groupby("chunk")[column]
            mean = by_chunk.mean()
            if mean.notna().any():
                (line,) = axis.plot(mean.index, mean.values, marker="o", markersize=3, label=setting)
                axis.fill_between(mean.index, by_chunk.min().values, by_chunk.max().values, alpha=0.15,
                                  color=line.get_color(), linewidth=0)
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
                 timings: Path | None = None, reference: str | None = None,
                 summary_path: Path | None = None) -> str:
    """Write the CSV, PNG, table (and the per-setting summary CSV); returns the table with seconds per chunk
    when timings are there."""
    from snn_research.stages.training_common import write_table

    curves = read_curves(curve_paths)
    runs = last_rows(curves, reference)
    summary = summarize(runs)
    write_table(Path(csv_path), curves)
    if summary_path is not None:
        write_table(Path(summary_path), summary)
    plot(curves, Path(plot_path))
    table_path = Path(table_path)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table_path, markdown_table(summary))
    return markdown_table(summary, read_seconds(timings, runs))

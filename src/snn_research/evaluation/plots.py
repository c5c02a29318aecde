"""Matplotlib figures for the reports (written as PNG next to the DVC plot CSVs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layers(rows: list[dict], hybrids: list[str], path: Path) -> None:
    layers = [row["layer"] for row in rows]
    figure, (rates, errors) = plt.subplots(1, 2, figsize=(11, 4))
    for name in hybrids:
        rates.plot(layers, [row[f"{name}_input"] for row in rows], marker="o", label=f"{name} input")
        rates.plot(layers, [row[f"{name}_second"] for row in rows], marker="x", linestyle="--", label=f"{name} second site")
        errors.plot(layers, [row[f"{name}_error"] for row in rows], marker="o", label=name)
    rates.set(xlabel="layer", ylabel="spikes per neuron per step", title="Spike rate per site")
    errors.set(xlabel="layer", ylabel="relative squared error", title="FFN output error vs teacher", yscale="log")
    rates.legend(fontsize=7)
    errors.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def plot_frontier(points: list[dict], path: Path, teacher_ppl: float | None = None) -> None:
    """Perplexity against FFN energy ratio, one point per T (the quality/energy frontier)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for label in sorted({p["model"] for p in points}):
        series = sorted((p for p in points if p["model"] == label), key=lambda p: p["ffn_energy_ratio"])
        axis.plot([p["ffn_energy_ratio"] for p in series], [p["ppl"] for p in series], marker="o", label=label)
        for p in series:
            axis.annotate(f"T={p['time_steps']}", (p["ffn_energy_ratio"], p["ppl"]), fontsize=7)
    if teacher_ppl is not None:
        axis.axhline(teacher_ppl, color="grey", linestyle=":", label="teacher")
    axis.set(xlabel="FFN energy / teacher FFN energy", ylabel="test perplexity", title="Quality vs energy", yscale="log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)

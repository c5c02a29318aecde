"""The evaluation as one offline HTML page: every figure inline, nothing fetched.

``render_page`` is a pure function from the loaded inputs (``ReportInputs``) to the page's text:
CSS in a <style> element, pictures as base64 PNG data URIs, every value through ``html.escape``.
The same inputs give the same bytes, so the page can be a DVC output.

MLflow run ids are the exception, and stay out of the page: they are random, so a page holding
them would change on every run with none of its inputs changed. They go to a sidecar script,
``report_runs.js`` beside the page (``runs_script_text``), which the page loads by that relative
name and shows in its last section; opened without it, the page says where the ids would come from.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from statistics import fmean
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RUNS_SCRIPT = "report_runs.js"  # the sidecar's name, beside the page
UNSET = "—"  # a value the file leaves unset (null) or does not have
NUMERIC = re.compile(rf"[-+]?[\d.]|{UNSET}$|n/a$")  # cells aligned right; text cells left

# (label, short label for the chart, FFN key, whole-model key): hybrid / baseline, per token
BASELINES = (
    ("FP32 ANN (the teacher as it runs)", "FP32", "ffn_energy_ratio", "model_energy_ratio"),
    ("INT8 ANN (8-bit weights and activations)", "INT8", "ffn_energy_ratio_int8", "model_energy_ratio_int8"),
    ("low-bit ANN (8-bit weights, {bits}-bit activations)", "low-bit", "ffn_energy_ratio_lowbit",
     "model_energy_ratio_lowbit"),
    ("FP32 + weight reads, spiking weights read every time step", "+mem/step", "ffn_memory_ratio_per_step",
     "model_memory_ratio_per_step"),
    ("FP32 + weight reads, spiking weights read once per token", "+mem/token", "ffn_memory_ratio_per_token",
     "model_memory_ratio_per_token"),
)
# integer-weight hybrids only: both sides priced with the same integer parts (FFN key, whole-model key or None)
INTEGER_BASELINES = (
    ("W8A8 ANN (per-channel int8 weights, per-token int8 activations)", "ffn_energy_ratio_w8a8",
     "model_energy_ratio_w8a8"),
    ("W8A{bits} ANN (int8 weights, the hybrid's {bits} activation bits)", "ffn_energy_ratio_w8ab",
     "model_energy_ratio_w8ab"),
    ("W8A8 + int8 weight reads, batch 1 (the hybrid reads the columns of inputs that spiked)",
     "ffn_memory_ratio_w8a8_batch1", None),
    ("W8A8 + int8 weight reads, {batch} sequences decoded together", "ffn_memory_ratio_w8a8_read_batch", None),
)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 0 auto; max-width: 1240px; padding: 0 24px; }
h1 { font-size: 24px; margin: 24px 0 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #ccc; } p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 6px 0 12px; }
caption { text-align: left; color: #555; padding: 2px 0; white-space: nowrap; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: right; font-variant-numeric: tabular-nums; }
td { white-space: nowrap; } th { background: #f1f3f6; }
td:first-child, th:first-child, td.text, #runs-table td { text-align: left; }
td.below { background: #e3f4e1; } td.above { background: #fbe6e3; }
img { max-width: 100%; border: 1px solid #e2e2e2; }
.notes { background: #fff8e1; border: 1px solid #f0d98c; padding: 6px 12px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #244f8f; }
"""

# fills the runs section from the sidecar's data; text only (textContent), never markup
RUNS_JS = """
(function () {
  var data = window.snnResearchRuns;
  if (!data) { return; }
  document.getElementById("runs-note").textContent = data.note;
  var body = document.getElementById("runs-body");
  data.runs.forEach(function (run) {
    var row = body.insertRow();
    [run.stage, run.run_id, run.pipeline_run_id, run.status, run.started].forEach(function (value) {
      row.insertCell().textContent = value;
    });
  });
  document.getElementById("runs-table").hidden = data.runs.length === 0;
})();
"""


@dataclass(frozen=True)
class ReportInputs:
    """What the page shows, as loaded from the pipeline's files; None where an optional file is absent."""

    metrics: dict  # metrics.json: time_steps and one entry per model
    energy: dict | None = None  # evaluation/energy.json: hybrid -> its energy figures
    prices: dict | None = None  # the energy constants evaluate used (its manifest's params)
    conversion: dict | None = None  # conversion_metadata.json
    spike_rates: list[dict] | None = None  # plots/layer_spike_rates.csv rows
    ffn_errors: list[dict] | None = None  # plots/layer_ffn_error.csv rows
    layers_png: bytes | None = None  # plots/layers.png
    frontier_png: bytes | None = None  # the T sweep's frontier plot
    sources: dict[str, str] = field(default_factory=dict)  # field name -> the path it is read from


def _text(value, spec: str = "") -> str:
    """A value as the page shows it (not yet escaped): numbers by ``spec``, null as UNSET."""
    if value is None:
        return UNSET
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isnan(value):
        return "n/a"
    return format(value, spec)


def _table(head: list[str], rows: list[list], caption: str | None = None) -> str:
    """A table; a cell is text, or (text, css class). Everything is escaped here."""
    def cell(tag: str, value) -> str:
        text, css = value if isinstance(value, tuple) else (value, None)
        if css is None and not NUMERIC.match(str(text)):
            css = "text"
        attribute = f' class="{html.escape(css)}"' if css else ""
        return f"<{tag}{attribute}>{html.escape(str(text))}</{tag}>"

    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<tr>" + "".join(cell("th", h) for h in head) + "</tr>")
    parts += ["<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows]
    parts.append("</table>")
    return "\n".join(parts)


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _paragraph(text: str, css: str | None = None) -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<p{attribute}>{html.escape(text)}</p>"


def model_entries(metrics: dict) -> dict[str, dict]:
    """Every model of metrics.json, in file order (the entries that are objects, ``domains`` aside)."""
    return {name: entry for name, entry in metrics.items() if isinstance(entry, dict) and name != "domains"}


def hybrid_entries(metrics: dict) -> dict[str, dict]:
    """The hybrids: the models with energy figures (the references have quality figures only)."""
    return {name: entry for name, entry in model_entries(metrics).items() if "ffn_energy_ratio" in entry}


def _ratio(entry: dict, key: str, reference: dict | None):
    """A ppl ratio as metrics.json has it, else computed from the reference's ppl, else None."""
    if key in entry:
        return entry[key]
    if reference is None or not isinstance(entry.get("ppl"), (int, float)):
        return None
    return entry["ppl"] / reference["ppl"]


def quality_section(metrics: dict) -> str:
    teacher, tuned = metrics.get("teacher"), metrics.get("teacher_finetuned")
    head = ["model", "ppl", "bpb", "ppl / teacher", "ppl / teacher finetuned", "top-1 agreement",
            "KL(teacher ‖ model)", "spike rate", "FFN energy / FP32", "model energy / FP32"]
    rows = []
    for name, entry in model_entries(metrics).items():
        rows.append([name, _text(entry.get("ppl"), ".2f"), _text(entry.get("bpb"), ".3f"),
                     _text(_ratio(entry, "ppl_ratio_to_teacher", teacher), ".3f"),
                     _text(_ratio(entry, "ppl_ratio_to_teacher_finetuned", tuned), ".3f"),
                     _text(entry.get("agreement_top1"), ".3f"), _text(entry.get("kl_full_to_teacher"), ".4g"),
                     _text(entry.get("spike_rate"), ".4f"), _text(entry.get("ffn_energy_ratio"), ".3f"),
                     _text(entry.get("model_energy_ratio"), ".3f")])
    return "\n".join([
        "<h2>Quality</h2>",
        _paragraph("Test split. KL is KL(teacher ‖ model) over the full vocabulary, in nats per token; "
                   "energy ratios are hybrid / FP32 teacher per token (the other baselines are below)."),
        _table(head, rows),
    ])


def domain_chart_png(domains: dict[str, dict]) -> bytes:
    """ppl / teacher per text domain, one bar per model (the unseen domains marked)."""
    figure = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    names = list(domains)
    models = [m for m in next(iter(domains.values())) if m not in ("seen", "test_tokens", "teacher")]
    width = 0.8 / max(len(models), 1)
    for index, model in enumerate(models):
        values = [_ratio(domains[d][model], "ppl_ratio_to_teacher", domains[d]["teacher"]) for d in names]
        axis.bar([p + (index - (len(models) - 1) / 2) * width for p in range(len(names))], values, width, label=model)
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axis.set_xticks(range(len(names)), [d if domains[d]["seen"] else f"{d}\n(unseen)" for d in names])
    axis.set_ylabel("ppl / teacher")
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def domains_section(domains: dict[str, dict]) -> str:
    head = ["domain", "seen", "tokens", "teacher ppl", "model", "ppl / teacher", "ppl / teacher finetuned",
            "top-1 agreement", "KL(teacher ‖ model)", "spike rate", "FFN energy / FP32"]
    rows = []
    for name, entry in domains.items():
        for model in ("teacher_finetuned", *hybrid_entries(entry)):
            row = entry[model]
            rows.append([name, "yes" if entry["seen"] else "no (unseen)", _text(entry["test_tokens"]),
                         _text(entry["teacher"]["ppl"], ".2f"), model,
                         _text(_ratio(row, "ppl_ratio_to_teacher", entry["teacher"]), ".3f"),
                         _text(_ratio(row, "ppl_ratio_to_teacher_finetuned", entry["teacher_finetuned"]), ".3f"),
                         _text(row.get("agreement_top1"), ".3f"), _text(row.get("kl_full_to_teacher"), ".4g"),
                         _text(row.get("spike_rate"), ".4f"), _text(row.get("ffn_energy_ratio"), ".3f")])
    return "\n".join([
        "<h2>Per text domain</h2>",
        _paragraph("Each domain's own test blocks; the quality table above pools them (token-weighted). An unseen "
                   "domain is one no stage calibrated or trained on."),
        _image(domain_chart_png(domains), "perplexity over the teacher's per text domain"),
        _table(head, rows),
    ])


def _versus_one(value) -> tuple[str, str | None]:
    """A hybrid / baseline ratio, marked below 1 (the hybrid costs less) or above."""
    text = _text(value, ".3f")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return text, None
    return text, "below" if value < 1 else "above"


def energy_chart_png(figures: dict[str, dict]) -> bytes:
    """Hybrid / baseline energy per token, FFN and whole model, one bar per hybrid and baseline."""
    figure = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(figures), 1)
    positions = range(len(BASELINES))
    for axis, column, scope in ((axes[0], 2, "FFN"), (axes[1], 3, "whole model")):
        for index, (name, row) in enumerate(figures.items()):
            values = [row.get(baseline[column], math.nan) for baseline in BASELINES]
            axis.bar([p + (index - (len(figures) - 1) / 2) * width for p in positions], values, width, label=name)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)  # below it the hybrid costs less
        axis.set_xticks(list(positions), [baseline[1] for baseline in BASELINES])
        axis.set_title(scope, fontsize=10)
    axes[0].set_ylabel("hybrid / baseline, per token")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})  # no version: same bytes
    return buffer.getvalue()


def _scaled(value, unit: str, prefixes: tuple[tuple[float, str], ...]) -> str:
    """``value`` in the largest prefix it reaches, 4 significant digits."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return _text(value)
    for factor, prefix in prefixes:
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    factor, prefix = prefixes[-1]
    return f"{value / factor:.4g} {prefix}{unit}"


def _joules(picojoules) -> str:
    return _scaled(picojoules, "J", ((1e12, ""), (1e9, "m"), (1e6, "µ"), (1e3, "n"), (1.0, "p")))


def _bytes(count) -> str:
    return _scaled(count, "B", ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")))


def energy_section(inputs: ReportInputs) -> str:
    hybrids = hybrid_entries(inputs.metrics)
    if not hybrids:
        return "<h2>Energy against each baseline</h2>" + _paragraph("metrics.json has no hybrid entries.")
    # energy.json has every ratio and the absolute figures; metrics.json the ratios alone
    figures = {name: {**entry, **(inputs.energy or {}).get(name, {})} for name, entry in hybrids.items()}
    bits = sorted({_text(row.get("activation_bits"), ".0f") for row in figures.values()})
    head = ["baseline", *[f"{name} {scope}" for name in figures for scope in ("FFN", "model")]]
    rows = [[label.format(bits=" / ".join(bits)),
             *[_versus_one(row.get(key)) for row in figures.values() for key in (ffn, model)]]
            for label, _, ffn, model in BASELINES]
    rates = [[name, _text(row.get("spike_rate"), ".4f"), _text(row.get("break_even_spike_rate"), ".4f"),
              _text(row.get("break_even_spike_rate_int8"), ".4f"), _text(row.get("activation_bits"), ".0f")]
             for name, row in figures.items()]
    integer = {name: row for name, row in figures.items() if row.get("ffn_energy_ratio_w8a8") is not None}
    parts = ["<h2>Energy against each baseline</h2>"]
    if integer:
        batch = sorted({_text(row.get("read_batch"), ".0f") for row in integer.values()})
        integer_head = ["baseline", *[f"{name} {scope}" for name in integer for scope in ("FFN", "model")]]
        integer_rows = [[label.format(bits=" / ".join(bits), batch=" / ".join(batch)),
                         *[_versus_one(row.get(key) if key else None) for row in integer.values() for key in (ffn, model)]]
                        for label, ffn, model in INTEGER_BASELINES]
        parts += [_paragraph("Integer hybrids (int8 weights, integer adds) against the integer ANNs a user would "
                             "deploy instead, per token, both sides priced with the same parts: an int32 accumulate "
                             "per synaptic event or per MAC, an int8 multiply per MAC on the ANN's side. Green: the "
                             "hybrid costs less; red: more."),
                  _table(integer_head, integer_rows),
                  _table(["model", "synaptic events per synapse per token", "break-even rate vs W8A8",
                          "silent inputs (weight reads skipped at batch 1)"],
                         [[name, _text(row.get("synaptic_events_per_synapse"), ".3f"),
                           _text(row.get("break_even_spike_rate_w8a8"), ".4f"),
                           _text(row.get("silent_input_fraction"), ".3f")] for name, row in integer.items()])]
    parts += [
        _paragraph("Hybrid / baseline, per token, every spike priced as an FP32 accumulate (45 nm table) whatever "
                   "the hybrid's weights" + (" (the integer hybrids above run on integer adds instead)" if integer
                                             else "") + "; the INT8 and low-bit ANNs re-price the teacher; the "
                   "memory rows add weight reads. Green: the hybrid costs less than that baseline; red: more."),
        _table(head, rows),
        _image(energy_chart_png(figures), "hybrid / baseline energy per token"),
        "<h3>Spike rates and break-even rates</h3>",
        _paragraph("A spiking FFN costs as much as the baseline's FFN at its break-even spike rate "
                   "(spikes per neuron per time step); below it, the spikes are cheaper."),
        _table(["model", "spike rate", "break-even vs FP32", "break-even vs INT8", "low-bit activation bits"], rates),
    ]
    if inputs.energy is not None:
        absolute = [[name, _joules(row.get("hybrid_energy_pj")), _joules(row.get("teacher_energy_pj")),
                     _joules(row.get("hybrid_ffn_energy_pj")), _joules(row.get("teacher_ffn_energy_pj")),
                     _bytes(row.get("teacher_weight_bytes_per_token")),
                     _bytes(row.get("hybrid_weight_bytes_per_token_per_step")),
                     _bytes(row.get("hybrid_weight_bytes_per_token")), _text(row.get("tokens"), ",.0f")]
                    for name, row in figures.items()]
        parts += ["<h3>Per token, absolute</h3>",
                  _table(["model", "hybrid", "teacher", "hybrid FFN", "teacher FFN", "teacher weights read",
                          "hybrid weights read (every step)", "hybrid weights read (once per token)",
                          "tokens measured"], absolute, caption="energy and weight bytes read, per token")]
    if inputs.prices is not None:
        parts.append(_table(["energy constant", "value"], [[key, _text(value)] for key, value in inputs.prices.items()],
                            caption="params section energy, as evaluate used it"))
    return "\n".join(parts)


def _csv_table(rows: list[dict], spec: str, caption: str) -> str:
    head = list(rows[0]) if rows else []
    body = [[_text(value, "d") if key == "layer" and isinstance(value, int) else _text(value, spec)
             for key, value in row.items()] for row in rows]
    return f"<details><summary>{html.escape(caption)}</summary>\n{_table(head, body)}\n</details>"


def layers_section(inputs: ReportInputs) -> str:
    parts = ["<h2>Per layer</h2>",
             _paragraph("Left: spike rate of each site (spikes per neuron per time step); right: the FFN output's "
                        "relative squared error against the teacher's.")]
    if inputs.layers_png is not None:
        parts.append(_image(inputs.layers_png, "spike rate and FFN output error per layer"))
    if inputs.spike_rates:
        parts.append(_csv_table(inputs.spike_rates, ".4f", "spike rate per layer and site (table)"))
    if inputs.ffn_errors:
        parts.append(_csv_table(inputs.ffn_errors, ".4g", "FFN output error per layer (table)"))
    return "\n".join(parts)


def clipping_summary(clipping: dict) -> str:
    sites = clipping.get("sites") or []
    head = _table(["clipping", "value"], [["method", _text(clipping.get("method"))],
                                          ["search tokens", _text(clipping.get("search_tokens"), ",.0f")],
                                          ["sites searched", str(len(sites))]])
    if not sites:
        return head
    by_choice: dict[str, list[dict]] = {}
    for site in sites:
        by_choice.setdefault(str(site.get("choice")), []).append(site)
    lower = sum(site["error_chosen"] < site["error_before"] for site in sites)
    higher = sum(site["error_chosen"] > site["error_before"] for site in sites)
    rows = [[choice, str(len(chosen)), _text(fmean([s["error_before"] for s in chosen]), ".4g"),
             _text(fmean([s["error_chosen"] for s in chosen]), ".4g")] for choice, chosen in by_choice.items()]
    rows.append(["all sites", str(len(sites)), _text(fmean([s["error_before"] for s in sites]), ".4g"),
                 _text(fmean([s["error_chosen"] for s in sites]), ".4g")])
    per_site = _table(["site", "choice", "error before", "error chosen"],
                      [[site.get("key"), site.get("choice"), _text(site.get("error_before"), ".4g"),
                        _text(site.get("error_chosen"), ".4g")] for site in sites])
    return "\n".join([
        head,
        _table(["choice", "sites", "mean error before", "mean error chosen"], rows,
               caption=f"FFN output error (relative squared) on the search tokens: lower at {lower}, higher at "
                       f"{higher} of {len(sites)} sites"),
        f"<details><summary>every site</summary>\n{per_site}\n</details>",
    ])


def conversion_section(conversion: dict) -> str:
    teacher, calibration = conversion.get("teacher") or {}, conversion.get("calibration") or {}
    plan, sites = conversion.get("plan") or {}, conversion.get("sites") or []
    layers = {site.get("layer") for site in sites}
    roles = Counter(str(site.get("site")) for site in sites)
    parts = [
        "<h2>Conversion plan</h2>",
        _table(["teacher", "value"], [["source", _text(teacher.get("source"))],
                                      ["model type", _text(teacher.get("model_type"))],
                                      ["decoder layers", _text(teacher.get("num_layers"), ",.0f")],
                                      ["spiking layers", str(len(layers))],
                                      ["spiking sites", ", ".join(f"{n} {k}" for k, n in sorted(roles.items()))]]),
        _table(["plan", "value"], [[key, _text(value)] for key, value in plan.items()],
               caption=f"{UNSET}: not set (the encoder's default, or a field it does not use)"),
        _table(["calibration", "value"], [["tokens", _text(calibration.get("tokens"), ",.0f")],
                                          ["percentile", _text(calibration.get("percentile"))],
                                          ["bins per octave", _text(calibration.get("bins_per_octave"))],
                                          ["histogram error bound", _text(calibration.get("relative_error_bound"),
                                                                          ".2%")]]),
    ]
    clipping = conversion.get("clipping")
    parts.append(clipping_summary(clipping) if clipping else _paragraph("No clipping record in the metadata."))
    return "\n".join(parts)


def runs_section(runs_script: str) -> str:
    note = (f"MLflow run ids change on every run, so they are not part of this page (a DVC output: the same "
            f"inputs give the same bytes). They are read from {runs_script} beside it, which the report stage "
            f"rewrites on every run; without that file (or without JavaScript) no ids are shown.")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("stage", "run id", "pipeline run id", "status", "started"))
    return "\n".join([
        "<h2>MLflow runs</h2>",
        f'<p id="runs-note">{html.escape(note)}</p>',
        f'<table id="runs-table" hidden><tr>{head}</tr><tbody id="runs-body"></tbody></table>',
        f'<script src="{html.escape(runs_script)}"></script>',
        f"<script>{RUNS_JS}</script>",
    ])


NOTES = {  # field -> what the page leaves out without it
    "energy": "the absolute energy figures (the ratios come from metrics.json)",
    "prices": "the energy constants",
    "conversion": "the conversion plan",
    "spike_rates": "the per-layer spike-rate table",
    "ffn_errors": "the per-layer FFN error table",
    "layers_png": "the per-layer plot",
    "frontier_png": "the quality/energy frontier (made by pipelines/sweep-t's frontier stage)",
}


def missing_notes(inputs: ReportInputs) -> list[str]:
    notes = []
    if "teacher_finetuned" not in inputs.metrics:
        notes.append("metrics.json has no teacher_finetuned entry: its row and the ratios to it are left out.")
    for name, omitted in NOTES.items():
        if getattr(inputs, name) is None:
            where = inputs.sources.get(name)
            notes.append(f"{where or name} not found: {omitted} left out.")
    return notes


def render_page(inputs: ReportInputs, runs_script: str = RUNS_SCRIPT) -> str:
    """The whole page; a pure function of ``inputs`` (no clock, no host, no run ids)."""
    metrics = inputs.metrics
    teacher = (inputs.conversion or {}).get("teacher") or {}
    title = f"Hybrid ANN/SNN report: T = {_text(metrics.get('time_steps'))}"
    if teacher.get("source"):
        title += f", teacher {teacher['source']}"
    notes = missing_notes(inputs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        _paragraph("Spiking FFNs, analog attention: the teacher, its fine-tuned copy and the hybrids on the test "
                   "split. This page is self-contained and works offline.", "lead"),
    ]
    if notes:
        parts.append('<div class="notes">' + "".join(_paragraph(note) for note in notes) + "</div>")
    parts.append(quality_section(metrics))
    if metrics.get("domains"):
        parts.append(domains_section(metrics["domains"]))
    parts += [energy_section(inputs), layers_section(inputs)]
    if inputs.conversion is not None:
        parts.append(conversion_section(inputs.conversion))
    if inputs.frontier_png is not None:
        parts += ["<h2>Quality/energy frontier</h2>", _image(inputs.frontier_png, "test perplexity against FFN energy")]
    parts.append(runs_section(runs_script))
    if inputs.sources:
        parts += ["<h2>Sources</h2>",
                  _table(["input", "file"], [[name, path] for name, path in inputs.sources.items()])]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def runs_script_text(note: str, runs: list[dict]) -> str:
    """The sidecar: ``note`` (where the ids come from, or why there are none) and one row per run
    (stage, run_id, pipeline_run_id, status, started)."""
    return f"window.snnResearchRuns = {json.dumps({'note': note, 'runs': runs}, indent=1)};\n"

"""evaluate: the teacher, its fine-tuned copy and the three hybrids side by side on the test split.

Writes ``reports/metrics.json`` (DVC metrics, a fixed shape), per-layer plot
data, a Markdown summary and the full energy reports under
``reports/evaluation/``. Nothing in them depends on the host or the time:
throughput (``evaluate.timing``) goes to MLflow only.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from snn_research.config import ParamsError
from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.devices import place
from snn_research.evaluation.baselines import Prices, compare, integer_compare, site_rows
from snn_research.evaluation.energy import measure_energy
from snn_research.evaluation.layers import ffn_output_errors
from snn_research.evaluation.plots import plot_layers
from snn_research.evaluation.quality import evaluate_quality
from snn_research.evaluation.report import metrics_document, summary_markdown, write_table
from snn_research.io import atomic_directory, atomic_write_text, sha256_file
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.teacher import load_teacher

# hybrid -> the stage that makes it
HYBRID_STAGES = {"converted": "convert", "distilled": "distill", "finetuned": "finetune"}


def input_folders(paths) -> dict[str, object]:
    """stage -> the folder it makes that evaluate reads."""
    return {"download-teacher": paths.teacher, "finetune-teacher": paths.teacher_finetuned, "split": paths.splits,
            "calibrate": paths.calibration, "convert": paths.converted, "distill": paths.distilled,
            "finetune": paths.finetuned}


def test_domains(split_manifest) -> list[tuple[str, bool]]:
    """(name, seen) of each domain in the test split's order; a split from before domains is one seen domain."""
    domains = (split_manifest.summary or {}).get("domains")
    if not domains:
        return [("corpus", True)]
    return [(name, float(entry.get("weight", 1.0)) > 0) for name, entry in domains.items()]


def run(context: StageContext) -> None:
    params = context.params.evaluate
    folders = input_folders(context.paths)
    manifests = {stage: context.verify(folder, stage) for stage, folder in folders.items()}
    teacher, _ = load_teacher(context.paths.teacher)
    reference, _ = load_teacher(context.paths.teacher_finetuned)
    hybrids = {name: load_hybrid(folders[stage]) for name, stage in HYBRID_STAGES.items()}
    time_steps = hybrids["finetuned"].hybrid_metadata.plan.time_steps
    domains = test_domains(manifests["split"])
    split = load_blocks(context.paths.splits, "test")
    # each domain's test blocks, at most max_blocks of them spread over its documents; energy on a few of those
    parts = [spread(split.of_domain(index), params.max_blocks) for index in range(len(domains))]
    empty = [name for (name, _), part in zip(domains, parts) if part.input_ids.shape[0] == 0]
    if empty:
        raise ValueError(f"{context.paths.splits}: the test split has no blocks of domain {empty[0]!r}")
    energy_parts = [spread(part, params.energy_blocks).input_ids for part in parts]
    teacher, reference, hybrids, parts_ids, energy_parts = place(
        context.device, teacher=teacher, reference=reference, hybrids=hybrids,
        parts_ids=[part.input_ids for part in parts], energy_parts=energy_parts)
    ids = torch.cat(parts_ids)
    energy_ids = torch.cat(energy_parts)
    batches = sum(-(-part.shape[0] // params.batch_size) for part in parts_ids)
    baselines = quantized_baselines(teacher, hybrids["converted"]) if params.quantized_baselines else {}
    baselines = place(context.device, baselines=baselines)
    prices = Prices.from_params(context.params.energy)
    domain_totals, domain_figures = [], []
    with progress_bar("evaluating", batches) as advance:
        for part, part_ids, part_energy in zip(parts, parts_ids, energy_parts):
            domain_totals.append(evaluate_quality(teacher, {"teacher_finetuned": reference, **baselines, **hybrids},
                                                  part_ids, part.target_bytes, params.batch_size, progress=advance))
            if len(domains) > 1:
                domain_figures.append({name: _figures(measure_energy(model, part_energy, prices.e_mac_pj,
                                                                     prices.e_ac_pj), prices)
                                       for name, model in hybrids.items()})
    totals = {name: sum((t[name] for t in domain_totals[1:]), domain_totals[0][name]) for name in domain_totals[0]}
    if params.read_batch_size > energy_ids.shape[0]:
        raise ParamsError(f"evaluate.read_batch is {params.read_batch_size}, but the energy pass has "
                          f"{energy_ids.shape[0]} sequences (the test split's blocks, up to evaluate.energy_blocks "
                          "per domain): set read_batch at most that")
    read_batches = tuple(sorted({1, params.read_batch_size}))
    reports = {name: measure_energy(model, energy_ids, prices.e_mac_pj, prices.e_ac_pj, read_batches)
               for name, model in hybrids.items()}
    figures = {name: _figures(report, prices) for name, report in reports.items()}
    sites = {name: site_rows(report, prices) for name, report in reports.items()}
    layer_errors = {name: ffn_output_errors(teacher, model, energy_ids) for name, model in hybrids.items()}

    per_domain = None
    if len(domains) > 1:
        per_domain = {name: (seen, domain_totals[i], domain_figures[i]) for i, (name, seen) in enumerate(domains)}
    metrics = metrics_document(time_steps, totals, figures, per_domain)
    atomic_write_text(context.paths.metrics, json.dumps(metrics, indent=2) + "\n")
    layers = layer_table(sites, layer_errors)
    rates = ["layer", *[f"{n}_{s}" for n in hybrids for s in ("input", "second")]]
    write_table(layers[rates], context.paths.plots / "layer_spike_rates.csv")
    write_table(layers[["layer", *[f"{n}_error" for n in hybrids]]].rename(columns=lambda c: c.removesuffix("_error")),
                context.paths.plots / "layer_ffn_error.csv")
    layer_rows = layers.to_dict("records")
    plot_layers(layer_rows, list(hybrids), context.paths.plots / "layers.png")
    summary = summary_markdown(metrics, layer_rows, list(hybrids), ids.numel())
    with atomic_directory(context.paths.evaluation) as tmp:
        (tmp / "summary.md").write_text(summary)
        energy = {name: _energy_dict(reports[name], figures[name], sites[name]) for name in hybrids}
        (tmp / "energy.json").write_text(json.dumps(energy, indent=2))
        (tmp / "layers.json").write_text(json.dumps(layer_rows, indent=2))
        context.manifest(tmp, "evaluate", {"evaluate": params.model_dump(), "energy": context.params.energy.model_dump(),
                                           "seed": context.params.seed},
                         {"test_tokens": int(ids.numel()), "metrics_sha256": sha256_file(context.paths.metrics)})
    context.tracker.log_metrics(flat_metrics(metrics))
    if params.timing:  # host-dependent, so MLflow only
        context.tracker.log_metrics({f"{name}.tokens_per_s": entry.tokens_per_s for name, entry in totals.items()})
    for path in (context.paths.metrics, context.paths.evaluation / "summary.md", context.paths.plots / "layers.png"):
        context.tracker.log_artifact(path)
    console.print(summary)
    registry = params.registry
    if registry.name is not None:
        from snn_research.registry import register

        done = context.tracker.within_run(lambda uri, experiment: register(
            context.paths.finetuned, context.paths.metrics, registry.name, "finetuned", registry.metric, uri, experiment))
        if done is None:
            console.print(f"evaluate: the finetuned hybrid was not registered as {registry.name!r} "
                          "(tracking is off or failed)")
        else:
            state = "is now champion" if done.champion else "is not champion"
            console.print(f"evaluate: registered {done.name} version {done.version}, which {state}: {done.reason}")


def _figures(report, prices: Prices) -> dict[str, float]:
    return {**compare(report, prices), **integer_compare(report, prices), "spike_rate": report.mean_spike_rate}


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """metrics.json as MLflow's flat keys: ``finetuned.ppl``, ``domains.sotu.finetuned.ppl``, ..."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and prefix:
            out[f"{prefix}{key}"] = value
    return out


def quantized_baselines(teacher, converted) -> dict:
    """The quantised ANNs scored beside the hybrids: W8A8 always, W8Ab where the code is the weighted one."""
    from snn_research.evaluation.quantized import quantized_ann

    out = {"teacher_w8a8": quantized_ann(teacher, "w8a8", converted)}
    if converted.hybrid_metadata.plan.encoder == "weighted":
        out["teacher_w8ab"] = quantized_ann(teacher, "w8ab", converted)
    return out


def layer_table(sites: dict[str, list[dict]], layer_errors: dict[str, dict[int, float]]) -> pd.DataFrame:
    """One row per spiking FFN: per hybrid, each FFN site's spike rate and break-even rates, and the FFN error.

    Sites outside the FFNs are in ``energy.json`` (and in the model energy ratio), not in this table.
    """
    sites = {name: [site for site in rows if site["ffn"]] for name, rows in sites.items()}
    layers = sorted({site["layer"] for rows in sites.values() for site in rows})
    table = pd.DataFrame({"layer": layers})
    for name, rows in sites.items():
        for column, position in (("input", 0), ("second", 1)):  # the second site: product (gated) or hidden (GPT-2)
            for suffix, field in (("", "spike_rate"), ("_break_even", "break_even_spike_rate"),
                                  ("_break_even_int8", "break_even_spike_rate_int8")):
                by_layer: dict[int, list[float]] = {}
                for site in rows:
                    by_layer.setdefault(site["layer"], []).append(site[field])
                table[f"{name}_{column}{suffix}"] = [
                    values[position] if len(values) > position else float("nan")
                    for values in (by_layer.get(layer, []) for layer in layers)]
        table[f"{name}_error"] = [layer_errors[name].get(layer, float("nan")) for layer in layers]
    return table


def _energy_dict(report, figures: dict[str, float], sites: list[dict]) -> dict:
    return {
        **report.summary(),
        **figures,
        "tokens": report.tokens,
        "sequence_length": report.sequence_length,
        "sites": sites,
        "hybrid_ops_per_token": {k: {"macs": v[0], "acs": v[1]} for k, v in report.hybrid_ops.items()},
        "teacher_ops_per_token": {k: {"macs": v[0], "acs": v[1]} for k, v in report.teacher_ops.items()},
        "shared_weight_bytes_per_token": report.shared_weight_bytes,
    }

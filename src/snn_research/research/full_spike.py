"""Research track toward a fully spiking transformer: one step = convert, recover briefly, measure.

A step names the sites that spike (``convert.sites`` groups: ffn, qkv, o, head) and which analog
operators are replaced (``softmax``: power_of_two; ``norm``: shift, with ``norm_fraction_bits``; see
``operators.py``). ``run_step`` does, in one process, what the pipeline's stages do for the default
hybrid, on a copy of the teacher with the step's operators swapped in:

1. calibrate the step's sites (``conversion/calibrator.py``) on that copy;
2. convert it (``conversion/ann_to_snn_converter.py``), with the clipping search for the FFN sites when
   ``convert.clipping`` is ``search``;
3. recover: layer-wise distillation of every block's spiking units (``training/layerwise.py``), then
   ``distill.steps`` end-to-end steps of the logit KL to the analog teacher (``training/loop.py``), both
   with the params' ``distill`` section; the targets are always the unmodified teacher's. Each phase is
   kept only if it does not worsen the validation objective: the layer-wise result is validated against
   the converted model and dropped (the converted weights restored) when it is worse, and the end-to-end
   loop keeps its best validated step, its start included;
4. evaluate on ``evaluate.max_blocks`` test blocks against the unmodified teacher (``evaluation/quality.py``)
   and count energy (``evaluation/energy.py``), with the replaced operators priced as below.

Energy of the replaced operators, per token, on top of ``measure_energy``'s rules (which count an analog
softmax as one MAC per attention score and an RMSNorm as two MACs per element: square-sum and scale):

- power-of-two softmax: per score, four ACs (subtract the row maximum, the exponent's shift, the row sum's
  accumulate, the normalising shift) instead of one MAC;
- shift norm with b fraction bits: per element, the square-sum MAC stays; the scale becomes one shift and
  b shift-adds (1 + b ACs) instead of one MAC. LayerNorm (GPT-2) is not priced and refused.

What ``run_step`` does not do: the energy budget (``energy.ffn_budget`` must be null) and the per-layer FFN
MSE (``distill.ffn_mse_weight`` must be 0); they are refused rather than ignored.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from snn_research.config import Params
from snn_research.conversion.ann_to_snn_converter import TeacherIdentity, convert, refresh_metadata
from snn_research.conversion.calibrator import Calibrator
from snn_research.conversion.threshold_search import search_clipping
from snn_research.data import load_blocks, single_domain, spread
from snn_research.errors import format_validation_error
from snn_research.evaluation.baselines import Prices, compare
from snn_research.evaluation.energy import EnergyReport, _mean_keys, measure_energy
from snn_research.evaluation.quality import evaluate_quality
from snn_research.models.families import SiteGroup, family_for_model
from snn_research.models.hybrid_transformer import spiking_parameter_groups
from snn_research.research.operators import replace_norms, use_attention
from snn_research.stages.training_common import VAL_KL, loop_settings, sampled_positions, teacher_val_targets
from snn_research.training.layerwise import layerwise_distill
from snn_research.training.loop import train
from snn_research.training.losses import distillation_kl, next_token_nll, top_k_kl

SOFTMAX_ACS_PER_SCORE = 4  # subtract the maximum, shift, accumulate, normalising shift


class ResearchStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="label in the table and the plot")
    sites: list[SiteGroup] = Field(min_length=1, description="convert.sites for this step")
    softmax: Literal["analog", "power_of_two"] = "analog"
    norm: Literal["analog", "shift"] = "analog"
    norm_fraction_bits: int | None = Field(None, ge=0, le=8, description="norm 'shift' only: 2^-b octave grid "
                                           "of the divisor's exponent (null: 0, a pure shift)")

    @model_validator(mode="after")
    def _bits_need_shift(self) -> "ResearchStep":
        if self.norm_fraction_bits is not None and self.norm != "shift":
            raise ValueError(f"norm_fraction_bits applies to norm 'shift' only (norm is {self.norm!r}); remove it")
        return self


class ResearchPlan(BaseModel):
    """``research.yaml``: the steps, in order."""

    model_config = ConfigDict(extra="forbid")
    steps: list[ResearchStep] = Field(min_length=1)


class StepResult(BaseModel):
    """``reports/research/step_<i>.json``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    index: int
    step: ResearchStep
    time_steps: int
    teacher_ppl: float
    ppl: float
    ppl_ratio_to_teacher: float
    bpb: float
    agreement_top1: float
    kl_full_to_teacher: float
    converted: dict[str, float] = Field(description="ppl, agreement_top1, kl_full_to_teacher before recovery")
    model_energy_ratio: float = Field(description="FP32 table, replaced operators priced (module docstring)")
    ffn_energy_ratio: float
    model_energy_ratio_int8: float | None = Field(description="against an INT8 teacher; null when operators are "
                                                  "replaced (their INT8 pricing is not modelled)")
    spike_rates: dict[str, float] = Field(description="per site group: spikes per neuron per time step")
    val_kl_converted: float = Field(description="validation top-k KL of the converted model")
    layerwise_kept: bool | None = Field(description="whether the layer-wise result was kept (it is dropped when "
                                        "it worsens the validation objective); null when layer-wise is off")
    val_kl_before: float = Field(description="validation top-k KL before the end-to-end steps")
    val_kl_after: float
    test_tokens: int


def load_plan(path: Path) -> ResearchPlan:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the research plan ({error})") from None
    try:
        return ResearchPlan.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{path}: invalid research plan: {format_validation_error(error)}") from None


def check_params(params: Params) -> None:
    """Refuse the settings ``run_step`` does not apply (see the module docstring)."""
    refused = []
    if params.energy.ffn_budget is not None:
        refused.append(("energy.ffn_budget", params.energy.ffn_budget, "the research steps train without it; "
                        "set null"))
    if params.distill.ffn_mse_weight > 0:
        refused.append(("distill.ffn_mse_weight", params.distill.ffn_mse_weight, "not applied here; set 0"))
    if params.convert.headroom_steps:
        refused.append(("convert.headroom_steps", params.convert.headroom_steps, "the steps convert without "
                        "headroom; set 0"))
    if refused:
        field, value, why = refused[0]
        raise ValueError(f"{field}: {why} (got {value!r})")


def apply_operators(model: torch.nn.Module, step: ResearchStep) -> None:
    """Swap the step's analog operators into ``model`` in place."""
    if step.norm == "shift" and family_for_model(model).name == "gpt2":
        raise ValueError("norm 'shift': its energy is priced for RMSNorm models only (GPT-2 uses LayerNorm)")
    if step.softmax != "analog":
        use_attention(model, step.softmax)
    if step.norm == "shift":
        replace_norms(model, "shift", fraction_bits=step.norm_fraction_bits or 0)


def softmax_scores_per_token(config, sequence_length: int) -> float:
    """Attention scores a token's softmax normalises, over all layers (the count ``attention_ops`` prices)."""
    heads = config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return sum(heads * _mean_keys(sequence_length, window if kind == "sliding_attention" and window else None)
               for kind in layer_types)


def price_operators(report: EnergyReport, config, step: ResearchStep) -> EnergyReport:
    """``report`` with the hybrid's replaced operators priced by the module docstring's rules."""
    ops = dict(report.hybrid_ops)
    if step.softmax == "power_of_two":
        scores = softmax_scores_per_token(config, report.sequence_length)
        macs, acs = ops["attention_scores_values"]
        ops["attention_scores_values"] = (macs - scores, acs + SOFTMAX_ACS_PER_SCORE * scores)
    if step.norm == "shift":
        macs, acs = ops["norms"]
        elements = macs / 2  # RMSNorm: two MACs per element
        ops["norms"] = (elements, acs + (1 + (step.norm_fraction_bits or 0)) * elements)
    priced = copy.copy(report)
    priced.hybrid_ops = ops
    return priced


def spike_rates(report: EnergyReport, model: torch.nn.Module) -> dict[str, float]:
    """Per site group: spikes per neuron per time step over its sites."""
    groups = {spec.name: spec.group for spec in family_for_model(model).sites}
    spikes: dict[str, float] = {}
    steps: dict[str, float] = {}
    for site in report.sites:
        group = groups[site.key.rpartition(":")[2]]
        spikes[group] = spikes.get(group, 0.0) + site.spikes_per_token
        steps[group] = steps.get(group, 0.0) + site.neurons * site.time_steps
    return {group: spikes[group] / steps[group] for group in sorted(spikes)}


class Recovery(NamedTuple):
    val_kl_converted: float
    layerwise_kept: bool | None
    val_kl_before: float  # before the end-to-end steps
    val_kl_after: float


def _recover(teacher, hybrid, params: Params, train_split, val_batches, checkpoints: Path, fingerprint: str,
             log_metrics, echo=lambda text: None) -> Recovery:
    """Layer-wise then end-to-end distillation (``params.distill``), each kept only if it does not worsen
    the validation objective (module docstring)."""
    distill = params.distill
    seed = params.seed
    layerwise = distill.layerwise
    targets = teacher_val_targets(teacher, val_batches)

    def validate(model) -> dict[str, float]:
        kl = nll = 0.0
        with torch.no_grad():
            for batch, (values, index) in zip(val_batches, targets):
                logits = model(input_ids=batch, use_cache=False).logits
                kl += float(top_k_kl(logits, values, index, 1.0))
                nll += float(next_token_nll(logits, batch))
        count = len(targets)
        return {"objective": (distill.kl_weight * kl + distill.ce_weight * nll) / count, VAL_KL: kl / count,
                "ppl": math.exp(nll / count)}

    def loss_fn(model, batch, step):
        keep, labels = 0, batch[:, 1:]
        if distill.kl_positions:
            keep = sampled_positions(batch.shape[1], distill.kl_positions, seed, step, batch.device)
            labels = batch[:, keep + 1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        if not distill.kl_positions:
            teacher_logits, logits = teacher_logits[:, :-1], logits[:, :-1]
        loss = torch.zeros((), dtype=torch.float32, device=batch.device)
        parts = {}
        if distill.kl_weight > 0:
            kl = distillation_kl(logits, teacher_logits, distill.temperature, distill.top_k)
            loss, parts["kl"] = loss + distill.kl_weight * kl, kl.item()
        if distill.ce_weight > 0:
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            loss, parts["ce"] = loss + distill.ce_weight * ce, ce.item()
        return loss, parts

    start = converted = validate(hybrid)
    kept = None
    if layerwise.enabled and layerwise.steps_per_layer > 0:
        saved = {name: tensor.detach().clone() for name, tensor in hybrid.state_dict().items()}
        layerwise_distill(teacher, hybrid, spread(train_split, layerwise.blocks).input_ids, distill.batch_size,
                          layerwise.steps_per_layer, layerwise.lr, layerwise.threshold_lr, seed=seed)
        start = validate(hybrid)
        kept = start["objective"] <= converted["objective"]
        echo(f"layer-wise: validation objective {converted['objective']:.4f} -> {start['objective']:.4f}, "
             f"{'kept' if kept else 'worse: the converted weights are restored'}")
        if not kept:
            hybrid.load_state_dict(saved)
            start = converted
        del saved
    if distill.steps > 0:
        time_steps = hybrid.hybrid_metadata.plan.time_steps
        settings = loop_settings(distill, seed, time_steps, curriculum_start=distill.curriculum.start_time_steps,
                                 curriculum_fraction=distill.curriculum.anneal_fraction)
        train(hybrid, train_split.input_ids, loss_fn, validate, settings, checkpoints, fingerprint,
              log_metrics=log_metrics, initial_objective=start["objective"])
    return Recovery(converted[VAL_KL], kept, start[VAL_KL], validate(hybrid)[VAL_KL])


def run_step(params: Params, plan: ResearchPlan, index: int, identity: TeacherIdentity, calib_sha256: str,
             teacher: torch.nn.Module, checkpoints: Path, fingerprint: str, log_metrics=None, echo=None) -> StepResult:
    """Steps 1-4 of the module docstring for ``plan.steps[index]``; ``teacher`` is left unmodified.
    ``echo(text)`` hears of each phase as it starts."""
    import time

    started = time.perf_counter()

    def say(text: str) -> None:
        if echo is not None:
            echo(f"research-step {index}: {text} ({time.perf_counter() - started:.0f} s)")

    if not 0 <= index < len(plan.steps):
        raise ValueError(f"step {index}: the research plan has steps 0..{len(plan.steps) - 1}")
    check_params(params)
    step = plan.steps[index]
    paths = params.paths
    base = copy.deepcopy(teacher)
    apply_operators(base, step)
    say(f"calibrating sites {step.sites}")
    calibration = spread(load_blocks(paths.splits, "calib"), params.calibrate.max_blocks).input_ids
    calibrator = Calibrator(base, bins_per_octave=params.calibrate.bins_per_octave, sites=step.sites)
    calibrator.run(calibration.split(params.calibrate.batch_size))
    calibrator.remove_hooks()
    conversion = params.convert.model_copy(update={"sites": list(step.sites)})
    if conversion.clipping == "search" and "ffn" not in step.sites:
        conversion = conversion.model_copy(update={"clipping": "percentile", "search_blocks": None})
    hybrid, metadata, _ = convert(base, calibrator.result(params.calibrate.percentile), conversion.plan(),
                                  identity, calib_sha256)
    del base
    if conversion.clipping == "search":
        say("clipping search of the FFN sites")
        blocks = spread(load_blocks(paths.splits, "calib"), conversion.search_block_count).input_ids
        reference = copy.deepcopy(teacher)
        apply_operators(reference, step)  # the FFN outputs the search matches: those of the step's analog model
        search_clipping(hybrid, reference, list(blocks.split(params.calibrate.batch_size)))
        del reference
        metadata, _ = refresh_metadata(hybrid, metadata)
    hybrid.hybrid_metadata = metadata
    for param in hybrid.parameters():
        param.requires_grad_(False)
    weights, dynamics = spiking_parameter_groups(hybrid)
    for param in weights + dynamics:
        param.requires_grad_(True)

    test = spread(single_domain(load_blocks(paths.splits, "test"), str(paths.splits), "research-step"),
                  params.evaluate.max_blocks)
    say("scoring the converted model")
    converted = evaluate_quality(teacher, {"hybrid": hybrid}, test.input_ids, test.target_bytes,
                                 params.evaluate.batch_size)["hybrid"].summary(teacher=False)
    train_split = load_blocks(paths.splits, "train")
    val_batches = list(spread(load_blocks(paths.splits, "val"), params.distill.val_blocks).input_ids
                       .split(params.distill.batch_size))
    say("recovering: layer-wise, then end-to-end distillation")
    recovery = _recover(teacher, hybrid, params, train_split, val_batches, checkpoints, fingerprint,
                        log_metrics, echo=say)
    hybrid.eval()
    say(f"validation top-k KL {recovery.val_kl_before:.4f} -> {recovery.val_kl_after:.4f} by the end-to-end "
        "steps; scoring")
    totals = evaluate_quality(teacher, {"hybrid": hybrid}, test.input_ids, test.target_bytes,
                              params.evaluate.batch_size)
    teacher_figures, figures = totals["teacher"].summary(teacher=True), totals["hybrid"].summary(teacher=False)
    energy_ids = spread(test, params.evaluate.energy_blocks).input_ids
    report = measure_energy(hybrid, energy_ids, params.energy.e_mac_pj, params.energy.e_ac_pj)
    priced = price_operators(report, hybrid.config, step)
    replaced = step.softmax != "analog" or step.norm != "analog"
    int8 = None if replaced else compare(report, Prices.from_params(params.energy))["model_energy_ratio_int8"]
    return StepResult(
        index=index, step=step, time_steps=conversion.time_steps, teacher_ppl=teacher_figures["ppl"],
        ppl=figures["ppl"], ppl_ratio_to_teacher=figures["ppl"] / teacher_figures["ppl"], bpb=figures["bpb"],
        agreement_top1=figures["agreement_top1"], kl_full_to_teacher=figures["kl_full_to_teacher"],
        converted={k: converted[k] for k in ("ppl", "agreement_top1", "kl_full_to_teacher")},
        model_energy_ratio=priced.model_energy_ratio, ffn_energy_ratio=priced.ffn_energy_ratio,
        model_energy_ratio_int8=int8, spike_rates=spike_rates(report, hybrid),
        val_kl_converted=recovery.val_kl_converted, layerwise_kept=recovery.layerwise_kept,
        val_kl_before=recovery.val_kl_before, val_kl_after=recovery.val_kl_after,
        test_tokens=int(test.input_ids.numel()),
    )


COLUMNS = ["index", "name", "sites", "softmax", "norm", "ppl", "ppl_ratio_to_teacher", "bpb", "agreement_top1",
           "kl_full_to_teacher", "converted_ppl_ratio", "model_energy_ratio", "ffn_energy_ratio",
           "model_energy_ratio_int8", "spike_rate_new", "val_kl_converted", "layerwise_kept", "val_kl_before",
           "val_kl_after"]


def table_rows(results: list[StepResult]) -> list[dict]:
    rows = []
    seen: set[str] = set()
    for result in sorted(results, key=lambda r: r.index):
        step = result.step
        new = [g for g in step.sites if g not in seen and g != "ffn"]  # the groups this step adds
        seen |= set(step.sites)
        rates = [result.spike_rates[g] for g in new if g in result.spike_rates]
        norm = step.norm if step.norm == "analog" else f"{step.norm} (b={step.norm_fraction_bits or 0})"
        rows.append({
            "index": result.index, "name": step.name, "sites": "+".join(step.sites), "softmax": step.softmax,
            "norm": norm, "ppl": result.ppl, "ppl_ratio_to_teacher": result.ppl_ratio_to_teacher, "bpb": result.bpb,
            "agreement_top1": result.agreement_top1, "kl_full_to_teacher": result.kl_full_to_teacher,
            "converted_ppl_ratio": result.converted["ppl"] / result.teacher_ppl,
            "model_energy_ratio": result.model_energy_ratio, "ffn_energy_ratio": result.ffn_energy_ratio,
            "model_energy_ratio_int8": result.model_energy_ratio_int8,
            "spike_rate_new": sum(rates) / len(rates) if rates else None,
            "val_kl_converted": result.val_kl_converted, "layerwise_kept": result.layerwise_kept,
            "val_kl_before": result.val_kl_before, "val_kl_after": result.val_kl_after,
        })
    return rows


def read_results(folder: Path, count: int) -> list[StepResult]:
    results = []
    for index in range(count):
        path = Path(folder) / f"step_{index}.json"
        try:
            results.append(StepResult.model_validate_json(path.read_text()))
        except OSError as error:
            raise ValueError(f"{path}: cannot read the step's result ({error})") from None
        except ValidationError as error:
            raise ValueError(f"{path}: invalid step result: {format_validation_error(error)}") from None
    return results


def markdown_table(rows: list[dict], teacher_ppl: float) -> str:
    def fmt(value, digits=3):
        return "" if value is None else f"{value:.{digits}f}"

    lines = [f"Teacher ppl {teacher_ppl:.2f} on the same test blocks.", "",
             "| step | what spikes or is replaced | ppl / teacher (converted) | ppl / teacher (recovered) | "
             "top-1 agreement | KL to teacher | model energy ratio | INT8 model ratio | spike rate of the new sites | "
             "layer-wise kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['index']} | {row['name']} | {fmt(row['converted_ppl_ratio'])} | "
                     f"{fmt(row['ppl_ratio_to_teacher'])} | {fmt(row['agreement_top1'])} | "
                     f"{fmt(row['kl_full_to_teacher'])} | {fmt(row['model_energy_ratio'])} | "
                     f"{fmt(row['model_energy_ratio_int8'])} | {fmt(row['spike_rate_new'])} | "
                     f"{ {True: 'yes', False: 'no (worse on validation)', None: 'off'}[row['layerwise_kept']]} |")
    return "\n".join(lines) + "\n"


def plot_steps(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    xs = [row["model_energy_ratio"] for row in rows]
    ys = [row["ppl_ratio_to_teacher"] for row in rows]
    axis.plot(xs, ys, marker="o", color="tab:blue")
    for row, x, y in zip(rows, xs, ys):
        axis.annotate(f"{row['index']}: {row['name']}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xlabel("model energy ratio (hybrid / teacher, 45 nm FP32)")
    axis.set_ylabel("ppl / teacher after recovery")
    axis.set_title("Toward a fully spiking transformer, step by step")
    figure.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120, metadata={"Software": None})
    plt.close(figure)
    tmp.replace(path)


def write_result(result: StepResult, path: Path) -> None:
    from snn_research.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(result.model_dump(mode="json"), indent=2) + "\n")


def run_research_step(context, plan: ResearchPlan, index: int, folder: Path) -> StepResult:
    """The ``research-step`` command: one step from the pipeline's teacher and splits, its JSON in ``folder``."""
    from snn_research.config import ParamsError
    from snn_research.io import sha256_file
    from snn_research.stages.common import console
    from snn_research.stages.training_common import checkpoint_dir, fingerprint
    from snn_research.teacher import load_teacher

    if context.device.type != "cpu":
        raise ParamsError(f"{context.params_path}: device: research-step runs on the CPU only "
                          f"(resolved {context.device}); set device: cpu")
    try:
        check_params(context.params)
    except ValueError as error:
        raise ParamsError(f"{context.params_path}: invalid params\n{error}") from None
    manifest = context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.splits, "split")
    info = manifest.summary
    identity = TeacherIdentity(source=info["source"], sha256=info["source_sha256"], model_type=info["model_type"],
                               architectures=info["architectures"], num_layers=info["num_layers"])
    teacher, _ = load_teacher(context.paths.teacher)
    for param in teacher.parameters():
        param.requires_grad_(False)
    step = plan.steps[index] if 0 <= index < len(plan.steps) else None
    fp = fingerprint(context, {"step": step.model_dump() if step else None, "index": index,
                               "params": context.params.model_dump(mode="json", exclude={"tracking"})})
    checkpoints = checkpoint_dir(context, f"research_step_{index}")
    result = run_step(context.params, plan, index, identity, sha256_file(context.paths.splits / "calib.safetensors"),
                      teacher, checkpoints, fp, log_metrics=context.tracker.log_metrics, echo=console.print)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_result(result, folder / f"step_{index}.json")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the step is complete: nothing left to resume
    context.tracker.log_metrics({k: v for k, v in result.model_dump().items()
                                 if isinstance(v, float) and not isinstance(v, bool)})
    console.print(f"research-step {index} ({result.step.name}): ppl {result.ppl:.2f} "
                  f"({result.ppl_ratio_to_teacher:.3f}x the teacher; converted "
                  f"{result.converted['ppl'] / result.teacher_ppl:.3f}x), agreement {result.agreement_top1:.3f}, "
                  f"model energy ratio {result.model_energy_ratio:.3f}")
    return result


def write_report(plan: ResearchPlan, folder: Path) -> str:
    """``steps.csv``, ``steps.png`` and ``steps.md`` from every step's JSON in ``folder``; returns the table."""
    import pandas as pd

    from snn_research.io import atomic_write_text

    folder = Path(folder)
    results = read_results(folder, len(plan.steps))
    for index, (result, step) in enumerate(zip(results, plan.steps)):
        if result.index != index or result.step != step:
            raise ValueError(f"{folder / f'step_{index}.json'}: made for another step ({result.step.name!r}); "
                             "rerun research-step")
    rows = table_rows(results)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_text(folder / "steps.csv", frame.to_csv(index=False, float_format="%.6g"))
    plot_steps(rows, folder / "steps.png")
    table = markdown_table(rows, results[0].teacher_ppl)
    atomic_write_text(folder / "steps.md", table)
    return table

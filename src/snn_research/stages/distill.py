"""distill: recover the converted hybrid from the frozen teacher.

Stage 1 (``distill.layerwise``): block-by-block training of each spiking FFN on
the hybrid's own residual stream (see ``training/layerwise.py``).
Stage 2: end-to-end knowledge distillation: KL to the teacher's logits at a
temperature (optionally over its top-k tokens), optional per-layer FFN-output
MSE and next-token cross-entropy; only the spiking parts train.
"""

from __future__ import annotations

import contextlib
import json
import math

import safetensors.torch
import torch

from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.io import atomic_directory
from snn_research.models.hybrid_transformer import SpikingMLP, find_mlps, spiking_parameter_groups
from snn_research.stages.common import StageContext, console
from snn_research.stages.common import progress_bar
from snn_research.stages.training_common import (
    checkpoint_dir,
    energy_budget,
    fingerprint,
    sampled_positions,
    teacher_val_targets,
    loop_settings,
    save_trained,
    write_csv,
    write_curves,
)
from snn_research.teacher import load_teacher
from snn_research.training.layerwise import layerwise_distill
from snn_research.training.losses import distillation_kl, next_token_nll, relative_mse, top_k_kl
from snn_research.training.loop import train

LAYERWISE_STATE = "layerwise.safetensors"
LAYERWISE_REPORT = "layerwise.json"


class _FFNOutputs:
    """Captures the output of every converted FFN position (teacher and hybrid alike)."""

    def __init__(self, model, layers: list[int]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [
            loc.module.register_forward_hook(self._hook(loc.layer)) for loc in find_mlps(model, layers)
        ]

    def _hook(self, layer: int):
        def hook(_module, _args, output):
            self.outputs[layer] = output

        return hook


def _layerwise(context, teacher, hybrid, blocks, ckpt, fp):
    params = context.params.distill
    state_path, report_path = ckpt / LAYERWISE_STATE, ckpt / LAYERWISE_REPORT
    weights, dynamics = spiking_parameter_groups(hybrid)
    names = {id(p): n for n, p in hybrid.named_parameters()}
    if report_path.is_file() and json.loads(report_path.read_text()).get("fingerprint") == fp:
        saved = safetensors.torch.load_file(str(state_path))
        with torch.no_grad():
            for param in weights + dynamics:
                param.copy_(saved[names[id(param)]])
        console.print("distill: layer-wise stage restored from its checkpoint")
        return json.loads(report_path.read_text())["layers"]
    layer_params = params.layerwise
    converted = sum(isinstance(loc.module, SpikingMLP) for loc in find_mlps(hybrid))
    with progress_bar("layer-wise distillation", converted * layer_params.steps_per_layer) as advance:
        reports = layerwise_distill(
            teacher, hybrid, blocks, params.batch_size, layer_params.steps_per_layer, layer_params.lr,
            layer_params.threshold_lr, seed=context.params.seed,
            progress=lambda layer, step, loss: advance(info=f"layer {layer} loss {loss:.4f}"),
            budget_for=lambda mlp: energy_budget(context, mlp, layer_params.energy_weight),
        )
    rows = [r.__dict__ for r in reports]
    with atomic_directory(ckpt) as tmp:
        safetensors.torch.save_file({names[id(p)]: p.detach().contiguous() for p in weights + dynamics},
                                    str(tmp / LAYERWISE_STATE))
        (tmp / LAYERWISE_REPORT).write_text(json.dumps({"fingerprint": fp, "layers": rows}))
    for row in rows:
        context.tracker.log_metrics({"layerwise_loss_before": row["loss_before"], "layerwise_loss_after": row["loss_after"],
                                     "layerwise_stream_error": row["stream_error"]}, step=row["layer"])
    return rows


def run(context: StageContext) -> None:
    params = context.params.distill
    seed = context.params.seed
    context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.splits, "split")
    context.verify(context.paths.converted, "convert")
    teacher, tokenizer = load_teacher(context.paths.teacher)
    hybrid = load_hybrid(context.paths.converted)
    time_steps = hybrid.hybrid_metadata.plan.time_steps
    train_split = load_blocks(context.paths.splits, "train")
    train_blocks = train_split.input_ids
    val_blocks = spread(load_blocks(context.paths.splits, "val"), params.val_blocks).input_ids
    fp = fingerprint(context, params.model_dump())
    ckpt = checkpoint_dir(context, "distill")

    layer_rows = []
    if params.layerwise.enabled and params.layerwise.steps_per_layer > 0:
        layer_blocks = spread(train_split, params.layerwise.blocks).input_ids
        layer_rows = _layerwise(context, teacher, hybrid, layer_blocks, ckpt / "layerwise", fp)
    budget = energy_budget(context, hybrid, params.energy_weight)

    val_targets = teacher_val_targets(teacher, list(val_blocks.split(params.batch_size)))

    def validate(model) -> dict[str, float]:
        kl = nll = 0.0
        with torch.no_grad():
            for batch, (values, index) in zip(val_blocks.split(params.batch_size), val_targets):
                logits = model(input_ids=batch, use_cache=False).logits
                kl += float(top_k_kl(logits, values, index, 1.0))
                nll += float(next_token_nll(logits, batch))
        count = len(val_targets)
        return {"objective": kl / count, "kl_to_teacher": kl / count, "ppl": math.exp(nll / count)}

    converted_layers = [loc.layer for loc in find_mlps(hybrid) if isinstance(loc.module, SpikingMLP)]
    use_mse = params.ffn_mse_weight > 0
    teacher_ffn = _FFNOutputs(teacher, converted_layers) if use_mse else None
    hybrid_ffn = _FFNOutputs(hybrid, converted_layers) if use_mse else None

    def loss_fn(model, batch, step):
        keep = 0  # logits for every position
        targets = batch[:, 1:]
        if params.kl_positions:
            chosen = sampled_positions(batch.shape[1], params.kl_positions, seed, step)
            keep, targets = chosen, batch[:, chosen + 1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        with budget or contextlib.nullcontext():
            logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
            energy_penalty = budget.penalty(batch.numel()) if budget is not None else None
        if not params.kl_positions:
            teacher_logits, logits = teacher_logits[:, :-1], logits[:, :-1]
        parts = {}
        loss = torch.zeros((), dtype=torch.float32)
        if params.kl_weight > 0:
            kl = distillation_kl(logits, teacher_logits, params.temperature, params.top_k)
            loss = loss + params.kl_weight * kl
            parts["kl"] = kl.item()
        if params.ce_weight > 0:
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
            loss = loss + params.ce_weight * ce
            parts["ce"] = ce.item()
        if use_mse:
            mse = sum(relative_mse(hybrid_ffn.outputs[l], teacher_ffn.outputs[l].detach()) for l in converted_layers)
            mse = mse / len(converted_layers)
            loss = loss + params.ffn_mse_weight * mse
            parts["ffn_mse"] = mse.item()
        if budget is not None:
            loss = loss + energy_penalty
            parts["energy_ratio"] = budget.last_ratio
        return loss, parts

    start_metrics = validate(hybrid)
    context.tracker.log_metrics({f"val_{k}": v for k, v in start_metrics.items()}, step=0)
    console.print(f"distill: after layer-wise stage: val KL {start_metrics['kl_to_teacher']:.4f}, "
                  f"val ppl {start_metrics['ppl']:.2f}")
    settings = loop_settings(params, seed, time_steps, curriculum_start=params.curriculum.start_time_steps,
                             curriculum_fraction=params.curriculum.anneal_fraction)
    with progress_bar("distillation", params.steps) as advance:
        result = train(hybrid, train_blocks, loss_fn, validate, settings, ckpt / "loop", fp,
                       log_metrics=context.tracker.log_metrics,
                       progress=lambda step, loss: advance(info=f"loss {loss:.4f}"),
                       initial_objective=start_metrics["objective"])
    if result.best_step == 0:
        console.print("distill: no end-to-end step improved the validation KL; keeping the state it started from")
    final = validate(hybrid)
    curves = write_curves(context, "distill", result)
    write_csv(curves["val"].parent / "distill_layerwise.csv", ["layer", "loss_before", "loss_after", "stream_error"],
              [[r["layer"], r["loss_before"], r["loss_after"], r["stream_error"]] for r in layer_rows])
    summary = {"final_val": final, "start_val": start_metrics, "best_step": result.best_step,
               "steps_done": result.steps_done, "resumed_from": result.resumed_from, "layerwise": layer_rows}
    history = json.dumps({"history": result.history, "train_losses": result.train_losses, "layerwise": layer_rows})
    save_trained(context, "distill", context.paths.distilled, hybrid, tokenizer, {"distill": params.model_dump(), "seed": seed},
                 summary, {"history.json": history})
    context.tracker.log_metrics({f"final_val_{k}": v for k, v in final.items()})
    for path in curves.values():
        context.tracker.log_artifact(path, "plots")
    console.print(f"distill: val KL {start_metrics['kl_to_teacher']:.4f} -> {final['kl_to_teacher']:.4f}, "
                  f"val ppl {final['ppl']:.2f} -> {context.paths.distilled}")


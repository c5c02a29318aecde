"""distill: recover the converted hybrid from the frozen teacher.

Stage 1 (``distill.layerwise``): block-by-block training of each spiking FFN on
the hybrid's own residual stream (see ``training/layerwise.py``).
Stage 2: end-to-end knowledge distillation: KL to the teacher's logits at a
temperature (optionally over its top-k tokens), optional per-layer FFN-output
MSE and next-token cross-entropy; only the spiking parts train. With a plain linear LM head and the
full-vocabulary KL, the losses are computed from the head's input a chunk of positions at a time
(``training/losses.py``), so no step holds a full logit tensor.
"""

from __future__ import annotations

import contextlib
import json
import math

import pandas as pd
import torch

from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.devices import check_devices, place
from snn_research.models.hybrid_transformer import SpikingMLP, find_mlps, spiking_units
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.stages.training_common import (
    VAL_KL,
    checkpoint_dir,
    energy_budget,
    fingerprint,
    loop_settings,
    sampled_positions,
    save_trained,
    score_batch,
    teacher_val_targets,
    write_curves,
    write_table,
)
from snn_research.teacher import load_teacher
from snn_research.training.layerwise import LayerCheckpoint, layerwise_distill
from snn_research.training.loop import train
from snn_research.training.losses import (
    Head,
    distillation_kl,
    final_hidden,
    fused_cross_entropy,
    fused_distillation_kl,
    relative_mse,
)

LAYERWISE_COLUMNS = ["layer", "loss_before", "loss_after", "stream_error"]


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
    layer_params = params.layerwise
    checkpoint = LayerCheckpoint(ckpt, fp, write=context.shard.main)
    resumed = checkpoint.read()
    if resumed is not None:
        console.print(f"distill: layer-wise stage resumes after block {resumed[0] - 1} from its checkpoint")
    converted = len({unit.layer for unit in spiking_units(hybrid) if unit.layer is not None})  # blocks trained
    with progress_bar("layer-wise distillation", converted * layer_params.steps_per_layer) as advance:
        reports = layerwise_distill(
            teacher, hybrid, blocks, params.batch_size, layer_params.steps_per_layer, layer_params.lr,
            layer_params.threshold_lr, seed=context.params.seed,
            progress=lambda layer, step, loss: advance(info=f"layer {layer} loss {loss:.4f}"),
            budget_for=lambda mlp: energy_budget(context, mlp, layer_params.energy_weight),
            checkpoint=checkpoint, shard=context.shard,
        )
    rows = [r.__dict__ for r in reports]
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
    device, shard = context.device, context.shard
    shard.check_batch(params.batch_size, "distill.batch_size")
    time_steps = hybrid.hybrid_metadata.plan.time_steps
    train_split = load_blocks(context.paths.splits, "train")
    train_blocks = train_split.input_ids
    val_batches = list(spread(load_blocks(context.paths.splits, "val"), params.val_blocks).input_ids
                       .split(params.batch_size))
    teacher, hybrid, val_batches = place(device, teacher=teacher, hybrid=hybrid, val_batches=val_batches)
    fp = fingerprint(context, {"distill": params.model_dump(), "energy": context.params.energy.model_dump()})
    ckpt = checkpoint_dir(context, "distill")

    layer_rows = []
    if params.layerwise.enabled and params.layerwise.steps_per_layer > 0:
        layer_blocks = spread(train_split, params.layerwise.blocks).input_ids
        layer_rows = _layerwise(context, teacher, hybrid, layer_blocks, ckpt / "layerwise", fp)
    budget = energy_budget(context, hybrid, params.energy_weight)

    val_targets = teacher_val_targets(teacher, val_batches)
    check_devices(device, teacher=teacher, hybrid=hybrid, val_batches=val_batches, val_targets=val_targets)

    def validate(model) -> dict[str, float]:
        """The objective weighs its terms as training does, the energy penalty included: a step that buys
        energy with quality under the budget must be able to count as progress, or no step ever would.
        The KL term is the top-256 bound at temperature 1 (what is reported); the per-layer FFN MSE, which
        needs the teacher's hidden states, is not validated."""
        kl = nll = penalty = ratio = 0.0
        with torch.no_grad():
            for batch, target in zip(val_batches, val_targets):
                scores = score_batch(model, batch, target, budget)
                nll, kl, penalty, ratio = nll + scores.nll, kl + scores.kl, penalty + scores.penalty, ratio + scores.ratio
        count = len(val_targets)
        objective = params.kl_weight * kl + params.ce_weight * nll + penalty
        metrics = {"objective": objective / count, VAL_KL: kl / count, "ppl": math.exp(nll / count)}
        if budget is not None:
            metrics["energy_ratio"] = ratio / count
        return metrics

    converted_layers = [loc.layer for loc in find_mlps(hybrid) if isinstance(loc.module, SpikingMLP)]
    use_mse = params.ffn_mse_weight > 0
    teacher_ffn = _FFNOutputs(teacher, converted_layers) if use_mse else None
    hybrid_ffn = _FFNOutputs(hybrid, converted_layers) if use_mse else None

    def loss_fn(model, batch, step):
        positions, targets = slice(None, -1), batch[:, 1:]  # every position that has a next token
        if params.kl_positions:
            positions = sampled_positions(batch.shape[1], params.kl_positions, seed, step, batch.device)
            targets = batch[:, positions + 1]
        student_head, teacher_head = Head.of(model), Head.of(teacher)
        fused = student_head is not None and teacher_head is not None and not params.top_k
        keep = 0 if isinstance(positions, slice) else positions
        with torch.no_grad():
            teacher_out = (final_hidden(teacher, batch) if fused
                           else teacher(input_ids=batch, use_cache=False, logits_to_keep=keep).logits)
        with budget or contextlib.nullcontext():
            out = final_hidden(model, batch) if fused else model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
            energy_penalty = budget.penalty(batch.numel()) if budget is not None else None
        if fused or not params.kl_positions:  # hidden states of every position, or logits of every position
            teacher_out, out = teacher_out[:, positions], out[:, positions]
        parts = {}
        loss = torch.zeros((), dtype=torch.float32, device=batch.device)
        if params.kl_weight > 0:
            kl = (fused_distillation_kl(out, teacher_out, student_head, teacher_head, params.temperature) if fused
                  else distillation_kl(out, teacher_out, params.temperature, params.top_k))
            loss = loss + params.kl_weight * kl
            parts["kl"] = kl.item()
        if params.ce_weight > 0:
            ce = (fused_cross_entropy(out, targets, student_head) if fused
                  else torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets.reshape(-1)))
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
    console.print(f"distill: after layer-wise stage: val {VAL_KL} {start_metrics[VAL_KL]:.4f}, "
                  f"val ppl {start_metrics['ppl']:.2f}")
    settings = loop_settings(params, seed, time_steps, curriculum_start=params.curriculum.start_time_steps,
                             curriculum_fraction=params.curriculum.anneal_fraction, device=str(device), shard=shard)
    with progress_bar("distillation", params.steps) as advance:
        result = train(hybrid, train_blocks, loss_fn, validate, settings, ckpt / "loop", fp,
                       log_metrics=context.tracker.log_metrics,
                       progress=lambda step, loss: advance(info=f"loss {loss:.4f}"),
                       initial_objective=start_metrics["objective"])
    if result.best_step == 0:
        console.print(f"distill: no end-to-end step improved the validation {VAL_KL}; keeping the state it started from")
    final = validate(hybrid)
    if not shard.main:  # rank 0 writes the outputs; the others hold the same state
        return
    curves = write_curves(context, "distill", result)
    write_table(curves["val"].parent / "distill_layerwise.csv", pd.DataFrame(layer_rows, columns=LAYERWISE_COLUMNS))
    summary = {"final_val": final, "start_val": start_metrics, "best_step": result.best_step,
               "steps_done": result.steps_done, "resumed_from": result.resumed_from, "layerwise": layer_rows}
    history = json.dumps({"history": result.history, "train_losses": result.train_losses, "layerwise": layer_rows})
    save_trained(context, "distill", context.paths.distilled, hybrid, tokenizer, {"distill": params.model_dump(), "seed": seed},
                 summary, {"history.json": history})
    context.tracker.log_metrics({f"final_val_{k}": v for k, v in final.items()})
    for path in curves.values():
        context.tracker.log_artifact(path, "plots")
    console.print(f"distill: val {VAL_KL} {start_metrics[VAL_KL]:.4f} -> {final[VAL_KL]:.4f}, "
                  f"val ppl {final['ppl']:.2f} -> {context.paths.distilled}")


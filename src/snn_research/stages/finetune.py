"""finetune: surrogate-gradient fine-tuning of the distilled hybrid with next-token cross-entropy.

With ``finetune.kl_weight`` > 0 the KL to the frozen teacher is added, so that the
hybrid gains on the corpus without drifting from the teacher's predictions.

A small learning rate, validation perplexity every N steps, early stopping after
``finetune.patience`` validations without improvement; the best state is kept.
"""

from __future__ import annotations

import contextlib
import json
import math

import torch

from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.stages.training_common import (
    checkpoint_dir,
    energy_budget,
    fingerprint,
    sampled_positions,
    teacher_val_targets,
    loop_settings,
    save_trained,
    write_curves,
)
from snn_research.teacher import load_teacher
from snn_research.training.losses import distillation_kl, next_token_nll, top_k_kl
from snn_research.training.loop import train


def run(context: StageContext) -> None:
    from transformers import AutoTokenizer

    params = context.params.finetune
    seed = context.params.seed
    context.verify(context.paths.splits, "split")
    context.verify(context.paths.distilled, "distill")
    teacher = None
    if params.kl_weight > 0:
        context.verify(context.paths.teacher, "download-teacher")
        teacher, _ = load_teacher(context.paths.teacher)
    hybrid = load_hybrid(context.paths.distilled)
    tokenizer = AutoTokenizer.from_pretrained(context.paths.distilled, trust_remote_code=False)
    time_steps = hybrid.hybrid_metadata.plan.time_steps
    train_blocks = load_blocks(context.paths.splits, "train").input_ids
    val_blocks = spread(load_blocks(context.paths.splits, "val"), params.val_blocks).input_ids
    val_batches = list(val_blocks.split(params.batch_size))
    val_targets = teacher_val_targets(teacher, val_batches) if teacher is not None else []

    def validate(model) -> dict[str, float]:
        nll = kl = 0.0
        with torch.no_grad():
            for index, batch in enumerate(val_batches):
                logits = model(input_ids=batch, use_cache=False).logits
                nll += float(next_token_nll(logits, batch))
                if val_targets:
                    kl += float(top_k_kl(logits, *val_targets[index]))
        nll, kl = nll / len(val_batches), kl / len(val_batches)
        metrics = {"objective": nll + params.kl_weight * kl, "nll": nll, "ppl": math.exp(nll)}
        if val_targets:
            metrics["kl_to_teacher"] = kl
        return metrics

    budget = energy_budget(context, hybrid, params.energy_weight)

    def loss_fn(model, batch, step):
        with budget or contextlib.nullcontext():
            logits = model(input_ids=batch, use_cache=False).logits
            ce = next_token_nll(logits, batch)
            loss, parts = ce, {"ce": ce.item()}
            if teacher is not None:
                chosen = sampled_positions(batch.shape[1], params.kl_positions, seed, step)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch, use_cache=False, logits_to_keep=chosen).logits
                kl = distillation_kl(logits[:, chosen], teacher_logits)
                loss = loss + params.kl_weight * kl
                parts["kl"] = kl.item()
            if budget is not None:
                loss = loss + budget.penalty(batch.numel())
                parts["energy_ratio"] = budget.last_ratio
        return loss, parts

    start = validate(hybrid)
    context.tracker.log_metrics({f"val_{k}": v for k, v in start.items()}, step=0)
    settings = loop_settings(params, seed, time_steps, patience=params.patience)
    with progress_bar("fine-tuning", params.steps) as advance:
        result = train(hybrid, train_blocks, loss_fn, validate, settings, checkpoint_dir(context, "finetune") / "loop",
                       fingerprint(context, params.model_dump()), log_metrics=context.tracker.log_metrics,
                       progress=lambda step, loss: advance(info=f"loss {loss:.4f}"), initial_objective=start["objective"])
    final = validate(hybrid)
    curves = write_curves(context, "finetune", result)
    summary = {"start_val": start, "final_val": final, "best_step": result.best_step, "steps_done": result.steps_done,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from}
    save_trained(context, "finetune", context.paths.finetuned, hybrid, tokenizer, {"finetune": params.model_dump(), "seed": seed},
                 summary, {"history.json": json.dumps({"history": result.history, "train_losses": result.train_losses})})
    context.tracker.log_metrics({f"final_val_{k}": v for k, v in final.items()})
    for path in curves.values():
        context.tracker.log_artifact(path, "plots")
    stop = " (stopped early)" if result.stopped_early else ""
    console.print(f"finetune: val ppl {start['ppl']:.2f} -> {final['ppl']:.2f} after {result.steps_done} steps{stop}")

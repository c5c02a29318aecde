"""finetune: surrogate-gradient fine-tuning of the distilled hybrid with next-token cross-entropy.

A small learning rate, validation perplexity every N steps, early stopping after
``finetune.patience`` validations without improvement; the best state is kept.
"""

from __future__ import annotations

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
    loop_settings,
    save_trained,
    write_curves,
)
from snn_research.training.losses import next_token_nll
from snn_research.training.loop import train


def run(context: StageContext) -> None:
    from transformers import AutoTokenizer

    params = context.params.finetune
    seed = context.params.seed
    context.verify(context.paths.splits, "split")
    context.verify(context.paths.distilled, "distill")
    hybrid = load_hybrid(context.paths.distilled)
    tokenizer = AutoTokenizer.from_pretrained(context.paths.distilled, trust_remote_code=False)
    time_steps = hybrid.hybrid_metadata.plan.time_steps
    train_blocks = load_blocks(context.paths.splits, "train").input_ids
    val_blocks = spread(load_blocks(context.paths.splits, "val"), params.val_blocks).input_ids

    def validate(model) -> dict[str, float]:
        with torch.no_grad():
            nll = sum(float(next_token_nll(model(input_ids=b, use_cache=False).logits, b))
                      for b in val_blocks.split(params.batch_size))
        nll /= math.ceil(val_blocks.shape[0] / params.batch_size)
        return {"objective": nll, "nll": nll, "ppl": math.exp(nll)}

    budget = energy_budget(context, hybrid, params.energy_weight)

    def loss_fn(model, batch, step):
        if budget is None:
            return next_token_nll(model(input_ids=batch, use_cache=False).logits, batch), {}
        with budget:
            loss = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
            penalty = budget.penalty(batch.numel())
        return loss + penalty, {"ce": loss.item(), "energy_ratio": budget.last_ratio}

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

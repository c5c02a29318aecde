"""finetune: fine-tuning of the distilled hybrid's spiking FFNs with next-token cross-entropy.

The gradient through the spikes is the encoders' own: straight-through (learned step size) for the
closed-form ``if``, ``weighted`` and ``rate`` encoders of gated FFNs, surrogate BPTT for the ``lif``
encoder and for GPT-2's hidden neurons.

With ``finetune.kl_weight`` > 0 the KL to the frozen teacher is added, so that the
hybrid gains on the corpus without drifting from the teacher's predictions.

A small learning rate, validation perplexity every N steps, early stopping after
``finetune.patience`` validations without improvement; the best state is kept.
The recipe (``finetune_recipe``) is shared with ``finetune-teacher``, which
trains the teacher's own FFN linears the same way as a fair reference.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from snn_research.config import FinetuneParams
from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.data import load_blocks, spread
from snn_research.devices import place
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
)
from snn_research.teacher import load_teacher
from snn_research.training.energy_budget import EnergyBudget
from snn_research.training.loop import train
from snn_research.training.losses import (
    Head,
    distillation_kl,
    final_hidden,
    fused_cross_entropy,
    fused_distillation_kl,
    next_token_nll,
)


@dataclass
class FinetuneRecipe:
    """What a fine-tuning run trains on and validates with (its data, loss and objective)."""

    train_blocks: torch.Tensor  # (N, L) on the CPU: the loop moves each batch
    val_batches: list[torch.Tensor]  # on the training device
    loss_fn: Callable
    validate: Callable[[torch.nn.Module], dict[str, float]]


def finetune_recipe(context: StageContext, params: FinetuneParams, device: torch.device,
                    reference: torch.nn.Module | None, budget: EnergyBudget | None = None) -> FinetuneRecipe:
    """Cross-entropy on the train split, plus ``kl_weight`` x the KL to the frozen ``reference`` when given.

    Validation: mean next-token NLL on ``val_blocks`` blocks, plus ``kl_weight`` x the top-256 KL bound to
    the reference (cached once), plus the energy penalty under ``budget``: the loss training minimises, so
    the objective early stopping and the best state follow measures the same thing.
    """
    seed = context.params.seed
    train_blocks = load_blocks(context.paths.splits, "train").input_ids
    val_blocks = spread(load_blocks(context.paths.splits, "val"), params.val_blocks).input_ids
    val_batches = place(device, val_batches=list(val_blocks.split(params.batch_size)))
    val_targets = teacher_val_targets(reference, val_batches) if reference is not None else []

    def validate(model) -> dict[str, float]:
        nll = kl = penalty = ratio = 0.0
        with torch.no_grad():
            for index, batch in enumerate(val_batches):
                scores = score_batch(model, batch, val_targets[index] if val_targets else None, budget)
                nll, kl, penalty, ratio = nll + scores.nll, kl + scores.kl, penalty + scores.penalty, ratio + scores.ratio
        count = len(val_batches)
        nll, kl, penalty = nll / count, kl / count, penalty / count
        metrics = {"objective": nll + params.kl_weight * kl + penalty, "nll": nll, "ppl": math.exp(nll)}
        if val_targets:
            metrics[VAL_KL] = kl
        if budget is not None:
            metrics["energy_ratio"] = ratio / count
        return metrics

    def loss_fn(model, batch, step):
        head = Head.of(model)
        reference_head = Head.of(reference) if reference is not None else None
        with budget or contextlib.nullcontext():
            if head is not None:  # the losses from the LM head's input, a chunk of positions at a time
                hidden = final_hidden(model, batch)
                ce = fused_cross_entropy(hidden[:, :-1], batch[:, 1:], head)
            else:
                logits = model(input_ids=batch, use_cache=False).logits
                ce = next_token_nll(logits, batch)
            loss, parts = ce, {"ce": ce.item()}
            if reference is not None:
                chosen = sampled_positions(batch.shape[1], params.kl_positions, seed, step, batch.device)
                with torch.no_grad():
                    if head is not None and reference_head is not None:
                        reference_hidden = final_hidden(reference, batch)[:, chosen]
                    else:
                        reference_logits = reference(input_ids=batch, use_cache=False, logits_to_keep=chosen).logits
                if head is not None and reference_head is not None:
                    kl = fused_distillation_kl(hidden[:, chosen], reference_hidden, head, reference_head)
                else:
                    student = logits[:, chosen] if head is None else head.logits(hidden[:, chosen])[0]
                    kl = distillation_kl(student, reference_logits)
                loss = loss + params.kl_weight * kl
                parts["kl"] = kl.item()
            if budget is not None:
                loss = loss + budget.penalty(batch.numel())
                parts["energy_ratio"] = budget.last_ratio
        return loss, parts

    place(device, val_targets=val_targets, reference=reference if reference is not None else [])
    return FinetuneRecipe(train_blocks, val_batches, loss_fn, validate)


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
    device, shard = context.device, context.shard
    shard.check_batch(params.batch_size, "finetune.batch_size")
    place(device, hybrid=hybrid, teacher=teacher if teacher is not None else [])
    time_steps = hybrid.hybrid_metadata.plan.time_steps
    budget = energy_budget(context, hybrid, params.energy_weight)
    recipe = finetune_recipe(context, params, device, teacher, budget)
    fp = fingerprint(context, {"finetune": params.model_dump(), "energy": context.params.energy.model_dump()})

    start = recipe.validate(hybrid)
    context.tracker.log_metrics({f"val_{k}": v for k, v in start.items()}, step=0)
    settings = loop_settings(params, seed, time_steps, patience=params.patience, device=str(device), shard=shard)
    with progress_bar("fine-tuning", params.steps) as advance:
        result = train(hybrid, recipe.train_blocks, recipe.loss_fn, recipe.validate, settings,
                       checkpoint_dir(context, "finetune") / "loop", fp, log_metrics=context.tracker.log_metrics,
                       progress=lambda step, loss: advance(info=f"loss {loss:.4f}"), initial_objective=start["objective"])
    final = recipe.validate(hybrid)
    if not shard.main:  # rank 0 writes the outputs; the others hold the same state
        return
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

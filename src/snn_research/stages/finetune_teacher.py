"""finetune-teacher: fine-tune the teacher's FFNs with the finetune recipe, a fair reference for the hybrid.

The hybrid's gain from ``finetune`` mixes two things: recovering what
conversion lost, and fitting the corpus. Tuning the teacher with the very same
recipe (the ``finetune`` params section: data, steps, batch size and order,
learning rate, warm-up, weight decay, gradient clip, seed, the optional KL anchor
to the frozen teacher, validation and early stopping) and the very same
parameter set (the linears that read spikes in the hybrid: every parameter of
the FFNs of ``convert.layers`` (null: all) when ``convert.sites`` holds ``ffn``,
and the weights and biases of the other chosen sites' consumers) separates them. The teacher has no
thresholds and no energy budget. When that set is empty (sites [head] on a model whose head is tied to
the input embedding), the teacher is written unchanged.

Writes ``paths.teacher_finetuned`` as a Hugging Face folder that
``snn_research.teacher.load_teacher`` reads, with its manifest.
"""

from __future__ import annotations

import copy
import json
import shutil

import torch

from snn_research.devices import place
from snn_research.io import atomic_directory
from snn_research.models.hybrid_transformer import analog_site_parameters
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.stages.finetune import finetune_recipe
from snn_research.stages.training_common import checkpoint_dir, fingerprint, loop_settings, write_curves
from snn_research.teacher import load_teacher
from snn_research.training.loop import LoopResult, train

STAGE = "finetune-teacher"


def run(context: StageContext) -> None:
    params = context.params.finetune
    seed = context.params.seed
    layers = context.params.convert.layers
    context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.splits, "split")
    model, tokenizer = load_teacher(context.paths.teacher)
    reference = copy.deepcopy(model) if params.kl_weight > 0 else None  # the frozen original, for the KL anchor
    device, shard = context.device, context.shard
    shard.check_batch(params.batch_size, "finetune.batch_size")
    place(device, teacher=model, reference=reference if reference is not None else [])
    # what the hybrid's finetune trains: the spike-consuming linears of convert.sites in convert.layers
    trainable = analog_site_parameters(model, layers, context.params.convert.sites)
    recipe = finetune_recipe(context, params, device, reference)
    fp = fingerprint(context, {"finetune": params.model_dump(), "convert.layers": layers,
                               "convert.sites": context.params.convert.sites})

    start = recipe.validate(model)
    context.tracker.log_metrics({f"val_{k}": v for k, v in start.items()}, step=0)
    settings = loop_settings(params, seed, time_steps=None, patience=params.patience, device=str(device), shard=shard)
    groups = [{"params": trainable, "lr": params.lr, "weight_decay": params.weight_decay}]
    if trainable:
        with progress_bar("teacher fine-tuning", params.steps) as advance:
            result = train(model, recipe.train_blocks, recipe.loss_fn, recipe.validate, settings,
                           checkpoint_dir(context, STAGE) / "loop", fp, log_metrics=context.tracker.log_metrics,
                           progress=lambda step, loss: advance(info=f"loss {loss:.4f}"),
                           initial_objective=start["objective"], param_groups=groups)
    else:
        # e.g. sites [head] on a tied-embedding model: the hybrid's finetune trains thresholds only, so the
        # teacher tuned the same way is the teacher itself; it is written unchanged (empty curves, 0 steps)
        console.print(f"finetune-teacher: convert.sites {context.params.convert.sites} reach no analog teacher "
                      "weight that the hybrid trains; the reference is the teacher unchanged")
        result = LoopResult(history=[{"step": 0, **start}])
    final = recipe.validate(model)
    if not shard.main:  # rank 0 writes the outputs; the others hold the same state
        return
    curves = write_curves(context, "finetune_teacher", result)
    summary = {"start_val": start, "final_val": final, "best_step": result.best_step, "steps_done": result.steps_done,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
               "layers": layers, "trained_parameters": int(sum(p.numel() for p in trainable))}
    history = json.dumps({"history": result.history, "train_losses": result.train_losses})
    with atomic_directory(context.paths.teacher_finetuned) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "history.json").write_text(history)
        context.manifest(tmp, STAGE, {"finetune": params.model_dump(), "seed": seed, "convert": {"layers": layers, "sites": context.params.convert.sites}},
                         summary)
    shutil.rmtree(checkpoint_dir(context, STAGE), ignore_errors=True)  # the run is complete: nothing to resume
    context.tracker.log_metrics({f"final_val_{k}": v for k, v in final.items()})
    for path in curves.values():
        context.tracker.log_artifact(path, "plots")
    stop = " (stopped early)" if result.stopped_early else ""
    console.print(f"{STAGE}: val ppl {start['ppl']:.2f} -> {final['ppl']:.2f} after {result.steps_done} steps{stop} "
                  f"-> {context.paths.teacher_finetuned}")

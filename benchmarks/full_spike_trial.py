"""Training-free trial of the research operators: what a power-of-two softmax and a shift or fixed-scale norm
cost a model in quality before any recovery.

    python -m benchmarks.full_spike_trial models/finetuned --teacher models/teacher --splits data/splits
    python -m benchmarks.full_spike_trial pipelines/smollm2/models/finetuned \\
        --teacher pipelines/smollm2/models/teacher --splits pipelines/smollm2/data/splits

MODEL is a hybrid (or teacher) folder. Each variant is applied to a fresh copy of it and scored on 8
test blocks against the teacher: perplexity ratio, top-1 agreement, full KL (the coding trial's scoring).
A variant joins parts with "+", applied in this order:
- ``attention``: q, k, v and o projections read spikes: the pipeline's ``qkv`` and ``o`` sites
  (``convert.sites``), added to the hybrid with its own plan (the weighted code at T = 5 for a teacher),
  per-channel 99.9th-percentile thresholds from 8 calib blocks (``conversion/calibrator.py``);
- ``lm_head``: the LM head reads spikes (the ``head`` site), calibrated the same way;
- ``softmax``: power-of-two softmax in every attention;
- ``shift_norm``: every RMSNorm/LayerNorm's divisor rounded to a power of two;
- ``fixed_norm``: every norm's divisor a constant calibrated on the 8 calib blocks.
The default list is the research track's steps 0-4 (FFN only; + attention projections; + LM head;
+ power-of-two softmax; + shift norm) and the three operators alone. One JSON line per variant, with the
spike rate of the spiking projections, and the estimated energy of the whole model against the teacher's
(``evaluation/energy.py`` on the first test block, the replaced softmax and shift norm priced as
``research/full_spike.py`` prices them; null for the fixed-scale norm, which is not priced, and for a
replaced operator on a model with no spiking site). The first line gives the teacher's LM head share of its
own energy. ``pipelines/research-full-spike`` measures the steps with recovery.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from benchmarks.coding_trial import _score
from snn_research.data import load_blocks, spread
from snn_research.generate import load_model_folder
from snn_research.conversion.calibrator import Calibrator
from snn_research.models.hybrid_transformer import (
    HybridPlan,
    SpikeRecorder,
    SpikingSite,
    hybridize,
    site_key,
    spiking_units,
)
from snn_research.evaluation.energy import measure_energy
from snn_research.research.full_spike import ResearchStep, price_operators, spike_rates
from snn_research.research.operators import calibrate_norm_scales, replace_norms, use_attention
from snn_research.teacher import load_teacher

PARTS = ("attention", "lm_head", "softmax", "shift_norm", "fixed_norm")
VARIANTS = ("none", "attention", "attention+lm_head", "attention+lm_head+softmax",
            "attention+lm_head+softmax+shift_norm", "softmax", "shift_norm", "fixed_norm")


def apply(model, variant: str, calib) -> list:
    """Apply ``variant``'s parts to ``model`` in place; returns the spiking projections made."""
    parts = [] if variant == "none" else variant.split("+")
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    groups = [group for part, names in (("attention", ("qkv", "o")), ("lm_head", ("head",))) if part in parts
              for group in names]
    if groups:
        plan = getattr(getattr(model, "hybrid_metadata", None), "plan", None) or HybridPlan(time_steps=5,
                                                                                            encoder="weighted")
        plan = plan.model_copy(update={"sites": groups})
        calibrator = Calibrator(model, sites=groups)
        calibrator.run(calib.split(4))
        calibrator.remove_hooks()
        hybridize(model, plan, calibrator.result(99.9).thresholds(plan.granularity))
    if "softmax" in parts:
        use_attention(model, "power_of_two")
    if "shift_norm" in parts:
        replace_norms(model, "shift")
    if "fixed_norm" in parts:
        replace_norms(model, "fixed", calibrate_norm_scales(model, calib.split(4)))
    return [unit for unit in spiking_units(model) if isinstance(unit, SpikingSite)]


def energy_ratio(model, variant: str, block) -> tuple[float | None, dict[str, float]]:
    """(model energy ratio against the teacher, the teacher's energy share per component) on ``block``."""
    parts = [] if variant == "none" else variant.split("+")
    report = measure_energy(model, block)
    teacher_pj = report.teacher_energy_pj
    shares = {name: (macs * report.e_mac_pj + acs * report.e_ac_pj) / teacher_pj
              for name, (macs, acs) in report.teacher_ops.items()}
    replaced = "softmax" in parts or "shift_norm" in parts
    sites = list(spike_rates(report, model))
    if "fixed_norm" in parts or (replaced and not sites):
        return None, shares
    if replaced:
        step = ResearchStep(name=variant, sites=sites, softmax="power_of_two" if "softmax" in parts else "analog",
                            norm="shift" if "shift_norm" in parts else "analog")
        report = price_operators(report, model.config, step)
    return report.model_energy_ratio, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="hybrid or teacher folder")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--splits", default="data/splits")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [p for v in variants if v != "none" for p in v.split("+") if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)} joined by '+', or 'none'")
    teacher, _ = load_teacher(args.teacher)
    test = spread(load_blocks(args.splits, "test"), args.blocks).input_ids
    calib = spread(load_blocks(args.splits, "calib"), 8).input_ids
    teacher_nll, _, _ = _score(teacher, teacher, test)
    _, shares = energy_ratio(teacher, "none", test[:1])
    print(json.dumps({"teacher_ppl": round(math.exp(teacher_nll), 3), "blocks": args.blocks,
                      "teacher_lm_head_energy_share": round(shares.get("lm_head", 0.0), 4)}), flush=True)
    for variant in variants:
        started = time.perf_counter()
        model, _, kind = load_model_folder(args.model)
        wrapped = apply(model, variant, calib)
        with SpikeRecorder(model) as recorder:  # the test blocks' spikes only
            nll, agreement, kl = _score(model, teacher, test)
        energy, _ = energy_ratio(model, variant, test[:1])
        keys = [site_key(unit.path, unit.site) for unit in wrapped]
        rate = (sum(recorder.spikes[k] for k in keys) / sum(recorder.neuron_steps[k] for k in keys)) if keys else None
        print(json.dumps({"model": args.model, "kind": kind, "variant": variant,
                          "ppl_ratio": round(math.exp(nll - teacher_nll), 4), "agreement_top1": round(agreement, 4),
                          "kl_full_to_teacher": round(kl, 4),
                          "projection_spike_rate": round(rate, 4) if rate is not None else None,
                          "model_energy_ratio": round(energy, 4) if energy is not None else None,
                          "seconds": round(time.perf_counter() - started, 1)}),
              flush=True)


if __name__ == "__main__":
    main()

"""Training-free trial of the research operators: what a power-of-two softmax and a shift or fixed-scale norm
cost a model in quality before any recovery.

    python -m benchmarks.full_spike_trial models/finetuned --teacher models/teacher --splits data/splits
    python -m benchmarks.full_spike_trial pipelines/smollm2/models/finetuned \\
        --teacher pipelines/smollm2/models/teacher --splits pipelines/smollm2/data/splits

MODEL is a hybrid (or teacher) folder. Each variant is applied to a fresh copy of it and scored on 8
test blocks against the teacher: perplexity ratio, top-1 agreement, full KL (the coding trial's scoring).
Variants: ``softmax`` (power-of-two softmax in every attention), ``shift_norm`` (every RMSNorm/LayerNorm's
divisor rounded to a power of two), ``fixed_norm`` (every norm's divisor a constant calibrated on 8 calib
blocks), and ``softmax+shift_norm``. One JSON line per variant. Energy is not counted here: the operators
replace an exp unit, a square root and divisions by shifts, which the energy model does not price yet.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from benchmarks.coding_trial import _score
from snn_research.data import load_blocks, spread
from snn_research.generate import load_model_folder
from snn_research.research.operators import calibrate_norm_scales, replace_norms, use_attention
from snn_research.teacher import load_teacher

VARIANTS = ("none", "softmax", "shift_norm", "fixed_norm", "softmax+shift_norm")


def apply(model, variant: str, calib) -> None:
    parts = [] if variant == "none" else variant.split("+")
    if "softmax" in parts:
        use_attention(model, "power_of_two")
    if "shift_norm" in parts:
        replace_norms(model, "shift")
    if "fixed_norm" in parts:
        replace_norms(model, "fixed", calibrate_norm_scales(model, calib.split(4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="hybrid or teacher folder")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--splits", default="data/splits")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    teacher, _ = load_teacher(args.teacher)
    test = spread(load_blocks(args.splits, "test"), args.blocks).input_ids
    calib = spread(load_blocks(args.splits, "calib"), 8).input_ids
    teacher_nll, _, _ = _score(teacher, teacher, test)
    print(json.dumps({"teacher_ppl": round(math.exp(teacher_nll), 3), "blocks": args.blocks}), flush=True)
    for variant in variants:
        started = time.perf_counter()
        model, _, kind = load_model_folder(args.model)
        apply(model, variant, calib)
        nll, agreement, kl = _score(model, teacher, test)
        print(json.dumps({"model": args.model, "kind": kind, "variant": variant,
                          "ppl_ratio": round(math.exp(nll - teacher_nll), 4), "agreement_top1": round(agreement, 4),
                          "kl_full_to_teacher": round(kl, 4), "seconds": round(time.perf_counter() - started, 1)}),
              flush=True)


if __name__ == "__main__":
    main()

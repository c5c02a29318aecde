"""Spikes of the weighted code spelled in binary against signed digits, on a converted hybrid (nothing written).

    python -m benchmarks.digits_trial [--model models/converted] [--splits data/splits] [--blocks 4] [--headroom 0 3]
                                      [--weight-bits 8]

The hybrid must use the weighted encoder. For each ``--headroom h`` (0: as stored; h > 0: ``add_headroom``,
T grows by h at the same step size) it runs the energy pass (``measure_energy``) on ``--blocks`` test blocks,
once with every encoder spelling its levels in binary and once with signed digits (``digits``), and prints a
JSON line per run: T, the spike rate per neuron and step, synaptic events per synapse per token, and the FFN
energy against the FP32 and the INT8 teacher (``baselines.compare``). The two codes carry the same levels:
the trial checks that the logits of the first block are equal, bit for bit, before it counts.

With ``--weight-bits 8`` every spiking FFN is given 8-bit weights first (as ``convert.weight_bits`` would,
without retraining), and each line adds the integer figures (``baselines.integer_compare``): the FFN and
model energy against the W8A8 ANN, the memory-inclusive FFN ratio at batch 1 and at ``--blocks`` sequences,
and the share of silent inputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from snn_research.conversion.ann_to_snn_converter import add_headroom, load_hybrid
from snn_research.data import load_blocks
from snn_research.evaluation.baselines import Prices, compare, events_per_synapse, integer_compare
from snn_research.evaluation.energy import measure_energy
from snn_research.hybrid.adapter import AnalogToSpikes
from snn_research.models.hybrid_transformer import spiking_mlps


def encoders(model) -> list[AnalogToSpikes]:
    return [m for m in model.modules() if isinstance(m, AnalogToSpikes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/converted"))
    parser.add_argument("--splits", type=Path, default=Path("data/splits"))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--headroom", type=int, nargs="+", default=[0])
    parser.add_argument("--weight-bits", type=int, choices=[8], default=None)
    args = parser.parse_args(argv)
    ids = load_blocks(args.splits, "test").input_ids[: args.blocks]
    prices = Prices()
    for headroom in args.headroom:
        model = load_hybrid(args.model)
        if any(e.kind != "weighted" for e in encoders(model)):
            parser.error(f"{args.model}: the digits apply to the weighted encoder only")
        if headroom:
            add_headroom(model, headroom)
        if args.weight_bits:
            for unit in spiking_mlps(model):
                unit.weight_bits = args.weight_bits
        logits = {}
        for digits in ("binary", "signed"):
            for encoder in encoders(model):
                encoder.digits = digits
            with torch.no_grad():
                logits[digits] = model(input_ids=ids[:1]).logits
            report = measure_energy(model, ids, prices.e_mac_pj, prices.e_ac_pj, read_batches=(1, ids.shape[0]))
            figures = compare(report, prices)
            integer = {k: round(v, 4) for k, v in integer_compare(report, prices).items()}
            print(json.dumps({
                "headroom": headroom, "time_steps": encoders(model)[0].time_steps, "digits": digits,
                "tokens": int(ids.numel()), "spike_rate": round(report.mean_spike_rate, 5),
                "events_per_synapse": round(events_per_synapse(report), 4),
                "ffn_energy_ratio": round(figures["ffn_energy_ratio"], 4),
                "ffn_energy_ratio_int8": round(figures["ffn_energy_ratio_int8"], 4), **integer}), flush=True)
        if not torch.equal(logits["binary"], logits["signed"]):
            raise SystemExit("the two codes gave different logits: they must carry the same levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much the integer path's weight rounding costs on a real model, per consumer (no pipeline change).

    python -m benchmarks.integer_trial [--teacher models/teacher] [--conversion reports] [--splits data/splits]
                                       [--blocks 2]

For every gated FFN of the teacher, on ``--blocks`` test blocks: the FFN's input and product are encoded
with the weighted code at the conversion's thresholds and T (``reports/thresholds.safetensors`` and
``reports/conversion_metadata.json``; the conversion must use the weighted encoder), and each
consumer (gate and up on the input's levels, down on the product's levels) is computed in FP32 on the
decoded levels and through ``snn_research.hybrid.integer`` with the thresholds folded into the weights,
at 8 bits (one scale per output channel, and groups of 128) and at 4 bits (groups of 128 and 64). Beside
them: the W8A8 ANN's error against the FP32 consumer of the raw activations. Printed: the relative
output error ||y - y_fp32|| / ||y_fp32|| per consumer, mean and worst over layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = (("int8 per channel", 8, None), ("int8 g128", 8, 128), ("int4 g128", 4, 128), ("int4 g64", 4, 64))


def relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).norm() / reference.norm())


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from snn_research.data import load_blocks, single_domain
    from snn_research.hybrid.adapter import weighted_levels
    from snn_research.hybrid.integer import integer_linear, quantize_spiking_linear, quantize_weight, w8a8_linear
    from snn_research.models.hybrid_transformer import find_mlps
    from snn_research.teacher import load_teacher

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--conversion", type=Path, default=Path("reports"),
                        help="folder of conversion_metadata.json and thresholds.safetensors")
    parser.add_argument("--splits", type=Path, default=Path("data/splits"))
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args(argv)
    plan = json.loads((args.conversion / "conversion_metadata.json").read_text())["plan"]
    if plan["encoder"] != "weighted":
        parser.error(f"{args.conversion / 'conversion_metadata.json'}: encoder {plan['encoder']!r}; the integer "
                     "path takes the weighted code's levels")
    model, _ = load_teacher(args.teacher)
    thresholds = load_file(str(args.conversion / "thresholds.safetensors"))
    ids = single_domain(load_blocks(args.splits, "test"), str(args.splits), "the integer trial").input_ids[:args.blocks]
    captured: dict[str, torch.Tensor] = {}
    mlps = find_mlps(model)
    hooks = [location.module.register_forward_pre_hook(
        lambda module, inputs, path=location.path: captured.__setitem__(path, inputs[0].detach()))
        for location in mlps]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    T = int(plan["time_steps"])
    L = 2 ** T - 1
    errors: dict[str, dict[str, list[float]]] = {}

    def add(consumer: str, name: str, value: float) -> None:
        errors.setdefault(consumer, {}).setdefault(name, []).append(value)

    with torch.no_grad():
        for location in mlps:
            mlp, path = location.module, location.path
            x = captured[path].reshape(-1, captured[path].shape[-1])
            theta_in, theta_mid = thresholds[f"{path}:input"], thresholds[f"{path}:product"]
            levels_in = weighted_levels(x, theta_in, T)
            decoded_in = levels_in * theta_in / L
            product = mlp.act_fn(mlp.gate_proj(decoded_in)) * mlp.up_proj(decoded_in)
            levels_mid = weighted_levels(product, theta_mid, T)
            decoded_mid = levels_mid * theta_mid / L
            raw_product = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            for consumer, linear, levels, decoded, theta, raw in (
                    ("gate", mlp.gate_proj, levels_in, decoded_in, theta_in, x),
                    ("up", mlp.up_proj, levels_in, decoded_in, theta_in, x),
                    ("down", mlp.down_proj, levels_mid, decoded_mid, theta_mid, raw_product)):
                reference = F.linear(decoded, linear.weight)
                for name, bits, group in VARIANTS:
                    if group is not None and linear.weight.shape[1] % group:
                        continue  # the groups do not tile this consumer's inputs: its cell shows '-'
                    integer = quantize_spiking_linear(linear.weight, theta, T, bits, group)
                    add(consumer, name, relative(integer_linear(levels, integer), reference))
                add(consumer, "W8A8 ANN (vs FP32 on raw input)",
                    relative(w8a8_linear(raw, quantize_weight(linear.weight, 8)), F.linear(raw, linear.weight)))
    print(f"{len(mlps)} FFNs, {ids.numel()} tokens, T = {T}: relative output error, mean (worst) over layers")
    names = [name for name, _, _ in VARIANTS] + ["W8A8 ANN (vs FP32 on raw input)"]
    print("| consumer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for consumer, table in errors.items():
        cells = [f"{sum(table[n]) / len(table[n]):.4f} ({max(table[n]):.4f})" if n in table else "-" for n in names]
        print(f"| {consumer} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

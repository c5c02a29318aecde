"""The integer spiking linear against FP32 and W8A8 on one FFN of Gemma 3 270M's shape (INFO rows).

One gated FFN (640 -> 2 x 2048 -> 640) on 4 x 256 tokens, forward only, three ways:
- fp32: the float hybrid's consumers, the weighted code's levels decoded and multiplied in FP32
  (what the hybrid computes today);
- integer: the same levels as int8 (``encode_int8``) times int8 weights (thresholds folded in), int32 sums through
  ``torch._int_mm``, one float scale per output channel (``snn_research.hybrid.integer``);
- w8a8: the quantised ANN, per-token dynamic int8 activations and per-channel int8 weights, on the same
  integer kernel.
Each includes its own encoding (the spiking paths' ``weighted_levels``, W8A8's activation quantisation).
Rows: tokens/s of each, the integer path over fp32 and over w8a8, and the integer path's largest
relative output difference to fp32 (weight rounding only). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import Row, interleaved, row

TOKENS, HIDDEN, INTERMEDIATE, TIME_STEPS = 1024, 640, 2048, 5


def run(repeats: int = 5) -> list[Row]:
    from snn_research.hybrid.adapter import weighted_levels
    from snn_research.hybrid.integer import encode_int8, integer_linear, quantize_spiking_linear, quantize_weight, w8a8_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    gate = torch.randn(INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN ** 0.5
    up = torch.randn(INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN ** 0.5
    down = torch.randn(HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE ** 0.5
    theta_in = x.abs().quantile(0.999, dim=0)
    product = F.gelu(F.linear(x, gate), approximate="tanh") * F.linear(x, up)
    theta_mid = product.abs().quantile(0.999, dim=0).clamp_min(1e-3)
    levels_per = 2 ** TIME_STEPS - 1
    int_gate = quantize_spiking_linear(gate, theta_in, TIME_STEPS, 8)
    int_up = quantize_spiking_linear(up, theta_in, TIME_STEPS, 8)
    int_down = quantize_spiking_linear(down, theta_mid, TIME_STEPS, 8)
    q_gate, q_up, q_down = (quantize_weight(w, 8) for w in (gate, up, down))

    def fp32():
        decoded = weighted_levels(x, theta_in, TIME_STEPS) * (theta_in / levels_per)
        mid = F.gelu(F.linear(decoded, gate), approximate="tanh") * F.linear(decoded, up)
        return F.linear(weighted_levels(mid, theta_mid, TIME_STEPS) * (theta_mid / levels_per), down)

    def integer():
        levels = encode_int8(x, theta_in, TIME_STEPS)
        mid = F.gelu(integer_linear(levels, int_gate), approximate="tanh") * integer_linear(levels, int_up)
        return integer_linear(encode_int8(mid, theta_mid, TIME_STEPS), int_down)

    def w8a8():
        mid = F.gelu(w8a8_linear(x, q_gate), approximate="tanh") * w8a8_linear(x, q_up)
        return w8a8_linear(mid, q_down)

    with torch.no_grad():
        times = interleaved({"fp32": fp32, "integer": integer, "w8a8": w8a8}, repeats)
        reference, got = fp32(), integer()
    difference = float((got - reference).norm() / reference.norm())
    shape = f"{TOKENS} tokens, {HIDDEN}->{INTERMEDIATE}->{HIDDEN}, T={TIME_STEPS}, {torch.get_num_threads()} threads"
    rows = [row("integer_linear", f"{name} FFN tokens/s", "", TOKENS / seconds, "absolute", shape)
            for name, seconds in times.items()]
    rows.append(row("integer_linear", "integer / fp32 tokens/s", "", times["fp32"] / times["integer"],
                    "fp32 consumers of the same levels"))
    rows.append(row("integer_linear", "integer / w8a8 tokens/s", "", times["w8a8"] / times["integer"],
                    "W8A8 ANN on the same int kernel"))
    rows.append(row("integer_linear", "integer vs fp32 relative output error", "", difference,
                    "weight rounding of the folded weights"))
    return rows


if __name__ == "__main__":
    from benchmarks.common import print_rows

    print_rows(run())

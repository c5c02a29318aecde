"""Which FFN activation quantiser buys quality, and at what spike count: a training-free trial on the teacher.

    python -m benchmarks.quantizer_trial HYBRID --teacher models/teacher --splits data/splits [--blocks 8] \
        [--variants static w8a8 input-only product-only digits-2 token-max token-clip]

The converted hybrid computes what the teacher computes with its FFN inputs quantised by the hybrid's own
static quantiser (``evaluation.quantized``'s W8Ab baseline, equal to the hybrid to float rounding). So a
quantiser's quality can be measured on the teacher alone, one model in memory, and its spike count read
off the integer levels it hands the consumer. Every variant keeps the teacher's 8-bit weights with each
input channel's step folded in (``hybrid.integer.fold_quantize``), as the integer hybrid has them, except
``w8a8`` (per-output-channel weights, the deployed ANN). Variants:

- ``static``: the hybrid's quantiser: the weighted code's levels at the converted thresholds and T;
- ``input-only`` / ``product-only``: only that site quantised, the other left analog: what each site costs;
- ``digits-K``: ``static``, then each level rounded to the nearest integer whose non-adjacent form has at
  most K nonzero digits (ties to the smaller): a spike budget per neuron and token, so at most K events;
- ``token-max``: a per-token scale computed in analog, ``s = max_c |x_c| / theta_c``; the token encoded as
  ``x / s`` (its largest channel at its threshold, the full range for every token) and the consumer's output
  multiplied by ``s`` (one multiply per output, as a dynamic INT8 kernel's dequantisation);
- ``token-clip``: the same with ``s = max(1, max_c |x_c| / theta_c)``: a token is rescaled only when a
  channel would clip;
- ``token-pow2``: ``token-max``'s scale rounded up to a power of two, so dividing by it and multiplying the
  output back are shifts (the token's largest channel lands in the top half of its threshold's range);
- ``w8a8``: per-token dynamic 8-bit activations (the standard deployment; no spikes);
- ``input=MODE,product=MODE``: each site its own mode: ``analog``, ``static``, ``digits-K``, ``token-max``,
  ``token-clip``, ``coarse-K`` (the weighted code at T - K steps and the same threshold: steps
  about 2^K times larger, fewer digits per value), or a token scaling then a grid (``token-max+coarse-2``); with
  ``,weights=float`` the teacher's float weights instead of the folded 8-bit ones, which separates what the
  weights cost from what the activations cost; ``,weights=pow2`` folds only the mantissa of each channel's
  step into the 8-bit weights and leaves its power of two to a shift of the channel's level.

For each domain of ``--splits``' test split and pooled over them it prints one JSON line per variant: ppl
over the teacher's, top-1 agreement and KL to the teacher, and the spiking variants' events per synapse
per token (each input's nonzero signed digits times its fan-out, over all FFN synapses), the figure the
energy model prices. Nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.evaluation.quality import QualityTotals, evaluate_quality
from snn_research.evaluation.quantized import quantize_per_token
from snn_research.hybrid.adapter import encoder_levels, signed_digit_count, weighted_levels
from snn_research.hybrid.integer import fold_quantize, quantize_weight
from snn_research.models.hybrid_transformer import SpikingGatedMLP, find_mlps, spiking_mlps
from snn_research.teacher import load_teacher

VARIANTS = ("static", "w8a8", "input-only", "product-only", "digits-1", "digits-2", "digits-3", "token-max",
            "token-clip")  # the default list; any input=MODE,product=MODE pair is taken too


@functools.cache
def digit_budget_table(time_steps: int, budget: int) -> torch.Tensor:
    """For every level 0 .. 2^T - 1: the nearest level with at most ``budget`` nonzero signed digits."""
    levels = torch.arange(2**time_steps, dtype=torch.float32)
    allowed = levels[signed_digit_count(levels, time_steps) <= budget]
    distance = (levels[:, None] - allowed[None, :]).abs()
    return allowed[distance.argmin(1)]  # argmin takes the first of equals: the smaller level


class State:
    """The variant every TrialMLP runs next, and the events it counted."""

    def __init__(self) -> None:
        self.variant = "static"
        # per variant, over layers and tokens: the sum of events per synapse (digits x fan-out / synapses),
        # and the number of (layer, token) pairs it covers
        self.events: dict[str, float] = {}
        self.tokens: dict[str, int] = {}


PRESETS = {  # name -> (input site's mode, product site's mode)
    "static": ("static", "static"), "input-only": ("static", "analog"), "product-only": ("analog", "static"),
    **{f"digits-{k}": (f"digits-{k}", f"digits-{k}") for k in (1, 2, 3)},
    "token-max": ("token-max", "token-max"), "token-clip": ("token-clip", "token-clip"),
}


@functools.cache  # pure on the name, and asked at every site of every layer's forward
def site_modes(variant: str) -> tuple[str, str]:
    """(input mode, product mode) of a preset name or of ``input=MODE,product=MODE[,weights=float]``."""
    if variant in PRESETS:
        return PRESETS[variant]
    try:
        parts = dict(part.split("=", 1) for part in variant.split(","))
        modes = parts.pop("input"), parts.pop("product")
    except (KeyError, ValueError):
        raise ValueError(f"variant {variant!r}: a preset ({', '.join(PRESETS)}, w8a8) or "
                         "input=MODE,product=MODE[,weights=float]")
    if parts.pop("weights", "folded") not in ("folded", "float", "pow2"):
        raise ValueError(f"variant {variant!r}: weights is 'folded' (8-bit, the default), 'float' or 'pow2'")
    if parts:
        raise ValueError(f"variant {variant!r}: unknown sites {sorted(parts)}")
    for mode in modes:
        if mode != "analog":
            quantize(torch.zeros(1, 1), torch.ones(1), 5, mode)  # refuses an unknown mode now, not mid-run
    return modes


@functools.cache
def weight_kind(variant: str) -> str:
    """``folded`` (the int8 hybrid's), ``float`` (the teacher's) or ``pow2`` (only each threshold's mantissa
    folded, its power of two left to a shift of the level)."""
    for part in variant.split(","):
        if part.startswith("weights="):
            return part.removeprefix("weights=")
    return "folded"


def quantize(x: torch.Tensor, threshold: torch.Tensor, time_steps: int,
             mode: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(decoded value, integer levels, the steps that spell them) of ``x`` under a spiking ``mode``:
    ``static``, ``digits-K``, ``coarse-K`` (the weighted code at T - K steps and the same threshold: steps
    about 2^K times larger), ``token-max``, ``token-clip`` (see the module docstring), or a token scaling then a grid,
    ``token-max+coarse-K``."""
    levels_max = encoder_levels("weighted", time_steps)
    scale = None
    scaling, _, grid = mode.partition("+") if mode.startswith("token-") else ("", "", mode)
    grid = grid or "static"
    if scaling:
        if scaling not in ("token-max", "token-clip", "token-pow2"):
            raise ValueError(f"unknown quantiser mode {mode!r}")
        ratio = (x.abs() / threshold).amax(-1, keepdim=True).clamp_min(1e-12)
        scale = {"token-max": ratio, "token-clip": ratio.clamp_min(1.0),
                 "token-pow2": torch.exp2(torch.log2(ratio).ceil())}[scaling]
        x = x / scale
    if grid != "static" and not grid.startswith(("digits-", "coarse-")):
        raise ValueError(f"unknown quantiser mode {mode!r}")
    if grid.startswith("coarse-"):  # the weighted code at T - K steps, the same threshold
        time_steps -= int(grid.split("-")[1])
        levels_max = encoder_levels("weighted", time_steps)
    levels = weighted_levels(x, threshold, time_steps)
    if grid.startswith("digits-"):
        table = digit_budget_table(time_steps, int(grid.split("-")[1]))
        levels = table[levels.abs().long()].to(levels.dtype).copysign(levels)
    value = levels * threshold / levels_max
    return (value if scale is None else value * scale), levels, time_steps


class TrialMLP(nn.Module):
    """A gated FFN whose inputs are quantised as ``state.variant`` says, with 8-bit weights."""

    def __init__(self, mlp: nn.Module, unit: SpikingGatedMLP, state: State) -> None:
        super().__init__()
        self.act_fn, self.state = mlp.act_fn, state
        self.thresholds = {"input": unit.input_encoder.threshold.detach().float(),
                           "product": unit.product_encoder.threshold.detach().float()}
        self.time_steps = unit.input_encoder.time_steps
        if unit.product_encoder.time_steps != self.time_steps:
            raise ValueError(f"{unit.path}: the trial takes one T for both sites")
        site = {"gate_proj": "input", "up_proj": "input", "down_proj": "product"}
        step = {name: self.thresholds[site[name]] / encoder_levels("weighted", self.time_steps) for name in site}
        weights = {name: getattr(mlp, name).weight.detach().float() for name in site}
        self.folded = {name: fold_quantize(weights[name], step[name], 8).detach() for name in site}
        self.w8 = {name: quantize_weight(weights[name], 8).dequantized() for name in site}
        self.float = weights
        # each channel's threshold split as mantissa x 2^k: only the mantissa (in [1, 2)) folded into the weight,
        # the 2^k left to a shift of the channel's level, so no channel's threshold widens its row's scale
        mantissa = {name: step[name] / torch.exp2(torch.floor(torch.log2(step[name]))) for name in site}
        self.pow2 = {name: fold_quantize(weights[name], mantissa[name], 8).detach() for name in site}
        self.fan_out = {"input": 2 * weights["gate_proj"].shape[0], "product": weights["down_proj"].shape[0]}
        self.synapses = sum(w.numel() for w in weights.values())

    def _site(self, x: torch.Tensor, site: str) -> torch.Tensor:
        variant = self.state.variant
        if variant == "w8a8":
            return quantize_per_token(x, 8)
        mode = site_modes(variant)[0 if site == "input" else 1]
        if mode == "analog":
            return x
        value, levels, steps = quantize(x.float(), self.thresholds[site], self.time_steps, mode)
        digits = signed_digit_count(levels, steps).sum()
        self.state.events[variant] = self.state.events.get(variant, 0.0) + float(digits) * self.fan_out[site] / self.synapses
        return value.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variant = self.state.variant
        weights = self.w8 if variant == "w8a8" else getattr(self, weight_kind(variant))
        if variant != "w8a8":
            self.state.tokens[variant] = self.state.tokens.get(variant, 0) + x.shape[0] * x.shape[1]
        xq = self._site(x, "input")
        product = self.act_fn(F.linear(xq, weights["gate_proj"])) * F.linear(xq, weights["up_proj"])
        return F.linear(self._site(product, "product"), weights["down_proj"])


class Variant(nn.Module):
    """The shared quantised teacher, run as one variant (so every variant holds one copy of the weights)."""

    def __init__(self, model: nn.Module, state: State, variant: str) -> None:
        super().__init__()
        self.model, self.state, self.variant = model, state, variant

    def forward(self, **kwargs):
        self.state.variant = self.variant
        return self.model(**kwargs)


def quantized_teacher(teacher: nn.Module, hybrid: nn.Module) -> tuple[nn.Module, State]:
    """A copy of ``teacher`` with every FFN a TrialMLP at ``hybrid``'s thresholds and T, and their shared state."""
    import copy

    quantized = copy.deepcopy(teacher)
    units = {unit.path: unit for unit in spiking_mlps(hybrid)}
    state = State()
    for location in find_mlps(quantized):
        unit = units.get(location.path)
        if not isinstance(unit, SpikingGatedMLP):
            raise ValueError(f"{location.path}: the trial takes a hybrid whose every FFN is a spiking gated FFN")
        parent_path, _, name = location.path.rpartition(".")
        setattr(quantized.get_submodule(parent_path), name, TrialMLP(location.module, unit, state))
    return quantized.eval(), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--splits", required=True, help="a split folder: each domain's test blocks")
    parser.add_argument("--blocks", type=int, default=8, help="test blocks per domain")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    for variant in args.variants:
        if variant != "w8a8":
            try:
                site_modes(variant)
            except ValueError as error:
                parser.error(str(error))
    from snn_research.artifacts import verify_folder
    from snn_research.data import load_blocks, spread

    teacher, _ = load_teacher(args.teacher)
    try:
        quantized, state = quantized_teacher(teacher.eval(), load_hybrid(args.hybrid))
    except ValueError as error:
        parser.error(str(error))
    summary = verify_folder(Path(args.splits), "split")[0].summary
    test = load_blocks(Path(args.splits), "test")
    pooled: dict[str, QualityTotals] = {}
    variants = {variant: Variant(quantized, state, variant) for variant in args.variants}  # one copy of the weights
    for index, (domain, entry) in enumerate((summary.get("domains") or {"corpus": {}}).items()):
        blocks = spread(test.of_domain(index), args.blocks)
        totals, events = score(teacher, variants, state, blocks.input_ids, blocks.target_bytes, args.batch_size)
        seen = "" if float(entry.get("weight", 1)) > 0 else " (unseen)"
        _print(f"{domain}{seen}", totals, events)
        for name, value in totals.items():
            pooled[name] = pooled.get(name, QualityTotals()) + value
    _print("pooled", pooled, {v: state.events.get(v, 0.0) / state.tokens[v] for v in state.tokens})


def score(teacher: nn.Module, variants: dict[str, Variant], state: State, input_ids: torch.Tensor,
          target_bytes: torch.Tensor, batch_size: int) -> tuple[dict[str, QualityTotals], dict[str, float]]:
    """Every variant's quality totals on these blocks, and its events per synapse per token on them (0 for a
    variant whose sites are all analog: it spikes nowhere; none for ``w8a8``)."""
    before = dict(state.events), dict(state.tokens)
    with torch.no_grad():
        totals = evaluate_quality(teacher, variants, input_ids, target_bytes, batch_size)
    events = {v: (state.events.get(v, 0.0) - before[0].get(v, 0.0)) / (state.tokens[v] - before[1].get(v, 0))
              for v in state.tokens if v in variants}
    return totals, events


def _print(domain: str, totals: dict[str, QualityTotals], events: dict[str, float | None]) -> None:
    teacher_nll = totals["teacher"].nll / totals["teacher"].tokens
    for name, entry in totals.items():
        if name == "teacher":
            continue
        print(json.dumps({
            "domain": domain, "variant": name, "tokens": entry.tokens,
            "teacher_ppl": round(math.exp(teacher_nll), 3),
            "ppl_ratio": round(math.exp(entry.nll / entry.tokens - teacher_nll), 4),
            "agreement_top1": round(entry.agree / entry.tokens, 4),
            "kl_full_to_teacher": round(entry.kl / entry.tokens, 4),
            "events_per_synapse": None if events.get(name) is None else round(events[name], 4),
        }), flush=True)


if __name__ == "__main__":
    main()

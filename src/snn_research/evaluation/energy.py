"""Per-token energy estimate of a hybrid model and of its teacher, from a real forward pass.

Counting rules (per token; energies are params, defaults 45 nm FP32 from
Horowitz, ISSCC 2014: a multiply-accumulate E_MAC = 4.6 pJ, an add E_AC = 0.9 pJ):

- Analog linear maps (attention projections, the LM head, FFN linears that are
  not spiking): in_features x out_features MACs, counted by hooks on the
  ``nn.Linear`` / ``Conv1D`` modules that actually ran; their bias adds are ACs.
- Attention: per layer, ``heads x head_dim x keys`` MACs for the scores and the
  same for the values, plus ``heads x keys`` MACs for the softmax, where
  ``keys`` is the mean number of positions a query attends to at the evaluated
  sequence length (causal; capped by the sliding window on sliding layers).
- Norms: 2 MACs per normalised element (RMSNorm: square-sum, scale) and 3 for
  LayerNorm (mean, variance, scale-and-shift), counted by hooks.
- FFN analog parts: 1 MAC per activation-function output and 1 per gating
  multiply (act(gate) * up).
- Spiking sites: each spike costs one AC per synapse it reaches (its consuming
  linear's fan-out: 2 x intermediate for the gated input site, hidden for the
  product site, intermediate / hidden for GPT-2's input / hidden sites; the
  summed output widths of q, k and v for the qkv site, hidden for the o site,
  the vocabulary for the head site: ``families.site_fan_out``). Every
  neuron also does one AC per time step to integrate its input (plus one MAC
  for the leak of a LIF neuron with beta < 1), and a bias, where a spiking
  linear has one, is injected as one AC per output per step. The decoders'
  1/L rescale is one MAC per decoded output (the threshold is folded into the
  synaptic weights).
- Weighted (binary, 2^-t) encoders: a spike is still one AC per synapse; the
  step weight is applied by the receiving neurons, which shift their
  accumulator once per step (Horner's scheme): one AC per consuming output
  neuron per step (fan-out x T).

The teacher's figures come from the same pass: the spiking blocks' linears are
counted as the dense MACs the teacher would do on that token.

Memory traffic is counted as weight bytes read per token: every weight matrix
of a linear that ran, once per token, plus one embedding row per token.
Biases are left out (a few thousand values against millions of weights).
``baselines.py`` prices these counts against INT8 and low-bit ANNs and with
the weight reads included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from snn_research.models.families import FAMILIES, consumers, linear_shape, site_channels, site_fan_out
from snn_research.models.hybrid_transformer import (
    SpikeRecorder,
    SpikingGPT2MLP,
    SpikingMLP,
    SpikingSite,
    SpikingUnit,
    find_mlps,
    mlp_family,
    site_key,
    spiking_units,
    unit_sites,
)

# Components of the spiking units (FFNs: 'ffn_*', sites outside the FFN: 'proj_*'); every other
# component is shared by hybrid and teacher.
_UNIT_PARTS = ("synaptic", "neurons", "step_weights", "spiking_analog", "dense")
SPIKING_COMPONENTS = frozenset(f"{prefix}_{part}" for prefix in ("ffn", "proj") for part in _UNIT_PARTS)


@dataclass
class SiteEnergy:
    key: str
    spike_rate: float  # spikes per neuron per time step
    spikes_per_token: float
    fan_out: int
    synaptic_ops_per_token: float
    energy_pj: float
    neurons: int = 0  # spiking neurons at the site, per token
    time_steps: int = 1
    activation_bits: int = 0  # bits of a quantised activation with as many levels as the site's spike count
    layer: int | None = None  # its decoder block (None: the LM head's site)
    ffn: bool = True  # an FFN site, or one outside the FFN
    # batch size b -> mean fraction of the site's neurons that spiked for any of b tokens (``read_batches``)
    active_fraction: dict[int, float] = field(default_factory=dict)


@dataclass
class BlockEnergy:
    """Per-token figures of one spiking unit (an FFN, or a site outside it) that the baselines re-price."""

    path: str
    costs: "BlockCosts"
    spikes_per_token: dict[str, float]
    weight_bytes: float  # bytes of the spiking linears' weight matrices

    @property
    def ffn(self) -> bool:
        return self.costs.ffn


@dataclass
class EnergyReport:
    tokens: int
    sequence_length: int
    e_mac_pj: float
    e_ac_pj: float
    sites: list[SiteEnergy] = field(default_factory=list)
    blocks: list[BlockEnergy] = field(default_factory=list)
    # per token: component -> (MACs, ACs)
    hybrid_ops: dict[str, tuple[float, float]] = field(default_factory=dict)
    teacher_ops: dict[str, tuple[float, float]] = field(default_factory=dict)
    # per token: component -> weight bytes read, for the parts hybrid and teacher share
    shared_weight_bytes: dict[str, float] = field(default_factory=dict)

    def _energy(self, ops: dict[str, tuple[float, float]], ffn_only: bool) -> float:
        return sum(
            macs * self.e_mac_pj + acs * self.e_ac_pj
            for name, (macs, acs) in ops.items()
            if not ffn_only or name.startswith("ffn")
        )

    @property
    def hybrid_energy_pj(self) -> float:
        return self._energy(self.hybrid_ops, ffn_only=False)

    @property
    def teacher_energy_pj(self) -> float:
        return self._energy(self.teacher_ops, ffn_only=False)

    @property
    def hybrid_ffn_energy_pj(self) -> float:
        return self._energy(self.hybrid_ops, ffn_only=True)

    @property
    def teacher_ffn_energy_pj(self) -> float:
        return self._energy(self.teacher_ops, ffn_only=True)

    @property
    def ffn_energy_ratio(self) -> float:
        return self.hybrid_ffn_energy_pj / self.teacher_ffn_energy_pj

    @property
    def model_energy_ratio(self) -> float:
        return self.hybrid_energy_pj / self.teacher_energy_pj

    @property
    def mean_spike_rate(self) -> float:
        """Spikes per neuron per time step over all sites (0 for a model without sites)."""
        steps = sum(s.spikes_per_token / s.spike_rate for s in self.sites if s.spike_rate > 0)
        spikes = sum(s.spikes_per_token for s in self.sites)
        return spikes / steps if steps else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "hybrid_energy_pj": self.hybrid_energy_pj,
            "teacher_energy_pj": self.teacher_energy_pj,
            "hybrid_ffn_energy_pj": self.hybrid_ffn_energy_pj,
            "teacher_ffn_energy_pj": self.teacher_ffn_energy_pj,
            "ffn_energy_ratio": self.ffn_energy_ratio,
            "model_energy_ratio": self.model_energy_ratio,
            "spike_rate": self.mean_spike_rate,
        }


def _mean_keys(sequence_length: int, window: int | None) -> float:
    """Mean number of keys a causal query attends to over positions 1..L."""
    positions = torch.arange(1, sequence_length + 1, dtype=torch.float64)
    if window is not None:
        positions = positions.clamp(max=window)
    return float(positions.mean())


def attention_ops(config, sequence_length: int, position: int | None = None) -> tuple[float, float]:
    """(MACs, ACs) per token of scores, softmax and values over all layers.

    Averaged over the positions of a causal sequence of ``sequence_length``, or, with
    ``position`` (0-based), for the one query at that position (a decoding step).
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    macs = 0.0
    for layer_type in layer_types:
        layer_window = window if layer_type == "sliding_attention" and window else None
        if position is None:
            keys = _mean_keys(sequence_length, layer_window)
        else:
            keys = float(position + 1 if layer_window is None else min(position + 1, layer_window))
        macs += 2 * heads * head_dim * keys + heads * keys
    return macs, 0.0


def norm_cost(module: nn.Module) -> int | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return 3
    if name.endswith("RMSNorm"):
        return 2
    return None


def measure_energy(
    model: nn.Module, input_ids: torch.Tensor, e_mac_pj: float = 4.6, e_ac_pj: float = 0.9,
    read_batches: tuple[int, ...] = (),
) -> EnergyReport:
    """Run ``model`` on ``input_ids`` (B, L) and account every operation per token.

    With ``read_batches``, each site also records, per batch size b (dividing B), the fraction of its
    neurons that spiked for any of b tokens at one position (``SiteEnergy.active_fraction``): the weight
    columns an event-driven design reads for that batch.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor (got shape {tuple(input_ids.shape)})")
    tokens = input_ids.numel()
    units = list(spiking_units(model))
    spiking = {m.path: m for m in units if isinstance(m, SpikingMLP)}
    fed_by_spikes = spike_fed_linears(units)
    mlp_paths = [loc.path for loc in find_mlps(model)]
    hybrid: dict[str, list[float]] = {}
    teacher: dict[str, list[float]] = {}
    weight_bytes: dict[str, float] = {}

    def add(ops: dict[str, list[float]], component: str, macs: float = 0.0, acs: float = 0.0) -> None:
        entry = ops.setdefault(component, [0.0, 0.0])
        entry[0] += macs
        entry[1] += acs

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            in_features, out_features = (
                (module.in_features, module.out_features) if isinstance(module, nn.Linear) else module.weight.shape
            )
            mlp_path = next((p for p in mlp_paths if name.startswith(p + ".")), None)
            has_bias = module.bias is not None
            if mlp_path in spiking or name in fed_by_spikes:
                continue  # accounted from spike counts below
            component = "lm_head" if name == "lm_head" else ("ffn_analog" if mlp_path else "attention_projections")

            def hook(_m, args, _out, component=component, fan=in_features * out_features, out=out_features,
                     bias=has_bias, size=module.weight.element_size()):
                rows = args[0].numel() // args[0].shape[-1]
                for ops in (hybrid, teacher):
                    add(ops, component, macs=rows * fan, acs=rows * out if bias else 0.0)
                weight_bytes[component] = weight_bytes.get(component, 0.0) + rows * fan * size

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Embedding):

            def embedding_hook(_m, _args, out):  # one row read per looked-up token
                weight_bytes["embeddings"] = weight_bytes.get("embeddings", 0.0) + out.numel() * out.element_size()

            handles.append(module.register_forward_hook(embedding_hook))
        elif (cost := norm_cost(module)) is not None:

            def norm_hook(_m, _args, out, cost=cost):
                for ops in (hybrid, teacher):
                    add(ops, "norms", macs=cost * out.numel())

            handles.append(module.register_forward_hook(norm_hook))

    try:
        with torch.no_grad(), SpikeRecorder(model, read_batches) as recorder:
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    report = EnergyReport(tokens=tokens, sequence_length=input_ids.shape[1], e_mac_pj=e_mac_pj, e_ac_pj=e_ac_pj)
    for path in mlp_paths:
        if path not in spiking:
            mlp = model.get_submodule(path)
            for ops in (hybrid, teacher):  # activation (and gating multiply)
                add(ops, "ffn_analog", macs=ffn_elementwise_macs(mlp) * tokens)
    for unit in units:
        _account_spiking_block(unit, tokens, recorder, report, hybrid, teacher, add)

    macs, acs = attention_ops(model.config, input_ids.shape[1])
    for ops in (hybrid, teacher):
        add(ops, "attention_scores_values", macs=macs * tokens, acs=acs * tokens)
    report.hybrid_ops = {k: (v[0] / tokens, v[1] / tokens) for k, v in hybrid.items()}
    report.teacher_ops = {k: (v[0] / tokens, v[1] / tokens) for k, v in teacher.items()}
    report.shared_weight_bytes = {k: v / tokens for k, v in weight_bytes.items()}
    return report


def ffn_elementwise_macs(mlp: nn.Module) -> int:
    """Per token, the FFN's analog element-wise MACs: its activation (and gating multiply) per intermediate channel."""
    family = FAMILIES[mlp_family(mlp) if not isinstance(mlp, SpikingMLP) else mlp.family]
    intermediate = site_channels(family.scope_sites("mlp")[1], mlp)  # the site after the nonlinearity
    return family.ffn_elementwise * intermediate


def spike_fed_linears(units) -> set[str]:
    """Module paths of the analog-placed linears that read a site's spikes (their MACs become synaptic events)."""
    return {f"{unit.path}.{name}" if name else unit.path
            for unit in units if isinstance(unit, SpikingSite) for name in unit.spec.consumers}


def activation_bits(levels: int, signed: bool = True) -> int:
    """Bits of a quantised activation with as many values as a spike count in [-L, L] (or [0, L])."""
    values = 2 * levels + 1 if signed else levels + 1
    return max(1, math.ceil(math.log2(values)))


def encoder_levels(encoder: nn.Module) -> int:
    """L, the largest spike level of one sign: 2^T - 1 for a weighted code, T otherwise."""
    levels = getattr(encoder, "levels", None)
    return int(levels) if levels is not None else int(encoder.time_steps)


@dataclass(frozen=True)
class BlockCosts:
    """Per-token operation counts of one spiking FFN and of the dense FFN it replaced.

    Everything except the synaptic events is fixed by the shapes and T; the
    synaptic events are spikes x ``fan_outs[site]``. The dense FFN's linear maps
    read exactly the sites' activations: their MACs are neurons x fan-out per site.
    """

    fan_outs: dict[str, int]
    neurons: dict[str, int]
    teacher_macs: float
    teacher_acs: float
    hybrid_analog_macs: float  # activation, gating multiply, decoder rescales
    hybrid_analog_acs: float  # bias adds after the decoders
    neuron_macs: float  # LIF leak multiplies
    neuron_acs: float  # membrane integrations (and per-step bias currents)
    time_steps: int = 1
    step_weight_acs: float = 0.0  # accumulator shifts of the neurons receiving weighted spikes
    bits: dict[str, int] = field(default_factory=dict)  # activation bits matching each site's spike levels
    ffn: bool = True  # an FFN (its energy is part of the FFN ratio), or a site outside it
    weight_bits: int | None = None  # integer weights in the spiking linears (convert.weight_bits), else float
    elementwise_macs: float = 0.0  # the FFN's analog activation and gating multiplies (both models do them)
    bias_adds: float = 0.0  # bias adds of the spiking linears' outputs (both models do them)

    @property
    def teacher_linear_macs(self) -> float:
        return float(sum(self.neurons[site] * fan_out for site, fan_out in self.fan_outs.items()))

    def teacher_pj(self, e_mac_pj: float, e_ac_pj: float) -> float:
        return self.teacher_macs * e_mac_pj + self.teacher_acs * e_ac_pj

    def fixed_hybrid_pj(self, e_mac_pj: float, e_ac_pj: float) -> float:
        return ((self.hybrid_analog_macs + self.neuron_macs) * e_mac_pj
                + (self.hybrid_analog_acs + self.neuron_acs + self.step_weight_acs) * e_ac_pj)


def _leaky(population: nn.Module | None) -> bool:
    return (population is not None and getattr(population, "kind", None) == "lif"
            and bool((population.beta < 1).any()))


def _encoder_terms(encoders: dict[str, nn.Module], fan_outs: dict[str, int], time_steps: int) -> tuple[float, float, dict]:
    """(leak MACs, accumulator-shift ACs, bits) of a block's encoder sites, per token."""
    leak_macs, shift_acs, bits = 0.0, 0.0, {}
    for site, encoder in encoders.items():
        bits[site] = activation_bits(encoder_levels(encoder))
        if _leaky(getattr(encoder, "neurons", None)):  # a LIF encoder leaks every step
            leak_macs += encoder.channels * time_steps
        if getattr(encoder, "kind", None) == "weighted":  # Horner: one shift per receiving neuron per step
            shift_acs += fan_outs[site] * time_steps
    return leak_macs, shift_acs, bits


def _bias_adds(linears) -> int:
    return sum(linear_shape(m)[1] for m in linears if m.bias is not None)


def block_costs(block: SpikingUnit) -> BlockCosts:
    """Per-token counts of a spiking unit, from its family's site description (``models/families.py``)."""
    time_steps = block.plan_time_steps
    specs = unit_sites(block)
    neurons = {spec.name: site_channels(spec, block.scope_module if isinstance(block, SpikingSite) else block)
               for spec in specs}
    fan_outs = {spec.name: site_fan_out(spec, block.scope_module if isinstance(block, SpikingSite) else block)
                for spec in specs}
    dense = float(sum(neurons[s] * fan_outs[s] for s in neurons))
    encoders = {spec.name: getattr(block, f"{spec.name}_encoder") for spec in specs if spec.role == "encoder"}
    leak_macs, shift_acs, bits = _encoder_terms(encoders, fan_outs, time_steps)
    if isinstance(block, SpikingSite):  # encoder -> consumers -> decoder rescale (+ bias) of every consumer output
        bias_adds = _bias_adds(block.consumers)
        return BlockCosts(
            fan_outs=fan_outs, neurons=neurons, teacher_macs=dense, teacher_acs=bias_adds,
            hybrid_analog_macs=sum(fan_outs.values()), hybrid_analog_acs=bias_adds,
            neuron_macs=leak_macs, neuron_acs=sum(neurons.values()) * time_steps,
            time_steps=time_steps, step_weight_acs=shift_acs, bits=bits, ffn=False,
        )
    elementwise = ffn_elementwise_macs(block)
    linears = [m for spec in specs for m in consumers(spec, block)]
    bias_adds = _bias_adds(linears)
    if isinstance(block, SpikingGPT2MLP):
        first, second = (spec.name for spec in specs)
        hidden, intermediate = neurons[first], neurons[second]
        # the hidden neurons fire at most once per step and never negatively: counts in [0, T]
        bits[second] = activation_bits(time_steps, signed=False)
        if _leaky(block.hidden_neurons):
            leak_macs += intermediate * time_steps
        return BlockCosts(
            fan_outs=fan_outs,
            neurons=neurons,
            teacher_macs=dense + elementwise,  # dense maps + GELU
            teacher_acs=bias_adds,
            hybrid_analog_macs=hidden,  # decoder rescale of c_proj's output
            hybrid_analog_acs=hidden if block.c_proj.bias is not None else 0,
            neuron_macs=leak_macs,
            # membrane integrations, plus c_fc's bias injected as a constant current every step
            neuron_acs=sum(neurons.values()) * time_steps + intermediate * time_steps,
            time_steps=time_steps,
            step_weight_acs=shift_acs,
            bits=bits,
        )
    # gated: the decoders rescale every consumer output; activation and gating multiply stay analog
    return BlockCosts(
        fan_outs=fan_outs,
        neurons=neurons,
        teacher_macs=dense + elementwise,
        teacher_acs=bias_adds,
        hybrid_analog_macs=elementwise + sum(fan_outs.values()),
        hybrid_analog_acs=bias_adds,
        neuron_macs=leak_macs,
        neuron_acs=sum(neurons.values()) * time_steps,
        time_steps=time_steps,
        step_weight_acs=shift_acs,
        bits=bits,
        weight_bits=getattr(block, "weight_bits", None),
        elementwise_macs=elementwise,
        bias_adds=bias_adds,
    )


def _spiking_weight_bytes(block: SpikingUnit) -> float:
    if isinstance(block, SpikingSite):
        linears = block.consumers
    else:
        linears = [m for m in block.children() if isinstance(m, (nn.Linear, Conv1D))]
    return float(sum(m.weight.numel() * m.weight.element_size() for m in linears))


def _account_spiking_block(block: SpikingUnit, tokens: int, recorder: SpikeRecorder, report, hybrid, teacher, add) -> None:
    costs = block_costs(block)
    prefix = "ffn" if costs.ffn else "proj"
    add(teacher, f"{prefix}_dense", macs=costs.teacher_macs * tokens, acs=costs.teacher_acs * tokens)
    synaptic = 0.0
    spikes: dict[str, float] = {}
    for site, fan_out in costs.fan_outs.items():
        key = site_key(block.path, site)
        if key not in recorder.spikes:
            raise ValueError(f"site {key} recorded no spikes during the energy pass")
        spikes[site] = spikes_per_token = recorder.spikes[key] / recorder.tokens[key]
        sops = spikes_per_token * fan_out
        synaptic += sops
        report.sites.append(
            SiteEnergy(
                key=key,
                spike_rate=recorder.spike_rate(key),
                spikes_per_token=spikes_per_token,
                fan_out=fan_out,
                synaptic_ops_per_token=sops,
                energy_pj=sops * report.e_ac_pj,
                neurons=costs.neurons[site],
                time_steps=costs.time_steps,
                activation_bits=costs.bits[site],
                layer=block.layer,
                ffn=costs.ffn,
                active_fraction=recorder.active_fraction(key),
            )
        )
    report.blocks.append(BlockEnergy(block.path, costs, spikes, _spiking_weight_bytes(block)))
    add(hybrid, f"{prefix}_synaptic", acs=synaptic * tokens)
    add(hybrid, f"{prefix}_neurons", macs=costs.neuron_macs * tokens, acs=costs.neuron_acs * tokens)
    if costs.step_weight_acs:
        add(hybrid, f"{prefix}_step_weights", acs=costs.step_weight_acs * tokens)
    add(hybrid, f"{prefix}_spiking_analog", macs=costs.hybrid_analog_macs * tokens, acs=costs.hybrid_analog_acs * tokens)

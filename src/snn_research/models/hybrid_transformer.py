"""Spiking FFN blocks for Hugging Face causal LMs, and ``hybridize``.

Attention, softmax, norms, embeddings and the LM head stay analog; the MLP of
each chosen decoder block is replaced in place by a spiking block that holds the
teacher's own linear layers (weights copied, never rescaled: each spike carries
its site's threshold, which is the per-layer or per-channel scale factor a
neuromorphic deployment folds into the synaptic weights).

Non-gated (GPT-2)::

    x -> encoder -> c_fc on spikes (per step) -> IF/LIF neurons instead of GELU
      -> c_proj on spikes -> decoder (time average * threshold)

Gated (Llama/Mistral/Qwen2 SwiGLU, Gemma/Gemma 2/Gemma 3 GeGLU)::

    x -> encoder -> gate_proj, up_proj on spikes -> decoder
      -> act(gate) * up (analog) -> encoder -> down_proj on spikes -> decoder

What runs, per family and encoder:

- gated, ``if`` / ``weighted``: each encoder is its closed form (a clipped
  rounding to 2T+1 or 2^(T+1)-1 levels, see ``hybrid/adapter.py``), trained
  with a straight-through / learned-step-size gradient; no neuron is simulated.
- gated, ``rate``: T Bernoulli draws per neuron, straight-through gradient.
- gated, ``lif``: a signed LIF population per site, simulated over T steps
  (compiled kernel) and trained by surrogate back-propagation through time.
- GPT-2: the input encoder (``if`` or ``rate``) feeds c_fc per step, and an
  IF or LIF population replacing GELU is simulated and trained by surrogate BPTT.

A linear map whose output is only decoded (a weighted time sum) commutes with
the decoder, so it runs once on the decoded levels instead of T times on the
train (exact up to float summation order; ``forward_per_step`` keeps the T-step
path to test that). The per-step path is kept where it is needed: c_fc feeds
neurons whose response depends on the order of the currents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from snn_research.hybrid.adapter import (
    MAX_WEIGHTED_TIME_STEPS,
    AnalogToSpikes,
    Digits,
    EncoderKind,
    MembraneInit,
    SpikesToAnalog,
)
from snn_research.hybrid.integer import CachedIntegerWeight, IntegerWeight, fold_quantize, integer_linear
from snn_research.hybrid.neurons import MultiStepNeuron, NeuronKind, ResetMode
from snn_research.hybrid.surrogate import SurrogateName
from snn_research.models.families import (
    FAMILIES,
    SiteGroup,
    SiteSpec,
    consumers,
    family_for_mlp,
    family_for_model,
    site_channels,
)

Granularity = Literal["channel", "layer"]

# Settings of LIF populations (the GPT-2 hidden neurons, the 'lif' encoder) when left unset.
NEURON_DEFAULTS: dict[str, object] = {
    "beta": 0.9, "reset": "subtract", "surrogate": "atan", "sharpness": 2.0, "learnable_leak": False,
}


class HybridPlan(BaseModel):
    """Which FFNs become spiking, and how.

    Fields that only some families or encoders use default to null; ``family_conflicts``
    names those set for a family or encoder that ignores them (``convert`` refuses them).
    """

    model_config = ConfigDict(extra="forbid")

    sites: list[SiteGroup] = Field(
        ["ffn"], description="what spikes: ffn (the FFN's sites), qkv (the attention projections' shared input), "
        "o (the attention output projection's input), head (the LM head's input); per layer for all but head"
    )
    layers: list[int] | None = Field(None, description="decoder blocks whose chosen sites spike; null: every block")
    time_steps: int = Field(8, ge=1, le=4096, description="simulation steps T per token")
    encoder: EncoderKind = Field(
        "if", description="'if': deterministic signed IF (closed form, 2T+1 levels); 'weighted': binary-weighted "
        "spikes (closed form, 2^(T+1)-1 levels); 'rate': seeded Bernoulli; 'lif': simulated signed LIF (surrogate BPTT)"
    )
    membrane_init: MembraneInit | None = Field(
        None, description="'if' encoder start: zero | half | symmetric (null: symmetric)"
    )
    digits: Digits | None = Field(
        None, description="'weighted' encoder only: how the T steps spell a level; binary: its set bits; signed: "
        "digits in {-1, 0, +1} (non-adjacent form where T allows), the same level with fewer spikes (null: binary)"
    )
    granularity: Granularity = Field("channel", description="one threshold per channel or per layer")
    neuron: NeuronKind | None = Field(
        None, description="GPT-2 only: neurons replacing GELU, if | lif (null: if); gated FFNs keep act(gate) * up analog"
    )
    beta: float | None = Field(None, gt=0.0, le=1.0, description="LIF leak per step (LIF populations only; null: 0.9)")
    reset: ResetMode | None = Field(None, description="LIF/IF population reset: subtract | zero (null: subtract)")
    surrogate: SurrogateName | None = Field(None, description="surrogate derivative of a simulated spike (null: atan)")
    sharpness: float | None = Field(None, gt=0.0, description="surrogate steepness (null: 2.0)")
    learnable_threshold: bool = Field(True, description="train thresholds (straight-through or surrogate gradient)")
    learnable_leak: bool | None = Field(None, description="train the LIF leak (LIF populations only; null: false)")
    seed: int | None = Field(None, ge=0, description="'rate' encoder only: seed of its noise (each site draws its "
                             "own stream; null: 0)")
    weight_bits: Literal[8, 4] | None = Field(None, description="integer weights in the spiking FFNs' linears: each "
                                              "input channel's step (threshold / L) folded in, then symmetric "
                                              "integers with one scale per output channel (null: float weights)")
    weight_group: int | None = Field(None, ge=8, description="weight_bits only: one scale per output channel and "
                                     "group of this many inputs (null: per output channel)")

    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, value: list[str]) -> list[str]:
        if len(value) == 0:
            raise ValueError("must name at least one site group")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a site group twice: {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if len(value) == 0:
                raise ValueError("must name at least one layer, or be null for all layers")
            if len(set(value)) != len(value):
                raise ValueError(f"lists a layer twice: {value}")
            if min(value) < 0:
                raise ValueError(f"layer indices must be >= 0 (got {value})")
        return value

    @model_validator(mode="after")
    def _leak_needs_lif(self) -> "HybridPlan":
        if self.learnable_leak and self.neuron != "lif" and self.encoder != "lif":
            raise ValueError(
                f"learnable_leak needs LIF neurons: neuron 'lif' (GPT-2) or encoder 'lif' "
                f"(got neuron {self.neuron!r}, encoder {self.encoder!r})"
            )
        if self.membrane_init is not None and self.encoder != "if":
            raise ValueError(f"membrane_init applies to the 'if' encoder only (got encoder {self.encoder!r})")
        if self.digits is not None and self.encoder != "weighted":
            raise ValueError(f"digits applies to the 'weighted' encoder only (got encoder {self.encoder!r})")
        if self.encoder == "weighted" and self.time_steps > MAX_WEIGHTED_TIME_STEPS:
            raise ValueError(f"the weighted encoder supports time_steps <= {MAX_WEIGHTED_TIME_STEPS} (got {self.time_steps})")
        if self.seed is not None and self.encoder != "rate":
            raise ValueError(f"seed applies to the 'rate' encoder only (got encoder {self.encoder!r})")
        if self.weight_group is not None and self.weight_bits is None:
            raise ValueError("weight_group applies with weight_bits only")
        return self

    def neuron_options(self) -> dict[str, object]:
        """beta, reset, surrogate, sharpness and learnable_leak, unset ones filled with their defaults."""
        return {name: default if getattr(self, name) is None else getattr(self, name)
                for name, default in NEURON_DEFAULTS.items()}

    def family_conflicts(self, family: str) -> list[tuple[str, object, str]]:
        """(field, value, why) for every set field that does nothing (or cannot run) for ``family`` and ``sites``.

        GPT-2's hidden neurons exist only when its FFN spikes; the other sites are encoders feeding linears in
        every family, so an encoder GPT-2's FFN cannot take is fine at them.
        """
        conflicts: list[tuple[str, object, str]] = []
        gpt2_ffn = family == "gpt2" and "ffn" in self.sites
        lif_populations = self.encoder == "lif" or (gpt2_ffn and self.neuron == "lif")
        if family == "gated":
            if self.neuron is not None:
                conflicts.append(("neuron", self.neuron, "gated FFNs keep act(gate) * up analog: no neuron "
                                  "population replaces an activation (use encoder 'lif' for leaky neurons)"))
        elif not gpt2_ffn:
            if self.neuron is not None:
                conflicts.append(("neuron", self.neuron, f"sites {self.sites} spike no GPT-2 FFN: no neuron "
                                  "population replaces its activation"))
        elif self.encoder in ("weighted", "lif"):
            conflicts.append(("encoder", self.encoder, "GPT-2's hidden neurons integrate per-step currents of the "
                              "input train; this encoder is offered for gated FFNs only (use 'if' or 'rate')"))
        for name in ("beta", "learnable_leak"):
            if getattr(self, name) is not None and not lif_populations:
                conflicts.append((name, getattr(self, name), "there is no LIF population (encoder 'lif', or neuron "
                                  "'lif' on a spiking GPT-2 FFN)"))
        if self.weight_bits is not None:
            if family != "gated" or self.sites != ["ffn"]:
                conflicts.append(("weight_bits", self.weight_bits, f"integer weights are built for gated FFN sites "
                                  f"only (family {family!r}, sites {self.sites})"))
            elif self.encoder == "lif":
                conflicts.append(("weight_bits", self.weight_bits, "the 'lif' encoder's output is no integer level "
                                  "times a fixed step"))
        has_population = self.encoder == "lif" or gpt2_ffn
        for name in ("reset", "surrogate", "sharpness"):
            if getattr(self, name) is not None and not has_population:
                conflicts.append((name, getattr(self, name), f"the {self.encoder!r} encoder is a closed-form "
                                  "quantiser with a straight-through gradient: no simulated neurons use it"))
        return conflicts


def mlp_family(mlp: nn.Module) -> str:
    """'gated' or 'gpt2': the family whose FFN class ``mlp`` is (raises for an unknown class)."""
    return family_for_mlp(mlp).name


def family_sites(family: str) -> tuple[SiteSpec, ...]:
    """The FFN sites of a family, in the order the activation flows."""
    return FAMILIES[family].scope_sites("mlp")


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    path = family_for_model(model).blocks
    return path, model.get_submodule(path)


@dataclass(frozen=True)
class MLPLocation:
    layer: int
    path: str  # e.g. 'model.layers.3.mlp'
    module: nn.Module


def find_mlps(model: nn.Module, layers: list[int] | None = None) -> list[MLPLocation]:
    """The MLP of every chosen decoder block; errors name unknown layers or classes."""
    family = family_for_model(model)
    path, blocks = block_list(model)
    indices = list(range(len(blocks))) if layers is None else sorted(layers)
    missing = [i for i in indices if not 0 <= i < len(blocks)]
    if missing:
        raise ValueError(f"plan names layers {missing} but the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
    found = []
    for i in indices:
        mlp = getattr(blocks[i], family.mlp)
        if not isinstance(mlp, SpikingMLP):
            mlp_family(mlp)  # raises for an unknown class
        found.append(MLPLocation(i, f"{path}.{i}.{family.mlp}", mlp))
    return found


def site_key(scope_path: str, site: str) -> str:
    return f"{scope_path}:{site}"


class SpikeRecorder:
    """Collects spike counts per site during forward passes (for rates and energy).

    Attach with ``with SpikeRecorder(model) as recorder: model(ids)``.
    """

    def __init__(self, model: nn.Module, read_batches: tuple[int, ...] = ()) -> None:
        self.modules = list(spiking_units(model))
        self.spikes: dict[str, float] = {}
        self.neuron_steps: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        # per site and batch size b: summed over groups of b sequences at one position, the fraction of the
        # site's neurons that spiked in any of them (whose weights event-driven hardware must read), and the groups
        self.read_batches = tuple(read_batches)
        self.active: dict[str, dict[int, list[float]]] = {}

    def add(self, site: str, spikes: torch.Tensor, neurons_per_token: int, tokens: int, time_steps: int,
            counts: torch.Tensor | None = None) -> None:
        self.spikes[site] = self.spikes.get(site, 0.0) + float(spikes)
        self.neuron_steps[site] = self.neuron_steps.get(site, 0.0) + float(neurons_per_token * tokens * time_steps)
        self.tokens[site] = self.tokens.get(site, 0) + int(tokens)
        if counts is not None and self.read_batches:
            self._add_active(site, counts)

    def _add_active(self, site: str, counts: torch.Tensor) -> None:
        """``counts`` (B, ..., C): per token and neuron, its spikes (nonzero where it spiked)."""
        fired = (counts.detach() != 0).reshape(counts.shape[0], -1, counts.shape[-1])  # (B, positions, C)
        entry = self.active.setdefault(site, {b: [0.0, 0.0] for b in self.read_batches})
        for b in self.read_batches:  # consecutive sequences, b at a time; a remainder of fewer than b is left out
            groups = fired.shape[0] // b
            if groups == 0:
                continue
            union = fired[:groups * b].reshape(groups, b, *fired.shape[1:]).any(dim=1)  # (groups, positions, C)
            entry[b][0] += float(union.float().mean(dim=-1).sum())
            entry[b][1] += float(union.shape[0] * union.shape[1])

    def active_fraction(self, site: str) -> dict[int, float]:
        """Per batch size b: the mean fraction of the site's neurons that spiked for any of b tokens (b sequences
        at the same position): the share of its consumers' weight columns an event-driven design reads."""
        return {b: total / groups for b, (total, groups) in self.active.get(site, {}).items() if groups}

    def spike_rate(self, site: str) -> float:
        """Spikes per neuron per time step."""
        return self.spikes[site] / self.neuron_steps[site]

    def __enter__(self) -> "SpikeRecorder":
        for module in self.modules:
            module.recorder = self
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.recorder = None


class SpikingUnit(nn.Module):
    """Common state of everything that spikes: plan, path, analog switch, recorder."""

    family: str
    counts_in_training = False  # set by an energy budget on the units it meters

    def __init__(self, path: str, plan: HybridPlan) -> None:
        super().__init__()
        self.path = path
        self.plan_time_steps = plan.time_steps
        self.weight_bits, self.weight_group = plan.weight_bits, plan.weight_group
        self.analog = False  # True runs the teacher's analog computation (a wiring check)
        self.recorder: SpikeRecorder | None = None
        self.spike_sink: list[tuple[str, torch.Tensor]] | None = None  # differentiable counts, for an energy budget
        self.decoder = SpikesToAnalog()

    def set_time_steps(self, time_steps: int) -> None:
        for module in self.modules():
            if isinstance(module, AnalogToSpikes):
                module.set_time_steps(time_steps)
        self.plan_time_steps = time_steps

    @property
    def metered(self) -> bool:
        """Whether a recorder or an energy budget's sink is attached to read this unit's spike counts."""
        return self.spike_sink is not None or self.recorder is not None

    def _record(self, site: str, spikes: torch.Tensor, channels: int, tokens: int,
                activity: torch.Tensor | None = None) -> None:
        """``spikes``: the site's spike counts (or train); ``activity`` (B, ..., C), nonzero where a neuron spiked
        for a token, when ``spikes`` is not already that (a (T, B, L, C) train)."""
        if self.spike_sink is not None:
            self.spike_sink.append((site, spikes))
        if self.recorder is not None:
            self.recorder.add(site_key(self.path, site), spikes.detach().abs().sum(), channels, tokens, self.plan_time_steps,
                              counts=spikes if activity is None else activity)

    def _encode(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Encode then decode: the analog value the consuming linear effectively receives."""
        encoder: AnalogToSpikes = getattr(self, f"{site}_encoder")
        levels = encoder(x)
        self._count(site, encoder, levels, x)
        return self.decoder(levels, encoder.threshold, encoder.levels)

    def _count(self, site: str, encoder: AnalogToSpikes, levels: torch.Tensor, x: torch.Tensor) -> None:
        """The spike count (a popcount for the weighted code), recorded when someone reads it. A unit an energy
        budget trains (``counts_in_training``) computes it in every training forward with gradients: a layer
        recomputed in the backward pass (gradient checkpointing), which the budget no longer meters, must repeat
        the ops of the metered forward."""
        if self.metered or (self.counts_in_training and self.training and torch.is_grad_enabled()):
            counts = encoder.spike_count(levels)
            if self.metered:
                self._record(site, counts, encoder.channels, x.numel() // encoder.channels)


class SpikingMLP(SpikingUnit):
    """A spiking FFN: its own linears, its sites' encoders or neurons."""


class SpikingSite(SpikingUnit):
    """A site outside the FFN (attention projections, LM head): an encoder in front of its consumer linears.

    The consumers stay where they are, analog modules of the teacher; a forward pre-hook on each hands it
    the decoded spikes instead of its analog input. The unit is attached as a child of the site's scope
    module (``spiking_<site>``), so its thresholds live in the model's state dict. Consumers that share
    one input (q, k and v) share the encoding: the first encodes, the others reuse it for the same input
    tensor, and the cache is dropped when the scope module returns.
    """

    def __init__(self, scope: nn.Module, path: str, spec: SiteSpec, family: str, plan: HybridPlan,
                 threshold: torch.Tensor | None, layer: int | None, site_index: int) -> None:
        super().__init__(path, plan)
        self.family, self.site, self.spec, self.layer = family, spec.name, spec, layer
        seed = site_seed(plan.seed or 0, _HEAD_SEED_LAYER if layer is None else layer, site_index)
        self.add_module(f"{spec.name}_encoder", _encoder(site_channels(spec, scope), plan, threshold, seed))
        # not registered: neither is this unit's to save (the scope holds it, the consumers stay the teacher's)
        object.__setattr__(self, "scope_module", scope)
        object.__setattr__(self, "consumers", consumers(spec, scope))
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        for module in self.consumers:
            module.register_forward_pre_hook(self._consumer_input, with_kwargs=True)
        if len(self.consumers) > 1:  # the cache lives for one call of the scope module, even one that raises
            scope.register_forward_pre_hook(self._drop_cache)
            scope.register_forward_hook(self._drop_cache, always_call=True)

    def _consumer_input(self, _module: nn.Module, args: tuple, kwargs: dict):
        if self.analog:
            return None
        if args:
            x = args[0]
        else:  # called as consumer(input=x): the input is its one tensor keyword
            names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
            if len(names) != 1:
                return None
            x = kwargs[names[0]]
        if self._cache is not None and self._cache[0] is x:
            encoded = self._cache[1]
        else:
            encoded = self._encode(self.site, x).to(x.dtype)
            if len(self.consumers) > 1:
                self._cache = (x, encoded)
        if args:
            return (encoded, *args[1:]), kwargs
        return args, {**kwargs, names[0]: encoded}

    def _drop_cache(self, *_args) -> None:
        self._cache = None

    def __getstate__(self):  # a copy never carries a forward's activations
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


class SpikingGatedMLP(SpikingMLP):
    family = "gated"

    def __init__(self, mlp: nn.Module, path: str, plan: HybridPlan, thresholds: Mapping[str, torch.Tensor],
                 layer: int = 0) -> None:
        super().__init__(path, plan)
        self.layer = layer
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        hidden, intermediate = self.gate_proj.in_features, self.gate_proj.out_features
        self.sites = tuple(spec.name for spec in FAMILIES[self.family].scope_sites("mlp"))  # (input, product)
        self.consumer_sites = {"gate_proj": self.sites[0], "up_proj": self.sites[0], "down_proj": self.sites[1]}
        self.input_encoder = _encoder(hidden, plan, thresholds.get(self.sites[0]), site_seed(plan.seed or 0, layer, 0))
        self.product_encoder = _encoder(intermediate, plan, thresholds.get(self.sites[1]),
                                        site_seed(plan.seed or 0, layer, 1))

    def _consume(self, name: str, site: str, x: torch.Tensor) -> torch.Tensor:
        """The linear ``name`` on the decoded spikes of ``site``: its float weights, or the folded integer ones."""
        linear = getattr(self, name)
        if self.weight_bits is None:
            return linear(x)
        encoder = getattr(self, f"{site}_encoder")
        weight = fold_quantize(linear.weight, encoder.threshold / encoder.levels, self.weight_bits, self.weight_group,
                               quantized=self.integer_weight(name))
        return torch.nn.functional.linear(x, weight.to(x.dtype), linear.bias)

    def integer_weight(self, name: str) -> IntegerWeight:
        """The integer weight of consumer ``name`` (``gate_proj``, ``up_proj``, ``down_proj``): its float weight
        with its site's steps folded in, quantised to ``weight_bits``; cached until either changes."""
        if self.weight_bits is None:
            raise ValueError(f"{self.path}: the plan has no weight_bits, so {name} holds float weights")
        linear, encoder = getattr(self, name), getattr(self, f"{self.consumer_sites[name]}_encoder")
        return self._weight_cache(name).get(linear.weight, encoder.log_threshold, encoder.threshold, encoder.time_steps,
                         self.weight_bits, self.weight_group)

    def _weight_cache(self, name: str) -> CachedIntegerWeight:
        # in __dict__, not a registered attribute: a copy starts with the entries, which miss on new tensors
        return self.__dict__.setdefault("_integer_weights", {}).setdefault(name, CachedIntegerWeight())

    def pin_integer_weight(self, name: str, integer: IntegerWeight) -> None:
        """Rebuild consumer ``name``'s float weight from stored integers (scale x Q / step, the master that
        training starts from) and run on exactly those integers until the weight or thresholds change."""
        linear, encoder = getattr(self, name), getattr(self, f"{self.consumer_sites[name]}_encoder")
        if tuple(integer.q.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{self.path}.{name}: stored integers have shape {tuple(integer.q.shape)}, the weight "
                             f"{tuple(linear.weight.shape)}")
        expected_group = linear.weight.shape[1] if self.weight_group is None else self.weight_group
        if integer.bits != self.weight_bits or integer.group_size != expected_group:
            raise ValueError(f"{self.path}.{name}: stored as {integer.bits}-bit in groups of {integer.group_size}; the "
                             f"plan says {self.weight_bits}-bit in groups of {expected_group}")
        step = (encoder.threshold / encoder.levels).detach().to(torch.float32).reshape(1, -1)
        with torch.no_grad():
            linear.weight.copy_((integer.dequantized() / step).to(linear.weight.dtype))
        self._weight_cache(name).pin(linear.weight, encoder.log_threshold, encoder.time_steps, integer)

    def _integer_ready(self) -> bool:
        """The int8 kernel runs in inference with 8-bit per-channel weights and levels that fit in int8."""
        return (getattr(self, "integer_path", False) and self.weight_bits == 8 and self.weight_group is None
                and not torch.is_grad_enabled() and self.input_encoder.kind == "weighted"
                and self.product_encoder.kind == "weighted" and self.input_encoder.levels <= 127
                and self.product_encoder.levels <= 127)

    def _integer_consume(self, name: str, levels: torch.Tensor) -> torch.Tensor:
        return integer_linear(levels, self.integer_weight(name), getattr(self, name).bias).to(levels.dtype)

    def _levels(self, site: str, x: torch.Tensor) -> torch.Tensor:
        encoder: AnalogToSpikes = getattr(self, f"{site}_encoder")
        levels = encoder(x)
        self._count(site, encoder, levels, x)
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, C)
        if self.analog:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        first, second = self.sites
        if self._integer_ready():  # spike levels x int8 weights in int32, one scale per output
            levels = self._levels(first, x)
            product = self.act_fn(self._integer_consume("gate_proj", levels)) * self._integer_consume("up_proj", levels)
            return self._integer_consume("down_proj", self._levels(second, product))
        x_rate = self._encode(first, x)  # (B, L, C) = theta * counts / T
        product = self.act_fn(self._consume("gate_proj", first, x_rate)) * self._consume("up_proj", first, x_rate)
        return self._consume("down_proj", second, self._encode(second, product))

    @torch.no_grad()
    def forward_per_step(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: every spike-consuming linear applied at each of the T steps, then averaged."""
        enc_in, enc_prod = self.input_encoder, self.product_encoder
        spikes = enc_in.spike_train(x) * enc_in.threshold  # (T, B, L, C)
        # (T,): w_t / L, summing to 1; made in float64 on the CPU, so cast there before the move (MPS has no float64)
        weights = (enc_in.step_weights() / enc_in.levels).to(x.dtype).to(x.device)
        first, second = self.sites
        gate = torch.tensordot(weights, self._consume("gate_proj", first, spikes), dims=1)
        up = torch.tensordot(weights, self._consume("up_proj", first, spikes), dims=1)
        product = self.act_fn(gate) * up
        spikes = enc_prod.spike_train(product) * enc_prod.threshold  # (T, B, L, I)
        weights = (enc_prod.step_weights() / enc_prod.levels).to(x.dtype).to(x.device)
        return torch.tensordot(weights, self._consume("down_proj", second, spikes), dims=1)


class SpikingGPT2MLP(SpikingMLP):
    family = "gpt2"

    def __init__(self, mlp: nn.Module, path: str, plan: HybridPlan, thresholds: Mapping[str, torch.Tensor],
                 layer: int = 0) -> None:
        super().__init__(path, plan)
        self.layer = layer
        if plan.encoder not in ("if", "rate"):
            raise ValueError(f"{path}: encoder {plan.encoder!r} is offered for gated FFNs only; GPT-2 takes 'if' or 'rate'")
        self.c_fc, self.c_proj, self.act, self.dropout = mlp.c_fc, mlp.c_proj, mlp.act, mlp.dropout
        hidden, intermediate = self.c_fc.weight.shape  # Conv1D stores (in, out)
        self.sites = tuple(spec.name for spec in FAMILIES[self.family].scope_sites("mlp"))  # (input, hidden)
        self.input_encoder = _encoder(hidden, plan, thresholds.get(self.sites[0]), site_seed(plan.seed or 0, layer, 0))
        threshold = thresholds.get(self.sites[1])
        options = plan.neuron_options()
        self.hidden_neurons = MultiStepNeuron(
            intermediate,
            kind=plan.neuron or "if",
            threshold=1.0 if threshold is None else threshold,
            beta=options["beta"],
            reset=options["reset"],
            surrogate=options["surrogate"],
            sharpness=options["sharpness"],
            per_channel=plan.granularity == "channel",
            learnable_threshold=plan.learnable_threshold,
            learnable_leak=options["learnable_leak"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, C)
        if self.analog:
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))
        encoder = self.input_encoder
        spikes = encoder.spike_train(x)  # (T, B, L, C)
        self._record(self.sites[0], spikes, encoder.channels, x.numel() // encoder.channels,
                     activity=spikes.detach().abs().sum(0) if self.recorder is not None else None)
        currents = self.c_fc(spikes * encoder.threshold.to(x.dtype))  # (T, B, L, I): bias injected every step
        hidden = self.hidden_neurons(currents)  # (T, B, L, I) in {0, 1}
        counts = hidden.sum(0)
        self._record(self.sites[1], counts, self.hidden_neurons.channels, counts.numel() // self.hidden_neurons.channels)
        rate = self.decoder(counts, self.hidden_neurons.threshold, encoder.time_steps)
        return self.dropout(self.c_proj(rate))

    @torch.no_grad()
    def forward_per_step(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: c_proj applied at each step to the neurons' spikes, then averaged."""
        spikes = self.input_encoder.spike_train(x) * self.input_encoder.threshold
        hidden = self.hidden_neurons(self.c_fc(spikes)) * self.hidden_neurons.threshold
        return self.dropout(self.c_proj(hidden).mean(0))


_HEAD_SEED_LAYER = 65_535  # the noise-stream index of the LM head's site (layers use their own index)


def site_seed(plan_seed: int, layer: int, site_index: int) -> int:
    """A distinct, reproducible noise seed per (plan seed, layer, site): no two sites share a stream."""
    return (plan_seed * 65_537 + layer) * 4 + site_index


def _encoder(channels: int, plan: HybridPlan, threshold: torch.Tensor | None, seed: int) -> AnalogToSpikes:
    neuron_options = None
    if plan.encoder == "lif":
        options = plan.neuron_options()
        neuron_options = {k: options[k] for k in ("beta", "reset", "surrogate", "sharpness", "learnable_leak")}
    return AnalogToSpikes(
        channels,
        plan.time_steps,
        kind=plan.encoder,
        threshold=1.0 if threshold is None else threshold,
        per_channel=plan.granularity == "channel",
        membrane_init=plan.membrane_init or "symmetric",
        learnable_threshold=plan.learnable_threshold,
        seed=seed,
        neuron_options=neuron_options,
        digits=plan.digits or "binary",
    )


@dataclass(frozen=True)
class SiteLocation:
    key: str  # '<scope path>:<site name>'
    path: str  # the scope module: a block's FFN or attention, or the LM head
    layer: int | None  # None for the LM head's site
    spec: SiteSpec
    family: str
    index: int  # the site's position in its family (a distinct noise stream per site)


def site_locations(model: nn.Module, layers: list[int] | None = None,
                   groups=("ffn",)) -> list[SiteLocation]:
    """Every site of the chosen groups, in the chosen blocks (and the LM head's, if chosen), in model order."""
    family = family_for_model(model)
    blocks_path, blocks = block_list(model)
    mlps = find_mlps(model, layers)  # checks the layer indices and the FFN classes
    wanted = family.sites_in(groups)
    found = []
    for location in mlps:
        for index, spec in enumerate(family.sites):
            if spec not in wanted or spec.scope == "model":
                continue
            scope = location.path if spec.scope == "mlp" else f"{blocks_path}.{location.layer}.{family.attention}"
            found.append(SiteLocation(site_key(scope, spec.name), scope, location.layer, spec, family.name, index))
    for index, spec in enumerate(family.sites):
        if spec in wanted and spec.scope == "model":
            found.append(SiteLocation(site_key(family.lm_head, spec.name), family.lm_head, None, spec, family.name, index))
    return found


def hybridize(
    model: nn.Module, plan: HybridPlan, thresholds: Mapping[str, torch.Tensor] | None = None
) -> list[SpikingUnit]:
    """Make the plan's sites of ``model`` spike, in place.

    The chosen FFNs are replaced by spiking blocks; every other chosen site gets a ``SpikingSite``
    in front of its consumers. ``thresholds`` maps site keys (``'model.layers.3.mlp:input'``) to a
    (C,) tensor for per-channel or a (1,) tensor for per-layer granularity; sites without one start
    at 1.0 (``load_hybrid`` then loads the trained values).
    """
    thresholds = thresholds or {}
    converted: list[SpikingUnit] = []
    done_mlps: set[str] = set()
    for location in site_locations(model, plan.layers, plan.sites):
        threshold = thresholds.get(location.key)
        if threshold is not None:
            threshold = _checked_threshold(location.key, threshold, plan.granularity)
        scope = model.get_submodule(location.path)
        if location.spec.scope == "mlp":
            if location.path in done_mlps:
                continue
            if isinstance(scope, SpikingMLP):
                raise ValueError(f"{location.path} is already spiking; hybridize a fresh copy of the teacher")
            done_mlps.add(location.path)
            site_thresholds = {}
            for spec in FAMILIES[location.family].scope_sites("mlp"):
                key = site_key(location.path, spec.name)
                if key in thresholds:
                    site_thresholds[spec.name] = _checked_threshold(key, thresholds[key], plan.granularity)
            cls = SpikingGatedMLP if location.family == "gated" else SpikingGPT2MLP
            unit: SpikingUnit = cls(scope, location.path, plan, site_thresholds, layer=location.layer)
            parent_path, _, child = location.path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, unit)
        else:
            name = f"spiking_{location.spec.name}"
            if hasattr(scope, name):
                raise ValueError(f"{location.key} is already spiking; hybridize a fresh copy of the teacher")
            unit = SpikingSite(scope, location.path, location.spec, location.family, plan, threshold,
                               location.layer, location.index)
            scope.add_module(name, unit)
        converted.append(unit)
    return converted


def _checked_threshold(key: str, value: torch.Tensor, granularity: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32).flatten()
    if granularity == "layer" and value.numel() != 1:
        raise ValueError(f"site {key}: per-layer granularity needs one threshold (got {value.numel()})")
    if not torch.isfinite(value).all() or (value <= 0).any():
        bad = value[~(torch.isfinite(value) & (value > 0))][:5].tolist()
        raise ValueError(f"site {key}: thresholds must be finite and positive (got e.g. {bad})")
    return value


def unit_sites(unit: SpikingUnit) -> tuple[SiteSpec, ...]:
    """The sites a spiking unit holds: an FFN's sites in flow order, or a site unit's own."""
    if isinstance(unit, SpikingSite):
        return (unit.spec,)
    return FAMILIES[unit.family].scope_sites("mlp")


def spiking_mlps(model: nn.Module) -> Iterator[SpikingMLP]:
    """The spiking FFNs."""
    return (m for m in model.modules() if isinstance(m, SpikingMLP))


def spiking_units(model: nn.Module) -> Iterator[SpikingUnit]:
    """Everything that spikes: the spiking FFNs and the sites outside them."""
    return (m for m in model.modules() if isinstance(m, SpikingUnit))


def set_time_steps(model: nn.Module, time_steps: int) -> None:
    for module in spiking_units(model):
        module.set_time_steps(time_steps)


def set_integer_path(model: nn.Module, enabled: bool = True) -> int:
    """Run the 8-bit-weight spiking FFNs on the int8 kernel in inference (``torch._int_mm``); how many take it."""
    count = 0
    for module in spiking_units(model):
        if isinstance(module, SpikingGatedMLP):
            module.integer_path = enabled
            count += int(enabled and module.weight_bits == 8 and module.weight_group is None)
    return count


def set_analog(model: nn.Module, analog: bool) -> None:
    """Run the spiking units as their analog originals (True) or as spikes (False)."""
    for module in spiking_units(model):
        module.analog = analog


def analog_site_parameters(model: nn.Module, layers: list[int] | None, groups) -> list[nn.Parameter]:
    """In an analog model, what the hybrid's training reaches for the same sites: every parameter of the chosen
    FFNs, and the weights and biases of the other chosen sites' consumers (a weight shared with the input
    embedding excepted, as in ``spiking_parameter_groups``)."""
    params: list[nn.Parameter] = []
    if "ffn" in groups:
        params += [param for location in find_mlps(model, layers) for param in location.module.parameters()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    for location in site_locations(model, layers, [g for g in groups if g != "ffn"]):
        for module in consumers(location.spec, model.get_submodule(location.path)):
            params += [p for p in module.parameters(recurse=False)
                       if id(p) not in tied and not any(p is q for q in params)]
    return params


def spiking_parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights and biases of the spike-consuming linears, learnable thresholds and leaks).

    Decided by the plan's flags, not by ``requires_grad``, which training code toggles. The consumers of
    a site outside the FFN train too, except a weight shared with the input embedding (Gemma's tied LM
    head): that would retrain the analog embedding.
    """
    weights: list[nn.Parameter] = []
    dynamics: list[nn.Parameter] = []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    for block in spiking_units(model):
        if isinstance(block, SpikingSite):
            weights.extend(p for module in block.consumers for p in module.parameters(recurse=False)
                           if id(p) not in tied and not any(p is w for w in weights))
        for module in block.children():
            if isinstance(module, AnalogToSpikes):
                population = module.neurons
                if population is None:
                    if module.learnable_threshold:
                        dynamics.append(module.log_threshold)
                    continue
                if population.learnable_threshold:
                    dynamics.append(population.log_threshold)
                if population.learnable_leak:
                    dynamics.append(population.beta)
            elif isinstance(module, MultiStepNeuron):
                if module.learnable_threshold:
                    dynamics.append(module.log_threshold)
                if module.learnable_leak:
                    dynamics.append(module.beta)
            else:
                weights.extend(module.parameters())
    return weights, dynamics


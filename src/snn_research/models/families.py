"""What a model family looks like to the spiking code: the one place its sites are defined.

A *site* is a place where an encoder (or a neuron population) sees an
activation and sends spikes to one or more linear maps, its *consumers*. Each
family lists its sites once, with where each sits, and everything else derives
from that description:

- calibration hooks ``hook`` (relative to the site's scope module) and counts
  ``channels`` there;
- conversion builds the spiking unit for the site and records it in the metadata;
- the energy model prices a spike at ``fan_out`` synapses (the consumers' output
  widths) and the dense map it replaced at channels x fan-out MACs;
- layer-wise training reads the residual stream through ``input_norm`` and
  ``final_norm``.

Scopes: ``mlp`` sites sit in a decoder block's FFN, ``attention`` sites in its
attention module, ``model`` sites before the LM head (one per model). Sites are
chosen in params by group (``ffn``, ``qkv``, ``o``, ``head``); a group names
the same kind of place in every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

Scope = Literal["mlp", "attention", "model"]
SiteGroup = Literal["ffn", "qkv", "o", "head"]
SITE_GROUPS: tuple[str, ...] = ("ffn", "qkv", "o", "head")


@dataclass(frozen=True)
class SiteSpec:
    """One site of a family."""

    name: str  # unique within the family; the suffix of the site key '<scope path>:<name>'
    group: str  # the params group that selects it: ffn | qkv | o | head
    scope: Scope
    signed: bool  # percentiles of |x| (signed) or of max(x, 0)
    hook: str  # module (relative to the scope; '' is the scope itself) whose input or output the site sees
    hook_kind: Literal["pre", "post"]  # its input ('pre') or its output ('post')
    consumers: tuple[str, ...]  # linear maps (relative to the scope) that receive the site's spikes
    role: Literal["encoder", "neuron"] = "encoder"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    mlp_classes: tuple[str, ...]
    blocks: str  # path of the decoder block list
    mlp: str  # attribute of a block holding its FFN
    attention: str  # attribute of a block holding its attention
    input_norm: str  # attribute of a block: the norm that reads the residual stream entering it
    final_norm: str  # path of the norm that reads the last block's output
    lm_head: str  # path of the LM head
    sites: tuple[SiteSpec, ...]
    ffn_elementwise: int  # analog MACs per intermediate channel of the FFN: activation (and gating multiply)

    def sites_in(self, groups) -> tuple[SiteSpec, ...]:
        return tuple(spec for spec in self.sites if spec.group in set(groups))

    def scope_sites(self, scope: Scope) -> tuple[SiteSpec, ...]:
        return tuple(spec for spec in self.sites if spec.scope == scope)


GATED = Family(
    name="gated",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    mlp_classes=("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"),
    blocks="model.layers",
    mlp="mlp",
    attention="self_attn",
    input_norm="input_layernorm",
    final_norm="model.norm",
    lm_head="lm_head",
    sites=(
        SiteSpec("input", "ffn", "mlp", True, "", "pre", ("gate_proj", "up_proj")),
        SiteSpec("product", "ffn", "mlp", True, "down_proj", "pre", ("down_proj",)),
        SiteSpec("qkv", "qkv", "attention", True, "q_proj", "pre", ("q_proj", "k_proj", "v_proj")),
        SiteSpec("o", "o", "attention", True, "o_proj", "pre", ("o_proj",)),
        SiteSpec("head", "head", "model", True, "", "pre", ("",)),
    ),
    ffn_elementwise=2,
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    mlp_classes=("GPT2MLP",),
    blocks="transformer.h",
    mlp="mlp",
    attention="attn",
    input_norm="ln_1",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    sites=(
        SiteSpec("input", "ffn", "mlp", True, "", "pre", ("c_fc",)),
        SiteSpec("hidden", "ffn", "mlp", False, "c_fc", "post", ("c_proj",), role="neuron"),
        SiteSpec("qkv", "qkv", "attention", True, "c_attn", "pre", ("c_attn",)),
        SiteSpec("o", "o", "attention", True, "c_proj", "pre", ("c_proj",)),
        SiteSpec("head", "head", "model", True, "", "pre", ("",)),
    ),
    ffn_elementwise=1,
)

FAMILIES: dict[str, Family] = {family.name: family for family in (GATED, GPT2)}
SITE_NAMES: tuple[str, ...] = tuple(sorted({spec.name for family in FAMILIES.values() for spec in family.sites}))


def family_for_model(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in FAMILIES.values() for t in family.model_types)
    raise ValueError(f"unsupported architecture {model_type!r}; supported model types: {supported}")


def family_for_mlp(mlp: nn.Module) -> Family:
    name = type(mlp).__name__
    for family in FAMILIES.values():
        if name in family.mlp_classes:
            return family
    supported = sorted(c for family in FAMILIES.values() for c in family.mlp_classes)
    raise ValueError(f"unsupported MLP class {name!r}; supported: {supported}")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (which stores (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        rows, columns = module.weight.shape
        return rows, columns
    raise ValueError(f"{type(module).__name__} is not a linear map a site can feed")


def _child(scope: nn.Module, path: str) -> nn.Module:
    return scope if path == "" else scope.get_submodule(path)


def consumers(spec: SiteSpec, scope: nn.Module) -> list[nn.Module]:
    return [_child(scope, path) for path in spec.consumers]


def hook_point(spec: SiteSpec, scope: nn.Module) -> nn.Module:
    return _child(scope, spec.hook)


def site_channels(spec: SiteSpec, scope: nn.Module) -> int:
    """Neurons at the site per token: the width of the activation it sees."""
    if spec.hook_kind == "post":
        return linear_shape(hook_point(spec, scope))[1]
    return linear_shape(consumers(spec, scope)[0])[0]


def site_fan_out(spec: SiteSpec, scope: nn.Module) -> int:
    """Synapses one spike reaches: the output widths of the site's consumers, summed."""
    return sum(linear_shape(module)[1] for module in consumers(spec, scope))

"""ANN -> hybrid conversion, its metadata, and hybrid checkpoints.

``convert`` copies the teacher, swaps the chosen MLPs for spiking blocks
(weights copied unchanged) and sets every site's threshold from the
calibration. ``ConversionMetadata`` records everything the conversion decided;
per-channel tensors live in a safetensors file beside the JSON and are
referenced by name.

A hybrid checkpoint is a folder::

    config.json            the teacher's HF config
    model.safetensors      all weights of the hybrid, thresholds and leaks included
    hybrid.json            ConversionMetadata (the plan needed to rebuild the blocks)
    thresholds.safetensors the calibrated thresholds referenced by hybrid.json
    tokenizer files

``load_hybrid(folder)`` rebuilds the model from these alone.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import safetensors
import safetensors.torch
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from snn_research.artifacts import package_versions
from snn_research.conversion.calibrator import CalibrationResult
from snn_research.errors import format_validation_error
from snn_research.hybrid.adapter import MAX_WEIGHTED_TIME_STEPS, AnalogToSpikes
from snn_research.hybrid.integer import IntegerWeight
from snn_research.io import atomic_directory, atomic_write_text, significant
from snn_research.models.families import SITE_NAMES, SiteSpec
from snn_research.models.families import consumers as site_consumers
from snn_research.models.hybrid_transformer import (
    HybridPlan,
    SpikingUnit,
    find_mlps,
    hybridize,
    mlp_family,
    site_key,
    site_locations,
    spiking_units,
    unit_sites,
)

METADATA_FILE = "hybrid.json"


class PlanConflict(ValueError):
    """A plan field that does nothing (or cannot run) for the model's family; names the field."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(f"{field}: {message} (got {value!r})")
        self.field, self.value = field, value
THRESHOLDS_FILE = "thresholds.safetensors"
WEIGHTS_FILE = "model.safetensors"


class TensorRef(BaseModel):
    """A tensor stored in a safetensors file next to the metadata JSON."""

    model_config = ConfigDict(extra="forbid")
    file: str
    name: str
    shape: list[int]


class SiteMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    module_path: str = Field(description="the site's scope: a block's FFN or attention module, or the LM head")
    layer: int | None = Field(description="the decoder block (null: the LM head's site)")
    site: str = Field(description=f"one of {list(SITE_NAMES)} (models/families.py)")
    signed: bool
    role: Literal["encoder", "neuron"]
    class_before: str
    class_after: str
    weight_shapes: dict[str, list[int]]
    consumers: list[str] = Field(description="linear maps that receive this site's spikes")
    threshold: float | TensorRef
    scale_factors: dict[str, float | TensorRef] = Field(
        description="per consumer: the factor a spike's synaptic weight carries (its input threshold)"
    )
    percentile: float
    granularity: Literal["channel", "layer"]
    time_steps: int
    parameters: dict[str, float | int | str | bool]

    @field_validator("site")
    @classmethod
    def _known_site(cls, value: str) -> str:
        if value not in SITE_NAMES:
            raise ValueError(f"unknown site {value!r}; sites are {list(SITE_NAMES)}")
        return value


class TeacherIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    sha256: str
    model_type: str
    architectures: list[str]
    num_layers: int


class CalibrationIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_sha256: str
    tokens: int
    percentile: float
    bins_per_octave: int
    relative_error_bound: float


# a relative error measured through float32 passes, kept to the digits two hosts agree on (io.significant)
MeasuredError = Annotated[float, AfterValidator(significant)]


class ClippingChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    choice: str = Field(description="'scale x<f>' (f times the percentile thresholds) or 'channel max'")
    error_before: MeasuredError = Field(description="the block's relative FFN output error with this site at its percentile "
                                "thresholds (earlier sites at their choices)")
    error_chosen: MeasuredError = Field(description="the same with this site at its chosen thresholds")


class ClippingBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    error_percentile: MeasuredError = Field(description="relative FFN output error, every site at its percentile thresholds")
    error_chosen: MeasuredError = Field(description="relative FFN output error, every site at its chosen thresholds")


class ClippingRecord(BaseModel):
    """How the percentile thresholds became the conversion's clipping points."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["percentile", "search"]
    search_tokens: int = 0
    objective: Literal["pooled", "worst_domain"] = "pooled"  # the search's: all tokens, or the worst domain's
    sites: list[ClippingChoice] = Field(default_factory=list)
    blocks: list[ClippingBlock] = Field(default_factory=list)


class ConversionMetadata(BaseModel):
    """Format 2: plan fields that do nothing for the chosen encoder are null, rate noise is seeded per site.

    A format-1 file (written before) still reads: its plan loses the fields format 2 refuses for its
    encoder (``membrane_init`` unless 'if', ``seed`` unless 'rate'). A format-1 rate hybrid reloads with
    format 2's per-site noise streams, so its stochastic spikes differ from the ones it was trained with.
    """

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1, 2] = 2
    teacher: TeacherIdentity
    calibration: CalibrationIdentity | None
    plan: HybridPlan
    sites: list[SiteMetadata]
    versions: dict[str, str]
    clipping: ClippingRecord | None = None
    headroom_steps: int = Field(0, ge=0, description="steps of range above the calibrated thresholds (weighted code)")

    @model_validator(mode="before")
    @classmethod
    def _upgrade_format_1(cls, data):
        if isinstance(data, dict) and data.get("format_version") == 1 and isinstance(data.get("plan"), dict):
            plan = dict(data["plan"])
            if plan.get("encoder", "if") != "if":
                plan.pop("membrane_init", None)
            if plan.get("encoder", "if") != "rate":
                plan.pop("seed", None)
            data = {**data, "plan": plan}
        return data

    def write(self, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the JSON (and its tensors file, if any) atomically."""
        path = Path(path)
        if tensors is not None:  # written even when empty (per-layer thresholds), so the file set is fixed
            tensor_path = path.parent / THRESHOLDS_FILE
            tmp = tensor_path.with_suffix(".tmp")
            safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.replace(tensor_path)
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> "ConversionMetadata":
        """Validate the JSON and that every referenced tensor exists with its shape."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: conversion metadata not found")
        try:
            metadata = cls.model_validate_json(path.read_text())
        except ValidationError as error:
            raise ValueError(f"{path}: invalid conversion metadata: {format_validation_error(error)}") from None
        metadata.check_tensors(path.parent)
        return metadata

    def tensor_refs(self) -> list[TensorRef]:
        refs = []
        for site in self.sites:
            for value in [site.threshold, *site.scale_factors.values()]:
                if isinstance(value, TensorRef):
                    refs.append(value)
        return refs

    def check_tensors(self, folder: Path) -> None:
        by_file: dict[str, list[TensorRef]] = {}
        for ref in self.tensor_refs():
            by_file.setdefault(ref.file, []).append(ref)
        for file, refs in by_file.items():
            tensor_path = Path(folder) / file
            if not tensor_path.is_file():
                raise ValueError(f"{tensor_path}: tensors file named by the conversion metadata is missing")
            try:
                with safetensors.safe_open(str(tensor_path), framework="pt") as handle:
                    names = set(handle.keys())
                    for ref in refs:
                        if ref.name not in names:
                            raise ValueError(f"{tensor_path}: tensor {ref.name!r} named by the metadata is missing")
                        shape = list(handle.get_slice(ref.name).get_shape())
                        if shape != ref.shape:
                            raise ValueError(
                                f"{tensor_path}: tensor {ref.name!r} has shape {shape}, metadata says {ref.shape}"
                            )
            except safetensors.SafetensorError as error:
                raise ValueError(f"{tensor_path}: unreadable safetensors file ({error})") from None


def convert(
    teacher: nn.Module,
    calibration: CalibrationResult,
    plan: HybridPlan,
    teacher_identity: TeacherIdentity,
    calibration_sha256: str,
) -> tuple[nn.Module, ConversionMetadata, dict[str, torch.Tensor]]:
    """A hybrid copy of ``teacher``; the teacher itself is left untouched.

    Returns the hybrid, its metadata and the tensors the metadata references.
    """
    thresholds = calibration.thresholds(plan.granularity)
    for family in sorted({mlp_family(loc.module) for loc in find_mlps(teacher, plan.layers)}):
        conflicts = plan.family_conflicts(family)
        if conflicts:
            field, value, why = conflicts[0]
            raise PlanConflict(field, value, f"does nothing for the {family} family: {why}")
    locations = site_locations(teacher, plan.layers, plan.sites)
    before = {loc.path: teacher.get_submodule(loc.path) for loc in locations}
    missing = [loc.key for loc in locations if loc.key not in thresholds]
    if missing:
        raise ValueError(f"the calibration has no thresholds for sites {missing[:4]} (calibrate the same layers "
                         "and sites)")
    hybrid = copy.deepcopy(teacher)
    blocks = hybridize(hybrid, plan, thresholds)
    sites, tensors = describe_sites(blocks, before, plan, calibration.percentile)
    metadata = ConversionMetadata(
        teacher=teacher_identity,
        calibration=CalibrationIdentity(
            data_sha256=calibration_sha256,
            tokens=calibration.tokens,
            percentile=calibration.percentile,
            bins_per_octave=calibration.bins_per_octave,
            relative_error_bound=calibration.relative_error_bound,
        ),
        plan=plan,
        sites=sites,
        versions=package_versions(),
    )
    return hybrid, metadata, tensors


def describe_sites(
    blocks: list[SpikingUnit], before: dict[str, nn.Module], plan: HybridPlan, percentile: float
) -> tuple[list[SiteMetadata], dict[str, torch.Tensor]]:
    sites, tensors = [], {}
    for block in blocks:
        original = before[block.path]
        for spec in unit_sites(block):
            key = site_key(block.path, spec.name)
            threshold = _threshold_entry(block, spec.name, key, tensors)
            consumers = _consumer_names(block.path, spec)
            weights = {name: list(module.weight.shape)
                       for name, module in zip(consumers, site_consumers(spec, original))}
            sites.append(
                SiteMetadata(
                    key=key,
                    module_path=block.path,
                    layer=block.layer,
                    site=spec.name,
                    signed=spec.signed,
                    role=spec.role,
                    class_before=type(original).__name__,
                    class_after=type(block).__name__,
                    weight_shapes=weights,
                    consumers=consumers,
                    threshold=threshold,
                    scale_factors={name: threshold for name in consumers},
                    percentile=percentile,
                    granularity=plan.granularity,
                    time_steps=plan.time_steps,
                    parameters=_population_parameters(block, spec, plan),
                )
            )
    return sites, tensors


def _consumer_names(scope_path: str, spec: SiteSpec) -> list[str]:
    """The consumers' names relative to the scope; the scope's own name when it is the consumer (the LM head)."""
    return [name or scope_path.rsplit(".", 1)[-1] for name in spec.consumers]


def _threshold_entry(block: SpikingUnit, site: str, key: str, tensors: dict[str, torch.Tensor]) -> float | TensorRef:
    """A scalar for a per-layer threshold; a reference (and the tensor, added to ``tensors``) per channel."""
    population = getattr(block, f"{site}_encoder", None) or getattr(block, f"{site}_neurons")
    value = population.threshold.detach().float()
    if value.numel() == 1:
        return float(value)
    tensors[key] = value.clone()
    return TensorRef(file=THRESHOLDS_FILE, name=key, shape=list(value.shape))


def _population_parameters(block: SpikingUnit, spec: SiteSpec, plan: HybridPlan) -> dict[str, float | int | str | bool]:
    options = plan.neuron_options()
    if spec.role == "neuron":
        neuron = plan.neuron or "if"
        return {
            "neuron": neuron,
            "beta": 1.0 if neuron == "if" else options["beta"],
            "reset": options["reset"],
            "surrogate": options["surrogate"],
            "sharpness": options["sharpness"],
            "learnable_threshold": plan.learnable_threshold,
            "learnable_leak": options["learnable_leak"],
        }
    encoder = getattr(block, f"{spec.name}_encoder")
    parameters: dict[str, float | int | str | bool] = {
        "encoder": encoder.kind,
        "levels": encoder.levels,
        "learnable_threshold": plan.learnable_threshold,
    }
    if encoder.kind == "rate":
        parameters["seed"] = encoder.seed
    if encoder.kind == "if":
        parameters["membrane_init"] = encoder.membrane_init
    if encoder.kind == "weighted":
        parameters["digits"] = encoder.digits
    if encoder.kind == "lif":
        parameters.update({k: options[k] for k in ("beta", "reset", "surrogate", "sharpness", "learnable_leak")})
    return parameters


def headroom_factor(time_steps: int, headroom_steps: int) -> float:
    """(2^T - 1) / (2^(T - h) - 1): the threshold growth that keeps the weighted code's step size."""
    return (2.0 ** time_steps - 1.0) / (2.0 ** (time_steps - headroom_steps) - 1.0)


def add_headroom(model: nn.Module, headroom_steps: int) -> int:
    """Give every spiking site ``headroom_steps`` more steps of range at the same step size; the new T.

    Each weighted encoder's threshold grows by ``headroom_factor`` and T by ``headroom_steps``: a value within
    the old threshold gets the same level (up to float rounding at a level's edge), a value beyond it, which
    the old code clipped, now reaches up to about 2^h times further. Spikes cost the same; the receiving
    neurons' per-step shifts grow with T (the energy model counts them).
    """
    units = list(spiking_units(model))
    if not units:
        raise ValueError("the model has no spiking sites to give headroom")
    encoders = [m for unit in units for m in unit.modules() if isinstance(m, AnalogToSpikes)]
    other = sorted({m.kind for m in encoders if m.kind != "weighted"})
    if other:
        raise ValueError(f"headroom needs the weighted code at every site; this model also has {other}")
    base = {unit.plan_time_steps for unit in units}
    if len(base) != 1:
        raise ValueError(f"the spiking sites run at different T ({sorted(base)}); headroom needs one")
    base_steps = base.pop()
    time_steps = base_steps + headroom_steps
    if headroom_steps < 1 or time_steps > MAX_WEIGHTED_TIME_STEPS:
        raise ValueError(f"headroom of {headroom_steps} steps on T = {base_steps} gives T = {time_steps}; the weighted "
                         f"code takes 1 or more headroom steps and T <= {MAX_WEIGHTED_TIME_STEPS}")
    shift = math.log(headroom_factor(time_steps, headroom_steps))
    with torch.no_grad():
        for encoder in encoders:
            encoder.log_threshold.add_(shift)
    for unit in units:
        unit.set_time_steps(time_steps)
    return time_steps


def refresh_metadata(model: nn.Module, metadata: ConversionMetadata) -> tuple[ConversionMetadata, dict[str, torch.Tensor]]:
    """Metadata whose thresholds are the model's current (e.g. trained) values."""
    blocks = list(spiking_units(model))
    by_key = {site.key: site for site in metadata.sites}
    fresh_sites, tensors = [], {}
    for block in blocks:
        for spec in unit_sites(block):
            key = site_key(block.path, spec.name)
            old = by_key[key]
            threshold = _threshold_entry(block, spec.name, key, tensors)
            time_steps = getattr(block, "plan_time_steps", old.time_steps)
            fresh_sites.append(
                old.model_copy(
                    update={
                        "threshold": threshold,
                        "scale_factors": {name: threshold for name in old.consumers},
                        "time_steps": time_steps,
                    }
                )
            )
    plan = metadata.plan.model_copy(update={"time_steps": blocks[0].plan_time_steps}) if blocks else metadata.plan
    return metadata.model_copy(update={"sites": fresh_sites, "plan": plan}), tensors


def write_hybrid_files(model: nn.Module, tokenizer, metadata: ConversionMetadata, folder: Path) -> ConversionMetadata:
    """Write a hybrid checkpoint's files into an existing folder; returns the metadata written."""
    folder = Path(folder)
    metadata, tensors = refresh_metadata(model, metadata)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_weights(model, folder / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    metadata.write(folder / METADATA_FILE, tensors)
    return metadata


def save_hybrid(model: nn.Module, tokenizer, metadata: ConversionMetadata, folder: Path) -> Path:
    """Write a hybrid checkpoint folder atomically (a killed save leaves the old folder or none)."""
    with atomic_directory(Path(folder)) as tmp:
        write_hybrid_files(model, tokenizer, metadata, tmp)
    return Path(folder)


def load_hybrid(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a hybrid model from its checkpoint folder; needs no calibration data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    metadata = ConversionMetadata.read(folder / METADATA_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights}: hybrid weights file is missing")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    hybridize(model, metadata.plan)
    load_weights(model, weights)
    model.hybrid_metadata = metadata
    model.eval()
    return model


def _integer_consumers(model: nn.Module):
    """(state-dict prefix of the linear, its spiking FFN, the linear's name) for every consumer with integer weights."""
    for path, module in model.named_modules():
        if getattr(module, "weight_bits", None) is not None and hasattr(module, "consumer_sites"):
            for name in module.consumer_sites:
                yield f"{path}.{name}." if path else f"{name}.", module, name


def save_weights(model: nn.Module, path: Path) -> None:
    """All tensors of the state dict, each stored once, in a byte-reproducible file.

    Tied tensors (Gemma's embedding and LM head) are stored under their first name
    in sorted order; the other names are listed in the file's metadata. A spiking FFN with
    integer weights (``weight_bits``) stores each consumer as its integers (``weight_q``, int8, also for
    4 bits) and their scales (``weight_scale``), not as the float weight: the folder shrinks, and a reload
    runs on exactly these integers.
    """
    state = model.state_dict()
    for prefix, module, name in _integer_consumers(model):
        integer = module.integer_weight(name)
        del state[prefix + "weight"]
        state[prefix + "weight_q"], state[prefix + "weight_scale"] = integer.q, integer.scale
    kept: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    tensors = {}
    for name in sorted(state):
        tensor = state[name]
        # the same memory seen under two names (not merely the same storage: views differ by offset)
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in kept and tensor.numel():
            tied[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = tensor.detach().contiguous()
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "tied": json.dumps(tied, sort_keys=True)})
    # safetensors writes __metadata__ from a hash map whose order changes from one process to the next:
    # rewrite the header with those keys sorted, in place (the same length, so the tensors stay where they are)
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: the sorted safetensors header is {len(text)} bytes, longer than the {size} written")
        handle.seek(8)
        handle.write(text.ljust(size))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``save_weights`` output strictly: every tensor of the model, nothing else."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            tied = json.loads((handle.metadata() or {}).get("tied", "{}"))
        state = safetensors.torch.load_file(str(path))
        stored = {prefix: (module, name, state.pop(prefix + "weight_q"), state.pop(prefix + "weight_scale", None))
                  for prefix, module, name in _integer_consumers(model) if prefix + "weight_q" in state}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (safetensors.SafetensorError, RuntimeError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot load hybrid weights ({error})") from None
    missing = [name for name in missing if name not in tied and name.removesuffix("weight") not in stored]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the hybrid (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for prefix, (module, name, q, scale) in stored.items():  # after the thresholds: the master is scale x Q / step
        if scale is None:
            raise ValueError(f"{path}: {prefix}weight_q has no {prefix}weight_scale beside it")
        group = module.weight_group or q.shape[-1]
        try:
            module.pin_integer_weight(name, IntegerWeight(q=q, scale=scale.to(torch.float32), bits=module.weight_bits,
                                                          group_size=group))
        except ValueError as error:
            raise ValueError(f"{path}: {prefix}weight_q: {error}") from None

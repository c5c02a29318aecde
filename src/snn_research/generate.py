"""Text generation from a teacher or hybrid folder, with spike rate and energy per generated token.

The loop is written here rather than taken from ``model.generate`` so that every
generated token comes from its own forward pass over exactly one new position
(a KV cache holds the rest): the spike counts that ``SpikeRecorder`` collects
during that pass are the token's own, and its energy is counted from them.

Energy per token follows ``evaluation/energy.py`` rule for rule (hooks on the
analog linears and norms that ran, ``block_costs`` for the spiking FFNs, spikes
times fan-out for the synaptic events), with one difference that comes from
decoding: attention is priced at the keys this position really attends to
(``position + 1``, capped by the sliding window), not at the mean over a
sequence. Summed over the positions of a sequence and divided by its length,
the per-token figures are what ``measure_energy`` reports for that sequence.

The prompt minus its last token is run once to fill the cache (not reported);
the first generated token comes from the pass over the prompt's last token.
With the ``rate`` encoder each pass draws its own Bernoulli noise (every
encoder call is a new draw, numbered from the model's loading: ``adapter.py``),
so cached generation is a different (equally valid) noise draw from a
full-sequence pass, a second generation with the same model draws on, and a
freshly loaded model given the same prompt and options repeats the first.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from snn_research.evaluation.energy import (
    attention_ops,
    block_costs,
    ffn_elementwise_macs,
    norm_cost,
    spike_fed_linears,
)
from snn_research.models.hybrid_transformer import SpikeRecorder, SpikingMLP, find_mlps, site_key, spiking_units


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    sample: bool = False  # greedy unless set
    temperature: float = 1.0  # sampling only
    top_k: int | None = None  # sampling only; None keeps the whole vocabulary
    seed: int = 0  # sampling only: the draws come from a generator seeded with it
    stop_at_eos: bool = True  # stop after the tokenizer's (or generation config's) end-of-sequence token
    e_mac_pj: float = 4.6  # 45 nm FP32 (Horowitz, ISSCC 2014), as params.yaml's energy section
    e_ac_pj: float = 0.9

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None for the whole vocabulary (got {self.top_k})")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (got {self.seed})")


@dataclass
class TokenStats:
    token_id: int
    text: str  # what this token adds to the decoded continuation
    position: int  # position of the input token whose forward pass chose it
    spike_rate: float | None  # spikes per neuron per time step over all sites; None without spiking FFNs
    energy_pj: float  # the whole model's forward pass over that position
    ffn_energy_pj: float
    dense_energy_pj: float  # the same pass with every FFN dense (the teacher's cost)
    dense_ffn_energy_pj: float


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    tokens: list[TokenStats]
    seconds: float  # wall time of the decoding steps (prefill excluded)
    time_steps: int | None = None  # T of a hybrid; None for a teacher
    model: str = ""
    kind: str = "teacher"  # or "hybrid"
    options: GenerationOptions = field(default_factory=GenerationOptions)

    def summary(self) -> dict[str, float | int | None]:
        count = len(self.tokens)

        def mean(name: str) -> float:
            return sum(getattr(t, name) for t in self.tokens) / count

        rates = [t.spike_rate for t in self.tokens if t.spike_rate is not None]
        return {
            "tokens": count,
            "tokens_per_s": count / self.seconds if self.seconds > 0 else None,
            # every token drives the same neurons for the same T: the mean of the rates is the pooled rate
            "spike_rate": sum(rates) / len(rates) if rates else None,
            "energy_pj_per_token": mean("energy_pj"),
            "ffn_energy_pj_per_token": mean("ffn_energy_pj"),
            "model_energy_ratio": mean("energy_pj") / mean("dense_energy_pj"),
            "ffn_energy_ratio": mean("ffn_energy_pj") / mean("dense_ffn_energy_pj"),
        }

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def load_model_folder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, kind) of a hybrid checkpoint (has ``hybrid.json``) or a teacher folder."""
    from transformers import AutoTokenizer

    from snn_research.conversion.ann_to_snn_converter import METADATA_FILE, load_hybrid
    from snn_research.teacher import load_teacher

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: model folder not found")
    if not (folder / METADATA_FILE).is_file():
        model, tokenizer = load_teacher(folder, dtype)
        return model, tokenizer, "teacher"
    model = load_hybrid(folder, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{folder}: no usable tokenizer in the hybrid checkpoint "
                         f"({type(error).__name__}: {error})") from None
    return model, tokenizer, "hybrid"


def next_token(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator) -> int:
    """The token chosen from one position's logits (V,): argmax, or a seeded top-k draw."""
    if not options.sample:
        return int(logits.argmax())
    scores = logits.detach().float().cpu() / options.temperature
    if options.top_k is not None and options.top_k < scores.numel():
        kth = torch.topk(scores, options.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


class _StepEnergy:
    """Counts one single-position forward pass's operations by the rules of ``evaluation/energy.py``."""

    def __init__(self, model: nn.Module, e_mac_pj: float, e_ac_pj: float) -> None:
        self.model, self.e_mac_pj, self.e_ac_pj = model, e_mac_pj, e_ac_pj
        units = list(spiking_units(model))
        self.blocks = {block.path: block for block in units if isinstance(block, SpikingMLP)}
        self.costs = [(block.path, block_costs(block)) for block in units]  # FFNs and sites outside them
        fed_by_spikes = spike_fed_linears(units)
        mlp_paths = [location.path for location in find_mlps(model)]
        self.analog_mlps = [model.get_submodule(path) for path in mlp_paths if path not in self.blocks]
        self.shared = [0.0, 0.0]  # (MACs, ACs) outside the FFNs, the same for hybrid and dense
        self.shared_ffn = [0.0, 0.0]  # (MACs, ACs) of FFNs left analog
        self.counting = False  # the prefill is not reported
        self.handles = []
        for name, module in model.named_modules():
            mlp_path = next((path for path in mlp_paths if name.startswith(path + ".")), None)
            if isinstance(module, (nn.Linear, Conv1D)) and mlp_path not in self.blocks and name not in fed_by_spikes:
                fan_in, fan_out = ((module.in_features, module.out_features) if isinstance(module, nn.Linear)
                                   else module.weight.shape)
                target = self.shared_ffn if mlp_path else self.shared
                bias_adds = fan_out if module.bias is not None else 0

                def linear_hook(_m, args, _out, target=target, macs=fan_in * fan_out, acs=bias_adds):
                    rows = args[0].numel() // args[0].shape[-1]
                    self._add(target, rows * macs, rows * acs)

                self.handles.append(module.register_forward_hook(linear_hook))
            elif (cost := norm_cost(module)) is not None:
                self.handles.append(module.register_forward_hook(
                    lambda _m, _args, out, cost=cost: self._add(self.shared, cost * out.numel(), 0)))

    def _add(self, target: list[float], macs: float, acs: float) -> None:
        if self.counting:
            target[0] += macs
            target[1] += acs

    def _pj(self, macs: float, acs: float) -> float:
        return macs * self.e_mac_pj + acs * self.e_ac_pj

    def run(self, forward, position: int) -> tuple[object, dict[str, float | None]]:
        """``forward()`` over the token at ``position`` (one new position); its output and energy."""
        self.shared[:], self.shared_ffn[:] = [0.0, 0.0], [0.0, 0.0]
        self.counting = True
        try:
            with SpikeRecorder(self.model) as recorder:
                output = forward()
        finally:
            self.counting = False
        shared_pj = self._pj(*self.shared) + self._pj(*attention_ops(self.model.config, 0, position=position))
        ffn_pj = self._pj(*self.shared_ffn)
        for mlp in self.analog_mlps:  # activation (and gating multiply), as energy.py
            ffn_pj += self._pj(ffn_elementwise_macs(mlp), 0.0)
        hybrid_ffn_pj, dense_ffn_pj = ffn_pj, ffn_pj
        hybrid_proj_pj, dense_proj_pj = 0.0, 0.0  # spiking sites outside the FFNs
        spikes, neuron_steps = 0.0, 0.0
        for path, costs in self.costs:
            dense = costs.teacher_pj(self.e_mac_pj, self.e_ac_pj)
            synaptic = 0.0
            for site, fan_out in costs.fan_outs.items():
                key = site_key(path, site)
                synaptic += recorder.spikes[key] / recorder.tokens[key] * fan_out
                spikes += recorder.spikes[key]
                neuron_steps += recorder.neuron_steps[key]
            hybrid = synaptic * self.e_ac_pj + self._pj(
                costs.hybrid_analog_macs + costs.neuron_macs,
                costs.hybrid_analog_acs + costs.neuron_acs + costs.step_weight_acs)
            if costs.ffn:
                hybrid_ffn_pj, dense_ffn_pj = hybrid_ffn_pj + hybrid, dense_ffn_pj + dense
            else:
                hybrid_proj_pj, dense_proj_pj = hybrid_proj_pj + hybrid, dense_proj_pj + dense
        return output, {
            "spike_rate": spikes / neuron_steps if self.costs else None,
            "energy_pj": shared_pj + hybrid_ffn_pj + hybrid_proj_pj,
            "ffn_energy_pj": hybrid_ffn_pj,
            "dense_energy_pj": shared_pj + dense_ffn_pj + dense_proj_pj,
            "dense_ffn_energy_pj": dense_ffn_pj,
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return ids


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], options: GenerationOptions = GenerationOptions(),
                 eos_ids: Collection[int] = ()) -> tuple[list[int], list[dict[str, float | None]], float]:
    """(generated ids, per-token energy figures, decoding seconds): one cached forward pass per token."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(options.seed)
    meter = _StepEnergy(model, options.e_mac_pj, options.e_ac_pj)
    sequence = list(prompt_ids)
    # transformers renamed `past_key_values` to `cache` within 5.x, and the project allows both;
    # the cache object is filled in place, so only the argument's name differs
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {cache_argument: DynamicCache(config=model.config)}
    tokens, stats = [], []
    try:
        if len(sequence) > 1:
            model(input_ids=torch.tensor([sequence[:-1]], device=device), use_cache=True, logits_to_keep=1, **cache)
        start = time.perf_counter()
        while len(tokens) < options.max_new_tokens:
            last = torch.tensor([[sequence[-1]]], device=device)
            output, energy = meter.run(lambda: model(input_ids=last, use_cache=True, **cache), len(sequence) - 1)
            token = next_token(output.logits[0, -1], options, generator)
            tokens.append(token)
            stats.append(energy)
            sequence.append(token)
            if options.stop_at_eos and token in eos_ids:
                break
        seconds = time.perf_counter() - start
    finally:
        meter.remove()
    return tokens, stats, seconds


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """What each token adds to the decoded text; joined, they are the decoded text."""
    pieces, emitted = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith("\ufffd") and end < len(ids):  # a multi-byte character still open: its bytes show at its end
            pieces.append("")
            continue
        shared = len(os.path.commonprefix([emitted, text]))
        pieces.append(text[shared:])
        emitted = text
    return pieces


def generate(model: nn.Module, tokenizer, prompt: str, options: GenerationOptions = GenerationOptions(),
             name: str = "") -> Generation:
    """Continue ``prompt``; per generated token, its spike rate (hybrids) and energy."""
    if not prompt.strip():
        raise ValueError(f"prompt is empty (got {prompt!r})")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    eos = _eos_ids(model, tokenizer) if options.stop_at_eos else set()
    token_ids, stats, seconds = generate_ids(model, prompt_ids, options, eos)
    pieces = _pieces(tokenizer, token_ids)
    tokens = [TokenStats(token_id=token, text=piece, position=len(prompt_ids) - 1 + i, **energy)
              for i, (token, piece, energy) in enumerate(zip(token_ids, pieces, stats))]
    metadata = getattr(model, "hybrid_metadata", None)
    return Generation(
        prompt_ids=prompt_ids,
        token_ids=token_ids,
        text=tokenizer.decode(token_ids, skip_special_tokens=True),
        tokens=tokens,
        seconds=seconds,
        time_steps=metadata.plan.time_steps if metadata is not None else None,
        model=name,
        kind="hybrid" if any(True for _ in spiking_units(model)) else "teacher",
        options=options,
    )


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where two continuations differ; None if one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def summary_line(generation: Generation) -> str:
    figures = generation.summary()
    speed = f", {figures['tokens_per_s']:.1f} tokens/s" if figures["tokens_per_s"] else ""
    if generation.kind == "teacher":
        return (f"{generation.model}: {figures['tokens']} tokens{speed}, dense "
                f"{figures['energy_pj_per_token']:,.0f} pJ/token (FFN {figures['ffn_energy_pj_per_token']:,.0f})")
    return (f"{generation.model}: {figures['tokens']} tokens{speed}, T={generation.time_steps}, spike rate "
            f"{figures['spike_rate']:.3f}, {figures['energy_pj_per_token']:,.0f} pJ/token "
            f"({figures['model_energy_ratio']:.3f}x dense), FFN {figures['ffn_energy_pj_per_token']:,.0f} pJ/token "
            f"({figures['ffn_energy_ratio']:.3f}x dense)")


def token_table(generation: Generation):
    """A rich table: one row per generated token."""
    from rich.table import Table
    from rich.text import Text

    hybrid = generation.kind == "hybrid"
    table = Table(title=f"{generation.model} ({generation.kind})", title_justify="left")
    for column in ("#", "token", "text", "spike rate", "FFN pJ" if hybrid else "dense FFN pJ",
                   "model pJ" if hybrid else "dense model pJ"):
        table.add_column(column, justify="left" if column == "text" else "right")
    for i, token in enumerate(generation.tokens):
        table.add_row(
            str(i), str(token.token_id),
            Text(repr(token.text)[1:-1]),  # newlines and tabs stay visible, markup stays literal
            "-" if token.spike_rate is None else f"{token.spike_rate:.3f}",
            f"{token.ffn_energy_pj:,.0f}", f"{token.energy_pj:,.0f}",
        )
    return table


def runs_json(runs: list[Generation]) -> dict:
    out: dict = {"runs": [run.to_json() for run in runs]}
    if len(runs) == 2:
        out["first_difference"] = first_difference(runs[0].token_ids, runs[1].token_ids)
    return out


def print_runs(console, runs: list[Generation]) -> None:
    """Each run's token table, continuation and summary; for two, where their tokens first differ."""
    for run in runs:
        console.print(token_table(run))
        console.print(f"{run.model}: {run.text!r}", soft_wrap=True)
        console.print(summary_line(run), soft_wrap=True)
    if len(runs) != 2:
        return
    first, second = runs
    difference = first_difference(first.token_ids, second.token_ids)
    if difference is not None:
        a, b = first.tokens[difference], second.tokens[difference]
        console.print(f"first difference at generated token {difference}: {a.text!r} ({a.token_id}) in "
                      f"{first.model}, {b.text!r} ({b.token_id}) in {second.model}", soft_wrap=True)
    else:
        shared = min(len(first.token_ids), len(second.token_ids))
        console.print(f"the continuations agree on all {shared} tokens both generated", soft_wrap=True)


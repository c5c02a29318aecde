"""Clipping chosen by the FFN's output error, not by a fixed percentile.

A percentile threshold is a guess at the clipping point: too low and the
largest activations are clipped, too high and the quantisation grid (theta / L)
is coarse for everything else. Which side hurts more depends on the code (the
2^T-level weighted code tolerates a high clip far better than the T-level IF
code) and on the site. ``search_clipping`` measures it: for every spiking FFN,
on calibration tokens, it tries scaled copies of each site's calibrated
thresholds, plus the channel maxima seen on the same tokens, and keeps the
candidate with the lowest relative FFN output error

    || spiking_ffn(x) - teacher_ffn(x) ||^2 / || teacher_ffn(x) ||^2,

where ``x`` is the FFN's input in the teacher. Sites are searched in the order
the activation flows (the input site first, with the later sites at their
calibrated thresholds; then the next site with the input site's choice fixed).
The calibrated thresholds themselves (scale 1) are always a candidate, so the
result is never worse than the percentile it starts from on these tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from snn_research.models.hybrid_transformer import SpikingMLP, block_list, family_sites, spiking_mlps

DEFAULT_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


@dataclass(frozen=True)
class SiteChoice:
    key: str
    choice: str  # 'scale x<factor>' or 'channel max'
    error_before: float  # the block's relative output error with this site at its calibrated thresholds
    error_chosen: float  # ... and at the chosen ones (the earlier sites at their choices in both)


@dataclass(frozen=True)
class BlockError:
    path: str
    error_percentile: float  # relative FFN output error, every site at its calibrated thresholds
    error_chosen: float  # every site at its chosen thresholds


def _population(block: SpikingMLP, site: str) -> nn.Module:
    return getattr(block, f"{site}_encoder", None) or getattr(block, f"{site}_neurons")


def _log_threshold(population: nn.Module) -> nn.Parameter:
    neurons = getattr(population, "neurons", None)
    return (neurons if neurons is not None else population).log_threshold


def _capture_ffn_io(teacher: nn.Module, paths: list[str], batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's FFN input and output at every path, concatenated over the batches."""
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    outputs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for path in paths:
        def hook(_module, args, output, path=path):
            inputs[path].append(args[0].detach().flatten(0, -2))
            outputs[path].append(output.detach().flatten(0, -2))

        handles.append(teacher.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:  # the base model: the FFNs run, the LM head (and its logits) does not
                teacher.base_model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {p: (torch.cat(inputs[p]), torch.cat(outputs[p])) for p in paths}


def _site_input(block: SpikingMLP, site: str, x: torch.Tensor) -> torch.Tensor:
    """The activation a site's population sees, with the earlier sites at their current thresholds."""
    if site == family_sites(block.family)[0].name:  # the first site sees the FFN's input itself
        return x
    captured: list[torch.Tensor] = []
    population = _population(block, site)
    handle = population.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    _same_noise(block)
    try:
        block(x)
    finally:
        handle.remove()
    observed = captured[0]
    return observed.mean(0) if observed.dim() == x.dim() + 1 else observed  # GPT-2's hidden site sees (T, ...) currents


def _same_noise(block: SpikingMLP) -> None:
    """Restart a rate encoder's draws, so every candidate is scored on the same noise (like for like)."""
    for module in block.modules():
        if hasattr(module, "reset_noise"):
            module.reset_noise()


def _relative_error(block: SpikingMLP, x: torch.Tensor, target: torch.Tensor,
                    groups: torch.Tensor | None = None) -> float:
    """The relative output error over all rows; with ``groups`` (a group index per row), the worst group's."""
    _same_noise(block)
    out = block(x)
    if groups is None:
        return float((out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))
    count = int(groups.max()) + 1
    error = torch.zeros(count, dtype=torch.float64, device=out.device)
    energy = torch.zeros(count, dtype=torch.float64, device=out.device)
    error.index_add_(0, groups, (out - target).pow(2).sum(-1).double())
    energy.index_add_(0, groups, target.pow(2).sum(-1).double())
    present = torch.bincount(groups, minlength=count) > 0
    return float((error[present] / energy[present].clamp_min(1e-30)).max())


@torch.no_grad()
def search_clipping(
    hybrid: nn.Module,
    teacher: nn.Module,
    batches: list[torch.Tensor],
    scales: tuple[float, ...] = DEFAULT_SCALES,
    block_groups: torch.Tensor | None = None,
) -> tuple[list[SiteChoice], list[BlockError]]:
    """Set every spiking site's thresholds to the candidate with the lowest FFN output error.

    With ``block_groups`` (a group, e.g. a text domain, per block of the batches in order), the error scored
    is the worst group's relative error: a candidate that fits one domain and clips another loses.
    Returns the choice per site and, per block, the error at the calibrated and at the chosen thresholds.
    """
    if 1.0 not in scales:
        raise ValueError(f"scales must include 1.0, the calibrated thresholds (got {list(scales)})")
    if not batches:
        raise ValueError("the clipping search needs at least one calibration batch")
    blocks = list(spiking_mlps(hybrid))
    if not blocks:
        raise ValueError("the model has no spiking FFNs to search thresholds for")
    block_list(teacher)  # raises for an unsupported architecture
    io = _capture_ffn_io(teacher, [b.path for b in blocks], batches)
    groups = None
    if block_groups is not None:
        rows_per_block = batches[0].shape[1]
        if block_groups.numel() != sum(batch.shape[0] for batch in batches):
            raise ValueError(f"block_groups has {block_groups.numel()} entries for "
                             f"{sum(batch.shape[0] for batch in batches)} blocks")
        groups = block_groups.to(torch.long).repeat_interleave(rows_per_block).to(batches[0].device)
    choices, block_errors = [], []
    for block in blocks:
        was_training = block.training
        block.eval()
        x, target = io[block.path]
        error_percentile = _relative_error(block, x, target, groups)
        for spec in family_sites(block.family):
            parameter = _log_threshold(_population(block, spec.name))
            calibrated = parameter.detach().clone()
            candidates = {f"scale x{s:g}": calibrated + torch.log(torch.tensor(s)) for s in scales}
            observed = _site_input(block, spec.name, x)
            observed = observed.abs() if spec.signed else observed.clamp_min(0)
            maximum = observed.reshape(-1, observed.shape[-1]).amax(0)
            maximum = maximum if calibrated.numel() == maximum.numel() else maximum.amax().reshape(1)
            if bool((maximum > 0).all()):
                candidates["channel max"] = maximum.log().to(calibrated.dtype)
            errors = {}
            for name, value in candidates.items():
                parameter.copy_(value)
                errors[name] = _relative_error(block, x, target, groups)
            best = min(errors, key=lambda name: (errors[name], name != "scale x1"))
            parameter.copy_(candidates[best])
            choices.append(SiteChoice(f"{block.path}:{spec.name}", best, errors["scale x1"], errors[best]))
        block_errors.append(BlockError(block.path, error_percentile, _relative_error(block, x, target, groups)))
        block.train(was_training)
    return choices, block_errors

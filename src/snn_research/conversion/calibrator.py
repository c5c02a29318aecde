"""Streaming percentile calibration of the thresholds of every spiking site.

Forward hooks on the teacher collect, for every site an encoder or neuron
population will see, the magnitude of the activation (``|x|`` for signed sites,
``max(x, 0)`` for the unsigned input of IF/LIF neurons) into a per-channel
histogram with logarithmically spaced bins.

Memory and error. Each channel has ``bins_per_octave * (max_exponent -
min_exponent) + 2`` int32 counters (an underflow bin for magnitudes below
``2**min_exponent``, zeros included, and an overflow bin), so memory is fixed
by the model's width, never by the number of calibration tokens. The
percentile is the order statistic of rank ``ceil(p/100 * (n - 1))`` (NumPy's
``'higher'`` rule). The estimate is interpolated log-uniformly inside the bin
that holds that order statistic, so its relative error is below one bin's
width: ``2 ** (1 / bins_per_octave) - 1`` (2.19 % at the default 32 bins per
octave), for values inside the histogram's range. Estimates are clamped to the
exact running maximum of the channel, which is also tracked.

A per-layer percentile comes from the sum of the channel histograms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from snn_research.errors import format_validation_error

from snn_research.models.families import hook_point, site_channels
from snn_research.models.hybrid_transformer import site_locations


def check_percentile(percentile: float) -> float:
    if not (0.0 < float(percentile) <= 100.0) or math.isnan(percentile):
        raise ValueError(f"percentile must lie in (0, 100] (got {percentile!r})")
    return float(percentile)


class StreamingPercentile:
    """Per-channel log-spaced histogram of magnitudes; see the module docstring for the bound."""

    def __init__(self, channels: int, bins_per_octave: int = 32, min_exponent: int = -20, max_exponent: int = 16) -> None:
        if bins_per_octave < 1 or max_exponent <= min_exponent:
            raise ValueError(
                f"need bins_per_octave >= 1 and max_exponent > min_exponent "
                f"(got {bins_per_octave}, {min_exponent}, {max_exponent})"
            )
        self.channels = channels
        self.bins_per_octave = bins_per_octave
        self.min_exponent = min_exponent
        self.max_exponent = max_exponent
        self.inner_bins = bins_per_octave * (max_exponent - min_exponent)
        self.counts = torch.zeros(channels, self.inner_bins + 2, dtype=torch.int32)
        self.maximum = torch.zeros(channels, dtype=torch.float64)
        self.observed = 0  # values per channel

    @property
    def relative_error_bound(self) -> float:
        return 2.0 ** (1.0 / self.bins_per_octave) - 1.0

    def update(self, magnitudes: torch.Tensor) -> None:
        """Add a batch of non-negative magnitudes shaped (..., C)."""
        flat = magnitudes.detach().reshape(-1, self.channels).float()
        if flat.shape[0] == 0:
            return
        if self.observed + flat.shape[0] >= 2**31 - 1:
            raise ValueError("calibration exceeds 2**31 values per channel; use fewer calibration tokens")
        # float64 only on the CPU: some devices (MPS) have none
        self.maximum = torch.maximum(self.maximum, flat.amax(0).cpu().double())
        position = (torch.log2(flat) - self.min_exponent) * self.bins_per_octave
        # log2(0) = -inf lands in the underflow bin 0; inner bins are 1..inner_bins
        index = torch.floor(position).clamp_(min=-1, max=self.inner_bins).long() + 1
        index += torch.arange(self.channels, device=index.device) * (self.inner_bins + 2)
        histogram = torch.bincount(index.flatten(), minlength=self.channels * (self.inner_bins + 2))
        self.counts += histogram.view(self.channels, -1).to(torch.int32).cpu()
        self.observed += flat.shape[0]

    def _quantile(self, counts: torch.Tensor, maximum: torch.Tensor, percentile: float) -> torch.Tensor:
        """counts (R, bins) int64 -> the percentile of each row."""
        total = counts.sum(1)
        rank = torch.ceil((percentile / 100.0) * (total - 1).double()).long()  # 0-based order statistic
        cumulative = counts.cumsum(1)
        bin_index = torch.searchsorted(cumulative, rank.unsqueeze(1), right=True).squeeze(1)
        bin_index = bin_index.clamp(max=counts.shape[1] - 1)
        below = torch.where(bin_index > 0, cumulative.gather(1, (bin_index - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        in_bin = counts.gather(1, bin_index.unsqueeze(1)).squeeze(1).clamp(min=1)
        fraction = ((rank - below).double() + 0.5) / in_bin.double()
        lower_edge = self.min_exponent + (bin_index - 1).double() / self.bins_per_octave
        value = torch.pow(2.0, lower_edge + fraction / self.bins_per_octave)
        value = torch.where(bin_index == 0, torch.zeros_like(value), value)  # underflow: treat as 0
        overflow = bin_index == counts.shape[1] - 1
        value = torch.where(overflow, maximum, value)
        return torch.minimum(value, maximum)

    def per_channel(self, percentile: float) -> torch.Tensor:
        """(C,) float64 percentiles."""
        check_percentile(percentile)
        self._check_observed()
        return self._quantile(self.counts.long(), self.maximum, percentile)

    def per_layer(self, percentile: float) -> float:
        check_percentile(percentile)
        self._check_observed()
        merged = self.counts.long().sum(0, keepdim=True)
        return float(self._quantile(merged, self.maximum.max().reshape(1), percentile)[0])

    def _check_observed(self) -> None:
        if self.observed == 0:
            raise ValueError("calibration saw no tokens: the calibration iterator was empty")


@dataclass
class SiteCalibration:
    key: str
    layer: int | None  # None: the LM head's site
    site: str
    signed: bool
    channel_thresholds: torch.Tensor  # (C,) float32
    layer_threshold: float
    maximum: float
    values_per_channel: int


@dataclass
class CalibrationResult:
    percentile: float
    bins_per_octave: int
    relative_error_bound: float
    tokens: int
    floor: float  # thresholds never go below this (a channel that never fired)
    sites: dict[str, SiteCalibration] = field(default_factory=dict)

    def thresholds(self, granularity: str) -> dict[str, torch.Tensor]:
        if granularity == "channel":
            return {key: site.channel_thresholds for key, site in self.sites.items()}
        if granularity == "layer":
            return {key: torch.tensor([site.layer_threshold]) for key, site in self.sites.items()}
        raise ValueError(f"granularity must be 'channel' or 'layer' (got {granularity!r})")


class Calibrator:
    """Hooks the chosen sites of a teacher and streams their activations into histograms.

    ``sites`` are site groups (``ffn``, ``qkv``, ``o``, ``head``; see ``models/families.py``), in
    the chosen ``layers`` (null: every block).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[int] | None = None,
        bins_per_octave: int = 32,
        min_exponent: int = -20,
        max_exponent: int = 16,
        sites=("ffn",),
    ) -> None:
        self.model = model
        self.histograms: dict[str, StreamingPercentile] = {}
        self.meta: dict[str, tuple[int | None, str, bool]] = {}
        self.tokens = 0
        self._handles = []
        self._needs_head = False
        for location in site_locations(model, layers, sites):
            spec, scope = location.spec, model.get_submodule(location.path)
            self.histograms[location.key] = StreamingPercentile(
                site_channels(spec, scope), bins_per_octave, min_exponent, max_exponent)
            self.meta[location.key] = (location.layer, spec.name, spec.signed)
            self._handles.append(_register(hook_point(spec, scope), spec.hook_kind, self.histograms[location.key],
                                           spec.signed))
            self._needs_head = self._needs_head or spec.scope == "model"

    def observe(self, input_ids: torch.Tensor) -> None:
        """Run the teacher on a batch: its decoder stack only, unless a site reads the LM head's input."""
        with torch.no_grad():
            if self._needs_head:
                self.model(input_ids=input_ids, use_cache=False)
            else:
                self.model.base_model(input_ids=input_ids, use_cache=False)
        self.tokens += int(input_ids.numel())

    def run(self, batches: Iterable[torch.Tensor]) -> int:
        for input_ids in batches:
            self.observe(input_ids)
        return self.tokens

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self, percentile: float = 99.9) -> CalibrationResult:
        check_percentile(percentile)
        if self.tokens == 0:
            raise ValueError("calibration saw no tokens: the calibration iterator was empty")
        any_histogram = next(iter(self.histograms.values()))
        floor = 2.0 ** any_histogram.min_exponent
        result = CalibrationResult(
            percentile=percentile,
            bins_per_octave=any_histogram.bins_per_octave,
            relative_error_bound=any_histogram.relative_error_bound,
            tokens=self.tokens,
            floor=floor,
        )
        for key, histogram in self.histograms.items():
            layer, site, signed = self.meta[key]
            result.sites[key] = SiteCalibration(
                key=key,
                layer=layer,
                site=site,
                signed=signed,
                channel_thresholds=histogram.per_channel(percentile).clamp(min=floor).float(),
                layer_threshold=max(histogram.per_layer(percentile), floor),
                maximum=float(histogram.maximum.max()),
                values_per_channel=histogram.observed,
            )
        return result


def _register(module: nn.Module, kind: str, histogram: StreamingPercentile, signed: bool):
    def magnitudes(x: torch.Tensor) -> torch.Tensor:
        return x.abs() if signed else x.clamp(min=0)

    if kind == "pre":
        return module.register_forward_pre_hook(lambda _m, args: histogram.update(magnitudes(args[0])))
    return module.register_forward_hook(lambda _m, _args, output: histogram.update(magnitudes(output)))


CALIBRATION_JSON = "calibration.json"
CALIBRATION_TENSORS = "thresholds.safetensors"


class SiteSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    layer: int | None
    site: str
    signed: bool
    layer_threshold: float
    maximum: float
    values_per_channel: int
    channels: int
    channel_threshold_min: float
    channel_threshold_median: float
    channel_threshold_max: float


class CalibrationFile(BaseModel):
    """``calibration.json``: the per-layer figures; per-channel tensors are in ``thresholds.safetensors``."""

    model_config = ConfigDict(extra="forbid")
    percentile: float
    bins_per_octave: int
    relative_error_bound: float
    tokens: int
    floor: float
    data_sha256: str
    sites: list[SiteSummary]


def save_calibration(result: CalibrationResult, folder: Path, data_sha256: str) -> CalibrationFile:
    folder = Path(folder)
    summary = CalibrationFile(
        percentile=result.percentile,
        bins_per_octave=result.bins_per_octave,
        relative_error_bound=result.relative_error_bound,
        tokens=result.tokens,
        floor=result.floor,
        data_sha256=data_sha256,
        sites=[
            SiteSummary(
                key=site.key,
                layer=site.layer,
                site=site.site,
                signed=site.signed,
                layer_threshold=site.layer_threshold,
                maximum=site.maximum,
                values_per_channel=site.values_per_channel,
                channels=int(site.channel_thresholds.numel()),
                channel_threshold_min=float(site.channel_thresholds.min()),
                channel_threshold_median=float(site.channel_thresholds.median()),
                channel_threshold_max=float(site.channel_thresholds.max()),
            )
            for site in result.sites.values()
        ],
    )
    safetensors.torch.save_file(
        {key: site.channel_thresholds.contiguous() for key, site in result.sites.items()},
        str(folder / CALIBRATION_TENSORS),
    )
    (folder / CALIBRATION_JSON).write_text(summary.model_dump_json(indent=2))
    return summary


def load_calibration(folder: Path) -> tuple[CalibrationResult, CalibrationFile]:
    folder = Path(folder)
    json_path, tensor_path = folder / CALIBRATION_JSON, folder / CALIBRATION_TENSORS
    try:
        summary = CalibrationFile.model_validate_json(json_path.read_text())
    except OSError as error:
        raise ValueError(f"{json_path}: cannot read calibration ({error})") from None
    except ValidationError as error:
        raise ValueError(f"{json_path}: invalid calibration: {format_validation_error(error)}") from None
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{tensor_path}: cannot read calibration tensors ({error})") from None
    result = CalibrationResult(
        percentile=summary.percentile,
        bins_per_octave=summary.bins_per_octave,
        relative_error_bound=summary.relative_error_bound,
        tokens=summary.tokens,
        floor=summary.floor,
    )
    for site in summary.sites:
        if site.key not in tensors:
            raise ValueError(f"{tensor_path}: tensor {site.key!r} named by {json_path.name} is missing")
        result.sites[site.key] = SiteCalibration(
            key=site.key,
            layer=site.layer,
            site=site.site,
            signed=site.signed,
            channel_thresholds=tensors[site.key].float(),
            layer_threshold=site.layer_threshold,
            maximum=site.maximum,
            values_per_channel=site.values_per_channel,
        )
    return result, summary

"""Per-layer view of a hybrid: how far each spiking FFN's output is from its teacher FFN."""

from __future__ import annotations

import torch
from torch import nn

from snn_research.io import significant
from snn_research.models.hybrid_transformer import SpikingMLP, find_mlps


@torch.no_grad()
def ffn_output_errors(teacher: nn.Module, hybrid: nn.Module, input_ids: torch.Tensor) -> dict[int, float]:
    """Relative squared error ||y_hybrid - y_teacher||^2 / ||y_teacher||^2 per converted layer.

    Both FFNs receive the input the hybrid's FFN actually received, so the figure
    isolates the error that layer adds (not the error it inherits). Kept to 4 significant digits
    (``io.significant``), which two thread counts agree on.
    """
    teacher_mlps = {loc.layer: loc.module for loc in find_mlps(teacher)}
    errors: dict[int, list[float]] = {}
    handles = []
    for location in find_mlps(hybrid):
        if not isinstance(location.module, SpikingMLP):
            continue

        def hook(_module, args, output, layer=location.layer):
            reference = teacher_mlps[layer](args[0])
            error = (output - reference).square().sum() / reference.square().sum().clamp(min=1e-30)
            errors.setdefault(layer, []).append(float(error))

        handles.append(location.module.register_forward_hook(hook))
    try:
        hybrid(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: significant(sum(values) / len(values)) for layer, values in sorted(errors.items())}

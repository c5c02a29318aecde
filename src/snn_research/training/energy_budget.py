"""A differentiable FFN energy budget for training.

Learned thresholds drift down (a smaller threshold clips less), and every step
down adds spikes: left alone, training buys quality with energy. The budget
adds ``weight * max(0, ratio - budget)`` to the loss, where ``ratio`` is the
estimated FFN energy of the hybrid over that of the dense teacher FFNs, counted
with the same rules as ``evaluation/energy.py``: the synaptic events of this
batch (spike counts x fan-out, which carry the encoders' straight-through and
the neurons' surrogate gradients) plus the fixed per-token costs.

The fixed costs (neuron updates, bias currents, leaks) grow with T, so they
are read at each block's current T: under a T curriculum (16 -> 8, say) the
penalty charges what the pass being trained really costs. Costs are cached
per (block, T).
"""

from __future__ import annotations

import torch
from torch import nn

from snn_research.evaluation.energy import BlockCosts, block_costs
from snn_research.models.hybrid_transformer import SpikingMLP, spiking_mlps


class EnergyBudget:
    """Use as ``with budget: loss = task + budget.penalty(tokens)`` around the forward pass."""

    def __init__(self, model: nn.Module, budget: float, weight: float, e_mac_pj: float, e_ac_pj: float) -> None:
        self.blocks: list[SpikingMLP] = list(spiking_mlps(model))
        if not self.blocks:
            raise ValueError("an energy budget needs a model with spiking blocks")
        self.budget, self.weight, self.e_mac_pj, self.e_ac_pj = budget, weight, e_mac_pj, e_ac_pj
        for block in self.blocks:  # the same ops in a recomputed layer as in the metered forward
            block.counts_in_training = True
        self._costs: dict[tuple[int, int], BlockCosts] = {}
        # the dense FFNs' cost has no T in it
        self.teacher_pj = sum(self.costs(b).teacher_pj(e_mac_pj, e_ac_pj) for b in self.blocks)
        self.last_ratio = float("nan")

    def costs(self, block: SpikingMLP) -> BlockCosts:
        """The block's per-token costs at its current T."""
        key = (id(block), block.plan_time_steps)
        if key not in self._costs:
            self._costs[key] = block_costs(block)
        return self._costs[key]

    @property
    def fixed_pj(self) -> float:
        """Per-token energy of the spiking FFNs that does not depend on spikes, at the blocks' current T."""
        return sum(self.costs(b).fixed_hybrid_pj(self.e_mac_pj, self.e_ac_pj) for b in self.blocks)

    def __enter__(self) -> "EnergyBudget":
        for block in self.blocks:
            block.spike_sink = []
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.spike_sink = None

    def ratio(self, tokens: int) -> torch.Tensor:
        """Estimated FFN energy ratio of the forward pass(es) since entering, per token."""
        synaptic = None
        for block in self.blocks:
            fan_outs = self.costs(block).fan_outs
            for site, spikes in block.spike_sink or []:
                events = spikes.abs().sum().float() * fan_outs[site]
                synaptic = events if synaptic is None else synaptic + events
        if synaptic is None:  # no pass since entering: only the fixed part
            synaptic = torch.zeros((), device=next(self.blocks[0].parameters()).device)
        return (synaptic * self.e_ac_pj / tokens + self.fixed_pj) / self.teacher_pj

    def penalty(self, tokens: int) -> torch.Tensor:
        ratio = self.ratio(tokens)
        self.last_ratio = float(ratio.detach())
        for block in self.blocks:  # the counts are consumed; free them with the graph
            if block.spike_sink is not None:
                block.spike_sink.clear()
        return self.weight * torch.relu(ratio - self.budget)

"""Meta-plasticity for real-valued spiking weights: consolidated weights resist updates that undo them.

What this is, plainly: an EWC-style gate on the optimizer's step. The consolidated values W* are the
weights when adaptation began and the importances are measured once, then, on old-domain blocks; neither
changes as the stream goes. It borrows the shape of Laborieux et al.'s factor, not their rule, in which
consolidation grows with the hidden weight as learning goes on.

Reference rule (Laborieux, Ernoult, Hirtzlin and Querlioz, "Synaptic metaplasticity in binarized neural
networks", Nat. Commun. 12, 2549, 2021). A binarized network keeps a hidden real weight W_h whose sign is
the binary weight; an update that pushes W_h toward a sign flip is scaled by

    f_meta = 1 - tanh^2(m * |W_h|),

while an update that grows |W_h| is applied in full. |W_h| thus measures how consolidated a weight is,
and the strength m sets how hard consolidation resists.

Here the weights are real-valued and pretrained: no sign flip stands for "forgetting", and a weight's
magnitude says nothing about what the old domain needs of it. What undoes the old domain is moving a
weight away from its consolidated value W*, the value it had when adaptation began. So the rule becomes,
per weight i, for the update Delta_i the optimizer proposes:

    Delta_i <- f_i * Delta_i   if Delta_i moves w_i away from W*_i (sign(Delta_i) = sign(w_i - W*_i), or w_i = W*_i)
    Delta_i <- Delta_i         if it moves w_i back toward W*_i without passing it
    w_i     <- W*_i + f_i * (w_i + Delta_i - W*_i)   if it passes W*_i: the part beyond W*_i moves away
    f_i = 1 - tanh^2(m * I_i)

with I_i the weight's importance to the old domain in place of |W_h|: the diagonal Fisher information,
the mean over old-domain blocks of the squared gradient of the next-token loss (the EWC importance,
Kirkpatrick et al., PNAS 2017), divided by its mean over its parameter group (the weights; the
log-thresholds), so that m is unitless in each and the thresholds' larger gradients do not set the
weights' scale. A free
weight (I = 0) moves as the optimizer says; an important one hardly moves away from W*. Unlike EWC's
quadratic penalty, the rule adds no loss term and no gradient: it rescales the step, as the reference
rule does, so its cost is one pass over the adapted weights per update.
"""

from __future__ import annotations

import torch
from torch import nn


def meta_factor(importance: torch.Tensor, strength: float) -> torch.Tensor:
    """f_meta = 1 - tanh^2(m * I), elementwise."""
    return 1.0 - torch.tanh(strength * importance).square()


def apply_meta(weight: torch.Tensor, before: torch.Tensor, consolidated: torch.Tensor, importance: torch.Tensor,
               strength: float) -> None:
    """Rescale in place the update ``weight - before`` just made: updates away from ``consolidated`` by f_meta."""
    delta = weight - before
    offset = before - consolidated
    factor = meta_factor(importance, strength)
    away = (delta * offset > 0) | (offset == 0)
    passes = (delta * offset < 0) & ((offset + delta) * offset < 0)
    result = torch.where(away, before + factor * delta, weight)
    result = torch.where(passes, consolidated + factor * (offset + delta), result)
    weight.copy_(result)


def fisher_importance(model: nn.Module, groups: dict[str, dict[str, nn.Parameter]], blocks: torch.Tensor,
                      loss_fn) -> dict[str, torch.Tensor]:
    """Mean squared gradient of ``loss_fn(model, block)`` per parameter over ``blocks`` (one at a time),
    divided by its mean over the parameter's group (``groups``: group name -> parameter name -> parameter).
    An empty group is skipped; a group whose gradients are all zero is refused, naming it."""
    parameters = {name: p for group in groups.values() for name, p in group.items()}
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    for block in blocks:
        model.zero_grad(set_to_none=True)
        loss_fn(model, block[None]).backward()
        for name, p in parameters.items():
            if p.grad is not None:
                totals[name] += p.grad.detach().float().square()
    model.zero_grad(set_to_none=True)
    count = max(len(blocks), 1)
    importance = {}
    for group, members in groups.items():
        if not members:
            continue
        elements = sum(totals[name].numel() for name in members)
        mean = sum(float(totals[name].sum()) for name in members) / count / elements
        if mean == 0.0:
            raise ValueError(f"every parameter of group {group!r} has zero gradient on the old-domain blocks: "
                             "no importance to weigh")
        importance.update({name: totals[name] / count / mean for name in members})
    return importance

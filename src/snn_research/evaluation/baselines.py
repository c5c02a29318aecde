"""The hybrid's energy against the baselines a sceptic would pick, from one ``EnergyReport``.

The hybrid is priced as it runs here: FP32 weights and membranes on the 45 nm
FP32 table (``e_mac_pj``, ``e_ac_pj``). The baselines re-price the teacher's
counts:

- INT8: every MAC is an 8-bit multiply plus an 8-bit add, 0.23 pJ (as the FP32
  MAC of 4.6 pJ is a 3.7 pJ multiply plus a 0.9 pJ add), every add of a bias a
  32-bit integer add. Real INT8 inference accumulates in 32 bits (0.2 + 0.1 pJ);
  pricing the accumulate as an 8-bit add is a lower bound that favours the ANN.
- Low-bit: the linear maps of the spiking FFNs read activations of b bits, as
  many as the spike count of the site they replace can take (b = ceil(log2(2L + 1))
  for an encoder of L levels per sign), with 8-bit weights. Assumed MAC energy:
  the multiplier scales with the activation's bit width, ``e_mult_int8 * b / 8``,
  plus the 8-bit add. Everything else is INT8.

Parts the two models share (attention, norms, embeddings, the linears that read
no spikes) are priced on the baseline's table in both numerator and denominator,
so a whole-model ratio differs from 1 only through the spiking sites; the FFN
ratios take the FFN sites only.

Memory: weights are read at ``e_read_pj_per_byte`` per byte. The ANN reads each
weight once per token. The hybrid reads its spiking linears' weights once per
time step (event-driven hardware, no reuse across steps) or once per token
(the count-based design this code runs: each spiking linear runs once on the
spike counts); both are reported.

Break-even spike rate: the rate (spikes per neuron per step) at which the
hybrid's spiking FFNs cost as much as the baseline's dense ones. Overall, every
site at the same rate; per site, the other sites of its block at their
measured rates. 0 means no rate saves energy.
"""

from __future__ import annotations

from dataclasses import dataclass

from snn_research.evaluation.energy import SPIKING_COMPONENTS, BlockEnergy, EnergyReport
from snn_research.models.hybrid_transformer import site_key


@dataclass(frozen=True)
class Prices:
    """Per-operation energies in pJ (defaults: Horowitz, ISSCC 2014, 45 nm)."""

    e_mac_pj: float = 4.6
    e_ac_pj: float = 0.9
    e_mult_int8_pj: float = 0.2
    e_add_int8_pj: float = 0.03
    e_add_int32_pj: float = 0.1
    e_read_pj_per_byte: float = 1.25

    @classmethod
    def from_params(cls, energy) -> "Prices":
        return cls(energy.e_mac_pj, energy.e_ac_pj, energy.e_mult_int8_pj, energy.e_add_int8_pj,
                   energy.e_add_int32_pj, energy.e_read_pj_per_byte)

    @property
    def e_mac_int8_pj(self) -> float:
        return self.e_mult_int8_pj + self.e_add_int8_pj

    def e_mac_lowbit_pj(self, bits: int) -> float:
        """b-bit activation x 8-bit weight: the multiplier scales with b, the add stays 8-bit."""
        return self.e_mult_int8_pj * bits / 8 + self.e_add_int8_pj


@dataclass(frozen=True)
class _Table:
    mac: float
    ac: float
    lowbit: bool = False


def _tables(prices: Prices) -> dict[str, _Table]:
    int8 = _Table(prices.e_mac_int8_pj, prices.e_add_int32_pj)
    return {"fp32": _Table(prices.e_mac_pj, prices.e_ac_pj), "int8": int8,
            "lowbit": _Table(int8.mac, int8.ac, lowbit=True)}


def _shared_pj(report: EnergyReport, table: _Table, ffn_only: bool) -> float:
    return sum(macs * table.mac + acs * table.ac for name, (macs, acs) in report.hybrid_ops.items()
               if name not in SPIKING_COMPONENTS and (not ffn_only or name.startswith("ffn")))


def teacher_block_pj(block: BlockEnergy, prices: Prices, table: _Table) -> float:
    """The dense FFN that ``block`` replaced, on ``table``."""
    costs = block.costs
    linear = costs.teacher_linear_macs
    if table.lowbit:
        linear_pj = sum(costs.neurons[s] * f * prices.e_mac_lowbit_pj(costs.bits[s]) for s, f in costs.fan_outs.items())
    else:
        linear_pj = linear * table.mac
    return linear_pj + (costs.teacher_macs - linear) * table.mac + costs.teacher_acs * table.ac


def hybrid_block_pj(block: BlockEnergy, prices: Prices, spikes: dict[str, float] | None = None) -> float:
    """The spiking FFN as it runs (FP32 table), at its measured or at the given spikes per token."""
    spikes = block.spikes_per_token if spikes is None else spikes
    synaptic = sum(spikes[s] * f for s, f in block.costs.fan_outs.items())
    return block.costs.fixed_hybrid_pj(prices.e_mac_pj, prices.e_ac_pj) + synaptic * prices.e_ac_pj


def _break_even(budget_pj: float, step_synapses: float, prices: Prices) -> float:
    """Rate r with budget = r x step_synapses x E_AC; 0 when the budget is spent before any spike."""
    if step_synapses <= 0:
        return 0.0
    return max(0.0, budget_pj / (step_synapses * prices.e_ac_pj))


def site_break_even(block: BlockEnergy, site: str, prices: Prices, table: _Table) -> float:
    """Rate at ``site`` at which its block costs as much as the dense FFN, other sites as measured."""
    costs = block.costs
    others = sum(block.spikes_per_token[s] * f for s, f in costs.fan_outs.items() if s != site)
    budget = (teacher_block_pj(block, prices, table) - costs.fixed_hybrid_pj(prices.e_mac_pj, prices.e_ac_pj)
              - others * prices.e_ac_pj)
    return _break_even(budget, costs.time_steps * costs.neurons[site] * costs.fan_outs[site], prices)


def compare(report: EnergyReport, prices: Prices) -> dict[str, float]:
    """Ratios against every baseline, break-even rates and the weight bytes per token."""
    tables = _tables(prices)
    ffn_blocks = [b for b in report.blocks if b.ffn]  # the FFN ratios leave sites outside the FFN out
    hybrid_ffn = sum(hybrid_block_pj(b, prices) for b in ffn_blocks)
    hybrid_all = sum(hybrid_block_pj(b, prices) for b in report.blocks)
    out: dict[str, float] = {}
    for name, table in tables.items():
        teacher_ffn = sum(teacher_block_pj(b, prices, table) for b in ffn_blocks)
        teacher_all = sum(teacher_block_pj(b, prices, table) for b in report.blocks)
        shared_ffn, shared = _shared_pj(report, table, True), _shared_pj(report, table, False)
        suffix = "" if name == "fp32" else f"_{name}"
        out[f"ffn_energy_ratio{suffix}"] = (hybrid_ffn + shared_ffn) / (teacher_ffn + shared_ffn)
        out[f"model_energy_ratio{suffix}"] = (hybrid_all + shared) / (teacher_all + shared)
        if name != "lowbit":
            fixed = sum(b.costs.fixed_hybrid_pj(prices.e_mac_pj, prices.e_ac_pj) for b in report.blocks)
            step_synapses = sum(b.costs.time_steps * b.costs.neurons[s] * f
                                for b in report.blocks for s, f in b.costs.fan_outs.items())
            teacher_blocks = teacher_all
            out[f"break_even_spike_rate{suffix}"] = _break_even(teacher_blocks - fixed, step_synapses, prices)
    out.update(_memory(report, prices, tables["fp32"]))
    out["activation_bits"] = float(max((site.activation_bits for site in report.sites), default=0))
    return out


def integer_block_pj(block: BlockEnergy, prices: Prices, baseline: str | None = None,
                     spikes: dict[str, float] | None = None) -> float:
    """One spiking FFN with integer weights (``baseline`` None), or the integer ANN FFN it stands for.

    Both sides are priced with the same parts (``integer_compare``): an int32 accumulate per synaptic event
    or per MAC, one FP32 MAC per input element to quantise it and per output to scale it back, FP32 MACs
    for the activation and gating multiplies, an int32 add per bias. The hybrid adds its neurons' per-step
    integrations and its receiving accumulators' per-step shifts (int32 adds); the ANN adds an integer
    multiply per MAC: 8 x 8 bits (``w8a8``) or 8 x b bits, the multiplier scaling with b (``w8ab``).
    """
    costs = block.costs
    inputs, outputs = float(sum(costs.neurons.values())), float(sum(costs.fan_outs.values()))
    shared = (inputs + outputs + costs.elementwise_macs) * prices.e_mac_pj + costs.bias_adds * prices.e_add_int32_pj
    if baseline is None:
        spikes = block.spikes_per_token if spikes is None else spikes
        events = sum(spikes[s] * f for s, f in costs.fan_outs.items())
        return shared + (events + costs.neuron_acs + costs.step_weight_acs) * prices.e_add_int32_pj
    if baseline == "w8a8":
        multiply = {site: prices.e_mult_int8_pj for site in costs.fan_outs}
    elif baseline == "w8ab":
        multiply = {site: prices.e_mult_int8_pj * costs.bits[site] / 8 for site in costs.fan_outs}
    else:
        raise ValueError(f"baseline must be 'w8a8' or 'w8ab' (got {baseline!r})")
    return shared + sum(costs.neurons[s] * f * (multiply[s] + prices.e_add_int32_pj) for s, f in costs.fan_outs.items())


def _integer_reads(report: EnergyReport, blocks, prices: Prices, hybrid_pj: float, ann_pj: float,
                   shared_pj: float) -> dict[str, float]:
    """Weight reads of the FFNs' spiking linears, both sides holding the same int8 weights (one byte each; the
    per-output scales, equal on both sides, are left out).

    A batch of b tokens (b sequences at one position) reads each weight once on the ANN's side, so b tokens
    share its bytes. An event-driven hybrid reads only the columns of the inputs that spiked for one of the b
    tokens (``SiteEnergy.active_fraction``). Per batch size the energy pass recorded: the FFN ratio with the
    reads at ``e_read_pj_per_byte``, and ``silent_input_fraction``, the share of input-synapse pairs whose
    input did not spike for a token (its weight read is skipped at batch 1).
    """
    fractions = {site.key: site.active_fraction for site in report.sites if site.ffn}
    batches = sorted(set.intersection(*(set(f) for f in fractions.values()))) if fractions else []
    out: dict[str, float] = {}
    if 1 not in batches:
        return out
    synapses = {site_key(b.path, s): b.costs.neurons[s] * f for b in blocks for s, f in b.costs.fan_outs.items()}
    for batch in (1, batches[-1]):
        hybrid_bytes = sum(weights * fractions[key][batch] for key, weights in synapses.items()) / batch
        ann_bytes = sum(synapses.values()) / batch
        read = prices.e_read_pj_per_byte
        ratio = (hybrid_pj + shared_pj + hybrid_bytes * read) / (ann_pj + shared_pj + ann_bytes * read)
        if batch == 1:
            out["ffn_memory_ratio_w8a8_batch1"] = ratio
            out["silent_input_fraction"] = 1.0 - hybrid_bytes / ann_bytes
        out["ffn_memory_ratio_w8a8_read_batch"], out["read_batch"] = ratio, float(batch)
    return out


def events_per_synapse(report: EnergyReport) -> float:
    """Synaptic events per synapse per token over the FFN blocks' spiking sites: spikes per token times fan-out,
    over neurons times fan-out."""
    blocks = [b for b in report.blocks if b.ffn]
    synapses = sum(b.costs.neurons[s] * f for b in blocks for s, f in b.costs.fan_outs.items())
    if not synapses:
        raise ValueError("the energy report has no spiking FFN synapses")
    return sum(b.spikes_per_token[s] * f for b in blocks for s, f in b.costs.fan_outs.items()) / synapses


def integer_compare(report: EnergyReport, prices: Prices) -> dict[str, float]:
    """An integer-weight hybrid against the integer ANNs, priced with the same parts (see ``integer_block_pj``).

    Empty for a hybrid whose spiking linears hold float weights: pricing its FP32 accumulates as integer
    ones would be a claim the model does not make. FFN ratios take the FFN blocks; model ratios add the
    parts both models share, on the INT8 table, to both sides. ``synaptic_events_per_synapse`` is the mean,
    over every synapse, of the events it carries per token; the break-even rate is the spike rate (per
    neuron per step, every site alike) at which the hybrid's FFNs cost as much as the W8A8 ANN's.
    """
    blocks = [b for b in report.blocks if b.ffn]
    if not blocks or any(b.costs.weight_bits is None for b in report.blocks):
        return {}
    int8 = _tables(prices)["int8"]
    shared_ffn, shared = _shared_pj(report, int8, True), _shared_pj(report, int8, False)
    hybrid = sum(integer_block_pj(b, prices) for b in blocks)
    ann = {baseline: sum(integer_block_pj(b, prices, baseline) for b in blocks) for baseline in ("w8a8", "w8ab")}
    out: dict[str, float] = {}
    for baseline, ann_pj in ann.items():
        out[f"ffn_energy_ratio_{baseline}"] = (hybrid + shared_ffn) / (ann_pj + shared_ffn)
        out[f"model_energy_ratio_{baseline}"] = (hybrid + shared) / (ann_pj + shared)
    out["synaptic_events_per_synapse"] = events_per_synapse(report)
    out.update(_integer_reads(report, blocks, prices, hybrid, ann["w8a8"], shared_ffn))
    no_spikes = sum(integer_block_pj(b, prices, spikes={s: 0.0 for s in b.costs.fan_outs}) for b in blocks)
    step_synapses = sum(b.costs.time_steps * b.costs.neurons[s] * f for b in blocks for s, f in b.costs.fan_outs.items())
    budget = ann["w8a8"] - no_spikes
    out["break_even_spike_rate_w8a8"] = max(0.0, budget / (step_synapses * prices.e_add_int32_pj))
    return out


def _memory(report: EnergyReport, prices: Prices, fp32: _Table) -> dict[str, float]:
    shared_bytes = sum(report.shared_weight_bytes.values())
    shared_ffn_bytes = sum(v for k, v in report.shared_weight_bytes.items() if k.startswith("ffn"))
    spiking_bytes = sum(b.weight_bytes for b in report.blocks)
    spiking_step_bytes = sum(b.weight_bytes * b.costs.time_steps for b in report.blocks)
    ffn_bytes = sum(b.weight_bytes for b in report.blocks if b.ffn)
    ffn_step_bytes = sum(b.weight_bytes * b.costs.time_steps for b in report.blocks if b.ffn)
    read = prices.e_read_pj_per_byte
    hybrid_ffn, teacher_ffn = report.hybrid_ffn_energy_pj, report.teacher_ffn_energy_pj
    hybrid, teacher = report.hybrid_energy_pj, report.teacher_energy_pj
    teacher_ffn_mem = teacher_ffn + (ffn_bytes + shared_ffn_bytes) * read
    teacher_mem = teacher + (spiking_bytes + shared_bytes) * read
    out = {
        "teacher_weight_bytes_per_token": spiking_bytes + shared_bytes,
        "hybrid_weight_bytes_per_token_per_step": spiking_step_bytes + shared_bytes,
        "hybrid_weight_bytes_per_token": spiking_bytes + shared_bytes,
    }
    for name, spiking_read, ffn_read in (("per_step", spiking_step_bytes, ffn_step_bytes),
                                         ("per_token", spiking_bytes, ffn_bytes)):
        out[f"ffn_memory_ratio_{name}"] = (hybrid_ffn + (ffn_read + shared_ffn_bytes) * read) / teacher_ffn_mem
        out[f"model_memory_ratio_{name}"] = (hybrid + (spiking_read + shared_bytes) * read) / teacher_mem
    return out


def site_rows(report: EnergyReport, prices: Prices) -> list[dict]:
    """Per site: spike rate beside its break-even rates against the FP32 and INT8 FFN."""
    tables = _tables(prices)
    blocks = {site_key(b.path, name): b for b in report.blocks for name in b.costs.fan_outs}  # a scope may hold two
    rows = []
    for site in report.sites:
        name = site.key.rpartition(":")[2]
        block = blocks[site.key]
        rows.append({**site.__dict__,
                     "break_even_spike_rate": site_break_even(block, name, prices, tables["fp32"]),
                     "break_even_spike_rate_int8": site_break_even(block, name, prices, tables["int8"])})
    return rows

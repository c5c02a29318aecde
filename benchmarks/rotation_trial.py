"""Training-free trial of Hadamard rotations at the spiking FFN's sites (gated FFNs: Gemma 3, Llama).

    python -m benchmarks.rotation_trial weighted:5 if:8 [--teacher models/teacher --splits data/splits]

Each argument is ``encoder:T``. For each, the teacher is converted twice, with and without rotations,
both calibrated here on the same calib blocks (per-channel thresholds at ``--percentile``) and scored on
8 test blocks against the teacher (the coding trial's scoring; FFN energy from ``measure_energy`` on 2
blocks plus the rotations' own additions).

The rotations (orthogonal, so the float FFN is unchanged; ``tests/test_rotation_trial.py`` checks it):
- product site: a normalised Hadamard H_p on the product ``act(gate) * up`` before it is encoded, folded
  into ``down_proj`` (W_down H_p^T). Applied online, in analog, as a fast Walsh-Hadamard transform.
- input site: a block-diagonal normalised Hadamard H_i (blocks of the largest power of two dividing the
  width: 128 for Gemma 3 270M's 640) on the normed input before it is encoded, folded into ``gate_proj``
  and ``up_proj``. Also online: the norm before it stays analog, so it cannot be folded further without
  rotating the residual stream.
The online transforms are priced as a fast Walsh-Hadamard transform, n log2(b) additions per token for
width n in blocks of b, at the accumulate energy (0.9 pJ), and added to the FFN energy.
Calibration sees the rotated activations: the rotations are forward pre-hooks of the teacher's FFN and
``down_proj``, registered before the calibrator's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import types

import torch
from torch import nn

from benchmarks.coding_trial import _score
from snn_research.conversion.ann_to_snn_converter import TeacherIdentity, convert
from snn_research.conversion.calibrator import Calibrator
from snn_research.data import load_blocks, spread
from snn_research.evaluation.energy import measure_energy
from snn_research.models.hybrid_transformer import HybridPlan, SpikingGatedMLP, find_mlps
from snn_research.teacher import load_teacher


def hadamard(size: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of a power-of-two ``size``: symmetric and orthogonal."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard needs a power-of-two size, got {size}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(size)


def block_hadamard(width: int) -> tuple[torch.Tensor, int]:
    """Block-diagonal normalised Hadamard over ``width``, blocks of the largest power of two dividing it."""
    block = width & -width
    return torch.block_diag(*[hadamard(block)] * (width // block)), block


def fwht_additions(width: int, block: int) -> int:
    """Additions of a fast Walsh-Hadamard transform of ``width`` values in blocks of ``block``."""
    return width * int(math.log2(block))


class Rotation:
    """Rotations folded into one gated FFN's linears, applied online to the sites' inputs."""

    def __init__(self, mlp: nn.Module) -> None:
        hidden, intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.input, self.input_block = block_hadamard(hidden)
        self.product, self.product_block = block_hadamard(intermediate)
        self.additions = fwht_additions(hidden, self.input_block) + fwht_additions(intermediate, self.product_block)
        self.product_hook_id: int | None = None  # the teacher's online product rotation on down_proj

    @staticmethod
    def apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ matrix.T).to(x.dtype)

    def fold(self, mlp: nn.Module) -> None:
        with torch.no_grad():
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.weight.copy_((linear.weight.double() @ self.input.T).to(linear.weight.dtype))
            mlp.down_proj.weight.copy_((mlp.down_proj.weight.double() @ self.product.T).to(mlp.down_proj.weight.dtype))


def rotate_teacher(teacher: nn.Module) -> dict[str, Rotation]:
    """Fold rotations into every gated FFN of ``teacher`` in place and hook their online halves in."""
    rotations = {}
    for location in find_mlps(teacher, None):
        mlp = location.module
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            raise SystemExit(f"{location.path}: rotations are built for gated FFNs only")
        rotation = Rotation(mlp)
        rotation.fold(mlp)
        mlp.register_forward_pre_hook(lambda _m, args, r=rotation: (r.apply(r.input, args[0]), *args[1:]))
        handle = mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, r=rotation: (r.apply(r.product, args[0]), *args[1:]))
        rotation.product_hook_id = handle.id
        rotations[location.path] = rotation
    return rotations


def _rotated_forward(self: SpikingGatedMLP, x: torch.Tensor) -> torch.Tensor:
    rotation: Rotation = self.rotation
    x = rotation.apply(rotation.input, x)
    if self.analog:
        return self.down_proj(rotation.apply(rotation.product, self.act_fn(self.gate_proj(x)) * self.up_proj(x)))
    x_rate = self._encode(self.sites[0], x)
    product = rotation.apply(rotation.product, self.act_fn(self.gate_proj(x_rate)) * self.up_proj(x_rate))
    return self.down_proj(self._encode(self.sites[1], product))


def rotate_hybrid(hybrid: nn.Module, rotations: dict[str, Rotation]) -> None:
    """Move a converted rotated teacher's online rotations into its spiking FFNs, before their encoders."""
    for path, rotation in rotations.items():
        unit = hybrid.get_submodule(path)
        if not isinstance(unit, SpikingGatedMLP):
            raise SystemExit(f"{path}: expected a spiking gated FFN after conversion, got {type(unit).__name__}")
        del unit.down_proj._forward_pre_hooks[rotation.product_hook_id]  # copied with the teacher by the conversion
        object.__setattr__(unit, "rotation", rotation)
        unit.forward = types.MethodType(_rotated_forward, unit)


def convert_ffns(teacher: nn.Module, plan: HybridPlan, batches, percentile: float) -> nn.Module:
    """Calibrate ``teacher``'s FFN sites on ``batches`` and convert it (a rotated teacher's hooks stay on)."""
    calibrator = Calibrator(teacher, sites=("ffn",))
    calibrator.run(batches)
    calibrator.remove_hooks()
    identity = TeacherIdentity(source="trial", sha256="0" * 64, model_type=teacher.config.model_type,
                               architectures=[], num_layers=teacher.config.num_hidden_layers)
    hybrid, _, _ = convert(teacher, calibrator.result(percentile), plan, identity, "0" * 64)
    return hybrid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="+", help="encoder:T, e.g. weighted:5")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--splits", default="data/splits")
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--percentile", type=float, default=99.9)
    args = parser.parse_args()
    teacher, _ = load_teacher(args.teacher)
    rotated = copy.deepcopy(teacher)
    rotations = rotate_teacher(rotated)
    test = spread(load_blocks(args.splits, "test"), 8).input_ids
    calib = spread(load_blocks(args.splits, "calib"), args.calib_blocks).input_ids
    teacher_nll, _, _ = _score(teacher, teacher, test)
    rotated_nll, _, rotated_kl = _score(rotated, teacher, test)
    print(json.dumps({"teacher_ppl": round(math.exp(teacher_nll), 3),
                      "rotated_teacher_ppl_ratio": round(math.exp(rotated_nll - teacher_nll), 6),
                      "rotated_teacher_kl": rotated_kl}), flush=True)
    for setting in args.settings:
        encoder, time_steps = setting.split(":")
        plan = HybridPlan(time_steps=int(time_steps), encoder=encoder)
        for rotate in (False, True):
            started = time.perf_counter()
            hybrid = convert_ffns(rotated if rotate else teacher, plan, list(calib.split(4)), args.percentile)
            if rotate:
                rotate_hybrid(hybrid, rotations)
            nll, agreement, kl = _score(hybrid, teacher, test)
            energy = measure_energy(hybrid, test[:2])
            extra = sum(r.additions for r in rotations.values()) * energy.e_ac_pj if rotate else 0.0
            ffn_ratio = (energy.hybrid_ffn_energy_pj + extra) / energy.teacher_ffn_energy_pj  # both per token
            print(json.dumps({
                "setting": setting, "rotation": rotate, "percentile": args.percentile,
                "ppl_ratio": round(math.exp(nll - teacher_nll), 4), "agreement_top1": round(agreement, 4),
                "kl_full_to_teacher": round(kl, 4), "ffn_energy_ratio": round(ffn_ratio, 4),
                "rotation_share_of_ffn_energy": round(extra / (energy.hybrid_ffn_energy_pj + extra), 5),
                "spike_rate": round(energy.mean_spike_rate, 4), "seconds": round(time.perf_counter() - started, 1),
            }), flush=True)


if __name__ == "__main__":
    main()

"""The Hadamard rotation trial: the rotation is exact on the float FFN, and the spiking sites see it."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.rotation_trial import (
    block_hadamard,
    convert_ffns,
    fwht_additions,
    hadamard,
    rotate_hybrid,
    rotate_teacher,
)
from conftest import tiny_model
from snn_research.models.hybrid_transformer import HybridPlan, find_mlps


def test_hadamard_is_orthogonal_and_the_block_form_fits_any_width():
    matrix = hadamard(8)
    assert torch.allclose(matrix @ matrix.T, torch.eye(8, dtype=torch.float64))
    assert set((matrix * 8 ** 0.5).abs().unique().tolist()) == {1.0}
    blocks, block = block_hadamard(640)  # Gemma 3 270M's width: five blocks of 128
    assert block == 128 and blocks.shape == (640, 640)
    assert torch.allclose(blocks @ blocks.T, torch.eye(640, dtype=torch.float64))
    assert fwht_additions(640, 128) == 640 * 7 and fwht_additions(2048, 2048) == 2048 * 11
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_rotation_leaves_the_float_ffn_unchanged(family, input_ids):
    teacher = tiny_model(family)
    rotated = copy.deepcopy(teacher)
    rotate_teacher(rotated)
    x = torch.randn(3, 5, teacher.config.hidden_size)
    for before, after in zip(find_mlps(teacher), find_mlps(rotated)):
        assert not torch.equal(before.module.down_proj.weight, after.module.down_proj.weight)  # folded
        torch.testing.assert_close(after.module(x), before.module(x), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(rotated(input_ids).logits, teacher(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_rotated_hybrid_encodes_the_rotated_activations(family, input_ids):
    teacher = tiny_model(family)
    rotated = copy.deepcopy(teacher)
    rotations = rotate_teacher(rotated)
    plan = HybridPlan(time_steps=12, encoder="weighted")
    hybrid = convert_ffns(rotated, plan, [input_ids], 100.0)  # thresholds at the maxima: nothing clips
    rotate_hybrid(hybrid, rotations)
    with torch.no_grad():
        reference = teacher(input_ids).logits
        for unit in (loc.module for loc in find_mlps(hybrid)):
            unit.analog = True
        torch.testing.assert_close(hybrid(input_ids).logits, reference, atol=1e-5, rtol=0)
        for unit in (loc.module for loc in find_mlps(hybrid)):
            unit.analog = False
        spiking = hybrid(input_ids).logits
    # 4095 levels per sign under the maxima of the rotated activations: close to the teacher
    assert (spiking - reference).abs().max() < 0.01 * reference.abs().max()

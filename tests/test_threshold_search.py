"""The clipping search: never worse than the percentile it starts from, recorded in the metadata."""

import pytest
import torch
from conftest import calibration_batches
from test_converter import converted

from snn_research.conversion.threshold_search import search_clipping
from snn_research.models.hybrid_transformer import HybridPlan, family_sites, spiking_mlps


def _converted(family, plan):
    teacher, hybrid, _, _ = converted(family, plan)
    return teacher, hybrid


def _ffn_errors(teacher, hybrid, batches):
    """Relative FFN output error per block, each block fed the teacher's own FFN input."""
    errors = {}
    for block in spiking_mlps(hybrid):
        captured = []
        handle = teacher.get_submodule(block.path).register_forward_hook(
            lambda _m, args, out: captured.append((args[0], out)))
        with torch.no_grad():
            for batch in batches:
                teacher(input_ids=batch, use_cache=False)
        handle.remove()
        x = torch.cat([c[0].flatten(0, -2) for c in captured])
        y = torch.cat([c[1].flatten(0, -2) for c in captured])
        with torch.no_grad():
            errors[block.path] = float((block(x) - y).pow(2).sum() / y.pow(2).sum())
    return errors


@pytest.mark.parametrize("encoder,time_steps", [("if", 4), ("weighted", 4)])
def test_search_never_returns_a_worse_output_error_than_the_percentile(family, encoder, time_steps):
    if family == "gpt2" and encoder == "weighted":
        pytest.skip("the weighted encoder is offered for gated FFNs only")
    batches = calibration_batches(3, seed=5)
    teacher, hybrid = _converted(family, HybridPlan(time_steps=time_steps, encoder=encoder))
    before = _ffn_errors(teacher, hybrid, batches)
    choices, blocks = search_clipping(hybrid, teacher, batches)
    after = _ffn_errors(teacher, hybrid, batches)
    sites = {c.key for c in choices}
    assert len(sites) == 2 * len(before)
    for choice in choices:
        assert choice.error_chosen <= choice.error_before
    for path, error in before.items():
        assert after[path] <= error * (1 + 1e-6), (path, error, after[path])
    # the recorded block errors are the measured ones, before and after
    for block in blocks:
        assert block.error_percentile == pytest.approx(before[block.path], rel=1e-5)
        assert block.error_chosen == pytest.approx(after[block.path], rel=1e-5)
    # on a coarse code the percentile is not the best clip for every site: the search moved some
    assert any(c.choice != "scale x1" for c in choices) and sum(after.values()) < sum(before.values())


def test_search_keeps_the_percentile_when_it_is_best(monkeypatch):
    """With only one candidate scale and no channel maximum better, the thresholds are untouched."""
    batches = calibration_batches(2, seed=6)
    teacher, hybrid = _converted("llama", HybridPlan(time_steps=4, encoder="weighted"))
    before = [p.detach().clone() for b in spiking_mlps(hybrid) for s in family_sites(b.family)
              for p in [getattr(b, f"{s.name}_encoder").log_threshold]]
    choices, _ = search_clipping(hybrid, teacher, batches, scales=(1.0,))
    after = [getattr(b, f"{s.name}_encoder").log_threshold.detach() for b in spiking_mlps(hybrid)
             for s in family_sites(b.family)]
    for choice, old, new in zip(choices, before, after):
        if choice.choice == "scale x1":
            assert torch.equal(old, new)
        else:
            assert choice.choice == "channel max" and choice.error_chosen < choice.error_before


def test_search_refuses_scales_without_the_calibrated_point():
    teacher, hybrid = _converted("llama", HybridPlan(time_steps=4))
    with pytest.raises(ValueError, match="1.0"):
        search_clipping(hybrid, teacher, calibration_batches(1), scales=(0.5, 2.0))


def test_search_never_runs_the_teachers_lm_head(family):
    """The search needs the FFNs' inputs and outputs only: the head's full-vocabulary logits are not computed."""
    teacher, hybrid = _converted(family, HybridPlan(time_steps=4))

    def refuse(*_args):
        raise AssertionError("the LM head ran")

    handle = teacher.get_output_embeddings().register_forward_pre_hook(refuse)
    try:
        choices, _ = search_clipping(hybrid, teacher, calibration_batches(2, seed=5))
    finally:
        handle.remove()
    assert choices


def test_rate_noise_is_the_same_for_every_candidate():
    """The rate code is random: each candidate is scored on the same draws, so the first site's 'scale x1'
    candidate (the calibrated thresholds) scores exactly the block's error at the calibrated thresholds."""
    teacher, hybrid = _converted("llama", HybridPlan(time_steps=4, encoder="rate"))
    choices, block_errors = search_clipping(hybrid, teacher, calibration_batches(2, seed=5))
    first = {choice.key.split(":")[0]: choice for choice in reversed(choices)}  # each block's first site
    for block in block_errors:
        assert first[block.path].error_before == block.error_percentile, block.path


def test_worst_domain_search_scores_the_worst_group_and_never_worsens_it():
    """Blocks tagged with two groups: the recorded errors are the worst group's, measured independently."""
    import copy

    batches = calibration_batches(4, seed=11)  # 4 batches of 2 blocks
    groups = torch.tensor([0, 1, 0, 1, 1, 1, 0, 1])
    teacher, hybrid = _converted("llama", HybridPlan(time_steps=4, encoder="weighted"))
    plain = copy.deepcopy(hybrid)

    def worst(model):
        by_group = [_ffn_errors(teacher, model, [b[groups[2 * i:2 * i + 2] == g] for i, b in enumerate(batches)
                                                 if (groups[2 * i:2 * i + 2] == g).any()]) for g in (0, 1)]
        return {path: max(errors[path] for errors in by_group) for path in by_group[0]}

    before = worst(hybrid)
    _, blocks = search_clipping(hybrid, teacher, batches, block_groups=groups)
    after = worst(hybrid)
    for block in blocks:
        assert block.error_percentile == pytest.approx(before[block.path], rel=1e-5)
        assert block.error_chosen == pytest.approx(after[block.path], rel=1e-5)
        assert block.error_chosen <= block.error_percentile
    # one group for every block: the same choices as the pooled search
    pooled_choices, _ = search_clipping(copy.deepcopy(plain), teacher, batches)
    single_choices, _ = search_clipping(plain, teacher, batches, block_groups=torch.zeros(8, dtype=torch.long))
    assert [c.choice for c in single_choices] == [c.choice for c in pooled_choices]
    with pytest.raises(ValueError, match="block_groups has 3 entries"):
        search_clipping(plain, teacher, batches, block_groups=torch.zeros(3, dtype=torch.long))

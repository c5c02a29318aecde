"""The generation benchmark's bare loop decodes what ``generate`` decodes: its ratio then compares the same work
with and without the energy meter."""

import pytest

from benchmarks.generation import Decode, bare_decode
from snn_research.generate import GenerationOptions, generate_ids
from snn_research.models.hybrid_transformer import HybridPlan, hybridize
from tests.conftest import calibration_batches, tiny_model


def _hybrid(family: str):
    from snn_research.conversion.calibrator import Calibrator

    model = tiny_model(family)
    calibrator = Calibrator(model)
    for batch in calibration_batches():
        calibrator.observe(batch)
    calibrator.remove_hooks()
    hybridize(model, HybridPlan(time_steps=5, encoder="weighted"), calibrator.result(99.9).thresholds("channel"))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("spiking", [False, True])
def test_bare_decoding_generates_the_metered_loops_tokens(family, spiking):
    model = _hybrid(family) if spiking else tiny_model(family)
    prompt = [5, 17, 3, 40, 22, 9]
    metered, _, _ = generate_ids(model, prompt, GenerationOptions(max_new_tokens=10, stop_at_eos=False))
    assert bare_decode(model, prompt, 10) == metered
    for loop in (Decode(model, prompt, metered=False, new_tokens=10), Decode(model, prompt, metered=True, new_tokens=10)):
        loop()
        assert loop.tokens == metered
    if family == "llama":  # a loop stuck on one token would agree for the wrong reason; the tiny Gemma 3
        assert len(set(metered)) > 1  # (tied embeddings, wide residual) repeats its last input token

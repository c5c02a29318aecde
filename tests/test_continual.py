"""Continual learning of the spiking parts: reservoir, meta-plasticity, adapt runs, continuation, kill-resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from pipeline_support import assert_clean_failure, inside, invoke, prepare, saved_figures, tiny_params

from snn_research.continual.adapt import STATE_DIR, adapt, read_state
from snn_research.continual.params import load_adapt_params
from snn_research.continual.plasticity import apply_meta, meta_factor
from snn_research.continual.replay import ReservoirBuffer
from snn_research.io import sha256_file

# chi-square critical value for 49 degrees of freedom at p = 0.001 (scipy.stats.chi2.ppf(0.999, 49))
CHI2_49_P001 = 85.351


def test_reservoir_is_a_uniform_sample():
    items, size, trials = 50, 10, 2000
    counts = torch.zeros(items)
    for seed in range(trials):
        buffer = ReservoirBuffer(size, 1, seed)
        buffer.offer_all(torch.arange(items).view(-1, 1))
        assert buffer.filled == size and buffer.seen == items
        kept = buffer.items[:, 0]
        assert kept.unique().numel() == size  # no block twice
        counts[kept] += 1
    expected = trials * size / items
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_49_P001, f"inclusion counts are not uniform (chi2 {chi2:.1f}): {counts.tolist()}"


def test_reservoir_memory_is_fixed_and_its_state_continues():
    whole = ReservoirBuffer(8, 3, seed=5)
    whole.offer_all(torch.arange(300).view(-1, 3))
    assert whole.items.shape == (8, 3)  # however many it saw
    half = ReservoirBuffer(8, 3, seed=5)
    half.offer_all(torch.arange(150).view(-1, 3))
    resumed = ReservoirBuffer.load(*half.state())
    resumed.offer_all(torch.arange(150, 300).view(-1, 3))
    assert torch.equal(resumed.items, whole.items) and resumed.seen == whole.seen
    assert torch.equal(resumed.draw(4, 0, 7), whole.draw(4, 0, 7))


def test_meta_rule_shrinks_updates_away_from_a_consolidated_weight_and_leaves_a_free_one():
    consolidated = torch.tensor([1.0, 1.0, 1.0, 1.0])
    before = torch.tensor([1.0, 1.0, 1.2, 1.2])
    importance = torch.tensor([3.0, 0.0, 3.0, 3.0])
    proposed = torch.tensor([1.5, 1.5, 1.4, 1.1])  # away, away (free), further away, back toward W*
    weight = proposed.clone()
    apply_meta(weight, before, consolidated, importance, strength=1.0)
    f = float(meta_factor(torch.tensor(3.0), 1.0))
    assert 0 < f < 0.01
    expected = torch.tensor([1.0 + 0.5 * f, 1.5, 1.2 + 0.2 * f, 1.1])
    assert torch.allclose(weight, expected)
    assert float(meta_factor(torch.tensor(0.0), 5.0)) == 1.0
    # a step back toward W* that passes it: the part beyond W* is an update away, and shrinks
    weight = torch.tensor([0.5])
    apply_meta(weight, torch.tensor([1.2]), torch.tensor([1.0]), torch.tensor([3.0]), strength=1.0)
    assert torch.allclose(weight, torch.tensor([1.0 - 0.5 * f]))


# --------------------------------------------------------------------------- adapt on a tiny pipeline

STREAM_TEXT = [
    "The assert statement is a convenient way to insert debugging assertions into a program. ",
    "Assignment statements are used to bind or rebind names to values and to modify attributes. ",
    "An identifier occurring as an atom is a name; evaluation of the atom yields the bound object. ",
    "Python supports string and bytes literals and various numeric literals in its grammar. ",
    "Attribute references are primaries followed by a period and a name, evaluated in turn. ",
    "Binary arithmetic operations have the conventional priority levels, below unary operations. ",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny converted hybrid (random Gemma 3, byte tokenizer) with its splits, and a text stream."""
    folder = prepare(tmp_path_factory.mktemp("continual"), tiny_params(), ("download-teacher", "split", "calibrate",
                                                                           "convert"))
    stream = folder / "stream"
    stream.mkdir()
    for index, text in enumerate(STREAM_TEXT):
        (stream / f"doc{index}.txt").write_text(text * 2)
    return folder


def continual_params(**adapt_changes) -> dict:
    base = {
        "model": "models/converted", "output": "models/adapted", "old_splits": "data/splits",
        "checkpoints": "models/.checkpoints", "curves": "reports/adapted.csv",
        "stream": {"source": "path:stream/*.txt", "block_length": 32, "chunk_blocks": 4, "heldout_every": 3,
                   "max_chunks": None},
        "lr": 1.0e-3, "batch_blocks": 2,
        "replay": {"size": 6, "ratio": 0.5},
        "meta": {"strength": 1.0, "importance_blocks": 2},
        "evaluate": {"new_blocks": 2, "old_blocks": 2, "probe_blocks": 1},
    }
    for key, value in adapt_changes.items():
        node = base
        *sections, last = key.split("__")
        for section in sections:
            node = node[section]
        node[last] = value
    return {"seed": 0, "tracking": {"enabled": False}, "adapt": base,
            "settings": {"none": {"replay.ratio": 0.0, "meta.strength": 0.0}}}


def run_adapt(raw: dict, setting: str | None = None, **kwargs):
    Path("continual.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shared, params = load_adapt_params("continual.yaml", setting)
    return adapt(params, shared, echo=lambda *_: None, **kwargs)


def state_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


@pytest.fixture
def work(pipeline, tmp_path):
    """A copy of the tiny pipeline to run adapt in (each test writes its own outputs)."""
    target = tmp_path / "work"
    shutil.copytree(pipeline, target)
    with inside(target):
        yield target


def test_adapt_changes_only_the_spiking_parts_and_never_its_input(work):
    from snn_research.conversion.ann_to_snn_converter import load_hybrid
    from snn_research.models.hybrid_transformer import spiking_parameter_groups

    before = state_tensors(work / "models/converted")
    input_hashes = {p.relative_to(work): sha256_file(p) for p in (work / "models/converted").rglob("*") if p.is_file()}
    result = run_adapt(continual_params())
    after = state_tensors(work / "models/adapted")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    model = load_hybrid(work / "models/adapted")  # what adapt writes, load_hybrid reads
    weights, dynamics = spiking_parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert changed == {names[id(p)] for p in weights + dynamics}, "not exactly the spiking parts changed"
    assert any("threshold" in name for name in changed)
    assert {p.relative_to(work): sha256_file(p)
            for p in (work / "models/converted").rglob("*") if p.is_file()} == input_hashes
    chunks = result.chunks_done
    assert chunks >= 2 and len(result.history) == chunks + 1
    curves = (work / "reports/adapted.csv").read_text().splitlines()
    assert len(curves) == chunks + 2 and curves[0].startswith("chunk,tokens_seen,new_ppl,old_ppl")


def test_two_runs_over_half_the_stream_equal_one_run_over_all(work):
    whole = run_adapt(continual_params(output="models/whole"))
    assert whole.chunks_done >= 4
    half = whole.chunks_done // 2
    run_adapt(continual_params(output="models/half", stream__max_chunks=half))
    second = run_adapt(continual_params(model="models/half", output="models/both_halves"))
    assert second.chunks_done == whole.chunks_done - half
    one, two = state_tensors(work / "models/whole"), state_tensors(work / "models/both_halves")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    state_one, _ = read_state(work / "models/whole" / STATE_DIR)
    state_two, _ = read_state(work / "models/both_halves" / STATE_DIR)
    assert state_one.history == state_two.history and state_one.updates == state_two.updates
    assert torch.equal(state_one.buffer.items, state_two.buffer.items)
    assert all(torch.equal(state_one.importance[k], state_two.importance[k]) for k in state_one.importance)


def test_a_later_run_continues_on_documents_appended_to_the_stream(work):
    appended = [work / "stream" / name for name in ("doc4.txt", "doc5.txt", "doc6.txt")]
    texts = [path.read_text() for path in appended[:2]] + [STREAM_TEXT[0][::-1] * 2]
    for path in appended[:2]:
        path.unlink()
    first = run_adapt(continual_params(output="models/first"))
    for path, text in zip(appended, texts):  # more documents arrive; doc6 (index 6) falls in the held-out share
        path.write_text(text)
    more = run_adapt(continual_params(model="models/first", output="models/more"))
    assert more.chunks_done > 0
    assert more.history[: len(first.history)] == first.history  # it went on, not from scratch
    state, _ = read_state(work / "models/more" / STATE_DIR)
    first_state, _ = read_state(work / "models/first" / STATE_DIR)
    assert torch.equal(state.heldout, first_state.heldout)  # scored on the first run's held-out blocks
    assert state.position == first_state.position + more.chunks_done
    from snn_research.generate import load_model_folder
    from snn_research.training.losses import next_token_nll

    model, _, _ = load_model_folder(work / "models/more")
    with torch.no_grad():
        nll = sum(float(next_token_nll(model(input_ids=b[None], use_cache=False).logits, b[None]))
                  for b in first_state.heldout) / len(first_state.heldout)
    assert more.history[-1]["new_ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("max_chunks", [None, 3])
def test_a_killed_run_resumes_to_the_same_weights(work, max_chunks):
    reference = run_adapt(continual_params(output="models/reference", stream__max_chunks=max_chunks))

    def kill(chunk, update):
        if chunk == 2 and update % 2 == 1:  # mid-chunk: the first update of the third chunk is done
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(continual_params(output="models/killed", stream__max_chunks=max_chunks), on_update=kill)
    assert not (work / "models/killed").exists()  # nothing half-written
    resumed = run_adapt(continual_params(output="models/killed", stream__max_chunks=max_chunks))
    assert resumed.resumed_from == 2  # it lost only the chunk in flight
    assert resumed.chunks_done == reference.chunks_done
    one, two = state_tensors(work / "models/reference"), state_tensors(work / "models/killed")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert reference.history == resumed.history


def test_a_killed_continuation_resumes_to_the_same_weights(work):
    run_adapt(continual_params(output="models/first", stream__max_chunks=1))
    reference = run_adapt(continual_params(model="models/first", output="models/reference", stream__max_chunks=2))

    def kill(chunk, update):
        if chunk == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(continual_params(model="models/first", output="models/killed", stream__max_chunks=2), on_update=kill)
    resumed = run_adapt(continual_params(model="models/first", output="models/killed", stream__max_chunks=2))
    assert resumed.resumed_from == 2 and len(resumed.history) == 4  # start + chunks 1, 2, 3
    one, two = state_tensors(work / "models/reference"), state_tensors(work / "models/killed")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert reference.history == resumed.history


def _mean_nll(folder: Path, blocks: torch.Tensor) -> float:
    """The mean next-token loss per block of the model in ``folder``: written here, not adapt's scorer."""
    from snn_research.generate import load_model_folder

    model, _, _ = load_model_folder(folder)
    model.eval()
    losses = []
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None], use_cache=False).logits[0, :-1].double()
            losses.append(float(torch.nn.functional.cross_entropy(logits, block[1:])))
    return sum(losses) / len(losses)


def test_scores_follow_gems_definitions_measured_from_the_models(work):
    """BWT, forgetting and gain recomputed from the models each chunk left, not from adapt's stored numbers:
    a chain of one-chunk continuations gives the model after each chunk (equal to one run: tested above)."""
    from snn_research.continual.params import StreamParams
    from snn_research.continual.stream import build_stream
    from snn_research.data import load_blocks, spread
    from snn_research.generate import load_model_folder

    result = run_adapt(continual_params(output="models/whole", stream__max_chunks=3))
    previous = "models/converted"
    for index in range(1, 4):
        run_adapt(continual_params(model=previous, output=f"models/after{index}", stream__max_chunks=1))
        previous = f"models/after{index}"
    _, tokenizer, _ = load_model_folder(work / "models/converted")
    stream = build_stream(StreamParams(source="path:stream/*.txt", block_length=32, chunk_blocks=4, heldout_every=3),
                          tokenizer, 2)
    probes = [chunk[-1:] for chunk in stream.chunks[:3]]  # the last block of each chunk is its probe
    old = spread(load_blocks(work / "data/splits", "test"), 2).input_ids
    learned = {"old": _mean_nll(work / "models/converted", old),
               "chunk1": _mean_nll(work / "models/after1", probes[0]),
               "chunk2": _mean_nll(work / "models/after2", probes[1])}
    now = {"old": _mean_nll(work / "models/after3", old), "chunk1": _mean_nll(work / "models/after3", probes[0]),
           "chunk2": _mean_nll(work / "models/after3", probes[1])}
    last, first = result.history[-1], result.history[0]
    gaps = {task: learned[task] - now[task] for task in learned}
    assert last["bwt"] == pytest.approx(sum(gaps.values()) / 3, rel=1e-4, abs=1e-6)
    assert last["bwt_old"] == pytest.approx(gaps["old"], rel=1e-4, abs=1e-6)
    assert last["bwt_stream"] == pytest.approx((gaps["chunk1"] + gaps["chunk2"]) / 2, rel=1e-4, abs=1e-6)
    assert first["old_ppl"] == pytest.approx(math.exp(learned["old"]), rel=1e-5)
    assert last["forgetting"] == pytest.approx(math.exp(now["old"] - learned["old"]) - 1, rel=1e-4, abs=1e-6)
    new_start = _mean_nll(work / "models/converted", stream.heldout)
    new_end = _mean_nll(work / "models/after3", stream.heldout)
    assert last["new_gain"] == pytest.approx(1 - math.exp(new_end - new_start), rel=1e-4, abs=1e-6)


def test_backward_transfer_follows_gems_definition_on_hand_numbers():
    """GEM's BWT, the mean over the past tasks of (loss right after learning it - loss now), over all of them, the
    old domain alone and the earlier chunks alone."""
    from snn_research.continual.adapt import backward_transfer

    learned = {"old": 3.0, "chunk1": 2.0, "chunk2": 2.5, "chunk3": 9.0}  # chunk3: just learned, not a past task
    now = {"old": 3.5, "chunk1": 2.25, "chunk2": 2.0}  # gaps: old -0.5, chunk1 -0.25, chunk2 +0.5
    assert backward_transfer(learned, now) == pytest.approx((-0.25 / 3, -0.5, 0.25 / 2))
    assert backward_transfer(learned, {"old": 2.75}) == pytest.approx((0.25, 0.25, 0.0))  # no chunk yet: 0
    assert backward_transfer(learned, {}) == (0.0, 0.0, 0.0)


def _recorded_updates(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import snn_research.continual.adapt as adapt_module

    seen = []
    original = adapt_module._update

    def record(run, optimizer, new, replay, params):
        seen.append((new.clone(), replay.clone()))
        return original(run, optimizer, new, replay, params)

    monkeypatch.setattr(adapt_module, "_update", record)
    return seen


def test_a_chunks_probe_blocks_are_never_trained_on(work, monkeypatch):
    from snn_research.continual.params import StreamParams
    from snn_research.continual.stream import build_stream
    from snn_research.generate import load_model_folder

    seen = _recorded_updates(monkeypatch)
    run_adapt(continual_params(stream__max_chunks=3))
    _, tokenizer, _ = load_model_folder(work / "models/converted")
    stream = build_stream(StreamParams(source="path:stream/*.txt", block_length=32, chunk_blocks=4, heldout_every=3),
                          tokenizer, 2)
    trained = torch.cat([new for new, _ in seen])
    assert torch.equal(trained, torch.cat([chunk[:-1] for chunk in stream.chunks[:3]]))  # 3 of 4 blocks, in order
    for chunk in stream.chunks[:3]:
        assert not (trained == chunk[-1]).all(dim=1).any(), "a probe block was trained on"


def test_the_replay_control_trains_on_the_same_replay_draws_alone(work, monkeypatch):
    seen = _recorded_updates(monkeypatch)
    run_adapt(continual_params(output="models/with_new", stream__max_chunks=2, replay__ratio=1.0))
    with_new = list(seen)
    seen.clear()
    run_adapt(continual_params(output="models/control", stream__max_chunks=2, replay__ratio=1.0, train_new=False))
    assert len(seen) == len(with_new) == 4
    for (new, replay), (new_ref, replay_ref) in zip(seen, with_new):
        assert new.shape[0] == 0 and new_ref.shape[0] > 0
        assert torch.equal(replay, replay_ref) and replay.shape[0] == new_ref.shape[0]


def test_the_replay_control_without_replay_is_refused(work):
    raw = continual_params(train_new=False, replay__ratio=0.0)
    Path("continual.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = invoke("adapt", "-p", "continual.yaml")
    assert_clean_failure(result, 2)
    assert "adapt.train_new" in result.output and "train on nothing" in result.output


def test_a_seeded_stream_order_differs_by_seed_and_keeps_the_held_out_set(work):
    from snn_research.continual.params import StreamParams
    from snn_research.continual.stream import build_stream
    from snn_research.generate import load_model_folder

    _, tokenizer, _ = load_model_folder(work / "models/converted")
    for index, text in enumerate(STREAM_TEXT):  # 12 documents, so that orders can differ in many ways
        (work / "stream" / f"more{index}.txt").write_text(text[::-1] * 2)
    params = StreamParams(source="path:stream/*.txt", block_length=32, chunk_blocks=2, heldout_every=3,
                          order="seeded")
    zero, one, again = (build_stream(params, tokenizer, 4, seed) for seed in (0, 1, 0))
    named = [build_stream(params.model_copy(update={"order": "name"}), tokenizer, 4, seed) for seed in (0, 1)]
    assert zero.chunk_sha256 == again.chunk_sha256  # a seed gives one order
    assert zero.chunk_sha256 != one.chunk_sha256  # another seed another
    assert named[0].chunk_sha256 == named[1].chunk_sha256  # name order ignores the seed
    assert named[0].chunk_sha256 not in (zero.chunk_sha256, one.chunk_sha256)
    assert all(torch.equal(s.heldout, named[0].heldout) for s in (zero, one, again))  # one yardstick for all


def test_a_fractional_replay_ratio_spreads_over_updates(work, monkeypatch):
    drawn = []
    original = ReservoirBuffer.draw

    def record(self, count, seed, update):
        drawn.append(count)
        return original(self, count, seed, update)

    monkeypatch.setattr(ReservoirBuffer, "draw", record)
    run_adapt(continual_params(batch_blocks=1, replay__ratio=0.5, stream__max_chunks=1))
    assert drawn == [0, 1, 0]  # 3 trained blocks (the fourth is the chunk's probe), 1 replayed


def test_a_setting_changes_fields_not_whole_sections(work):
    raw = continual_params()
    raw["settings"]["strong"] = {"meta": {"strength": 3.0}}
    Path("continual.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _, params = load_adapt_params("continual.yaml", "strong")
    assert params.meta.strength == 3.0 and params.meta.importance_blocks == 2


def test_teacher_reference_adapts_its_ffn_linears_only(work):
    result = run_adapt(continual_params(model="models/teacher", output="models/ann"))
    before, after = state_tensors(work / "models/teacher"), state_tensors(work / "models/ann")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    ffn = {name for name in before if ".mlp." in name}
    assert changed == ffn
    last = result.history[-1]
    assert math.isnan(last["spike_rate"])  # no spikes to count
    assert last["trainable_parameters"] == sum(before[name].numel() for name in ffn)


def test_settings_override_the_base_and_a_continuation_keeps_them(work):
    raw = continual_params(output="models/none", stream__max_chunks=1)
    run_adapt(raw, setting="none")
    state, _ = read_state(work / "models/none" / STATE_DIR)
    assert state.settings["replay"]["ratio"] == 0.0 and state.settings["meta"]["strength"] == 0.0
    assert not (work / "models/none" / STATE_DIR / "consolidation.safetensors").exists()
    Path("continual.yaml").write_text(yaml.safe_dump(continual_params(model="models/none", output="models/more"),
                                                     sort_keys=False))
    result = invoke("adapt", "-p", "continual.yaml")  # the base rule (replay on) against a state made without it
    assert_clean_failure(result, 2)
    assert "adapt.replay.ratio: 0.0 -> 0.5" in result.output
    assert not (work / "models/more").exists()


@pytest.mark.parametrize("change, code, message", [
    ({"adapt": {"replay": {"ratio": 1.5}}}, 2, "adapt.replay.ratio"),
    ({"adapt": {"batch_blocks": 9}}, 2, "adapt.batch_blocks"),
    ({"adapt": {"replay": {"ratio": -0.1}}}, 2, "adapt.replay.ratio"),
    ({"adapt": {"replay": {"size": 1, "ratio": 1.0}}}, 2, "adapt.replay.size"),
    ({"adapt": {"output": "models/converted"}}, 2, "the input is never modified"),
    ({"adapt": {"stream": {"source": "zip:foo"}}}, 2, "adapt.stream"),
    ({"adapt": {"stream": {"source": "path:nothing/*.txt"}}}, 1, "matches no files"),
    ({"adapt": {"stream": {"chunk_blocks": 500, "max_chunks": 1}, "batch_blocks": 2}}, 1, "shorter than one chunk"),
])
def test_bad_params_and_streams_fail_cleanly(work, change, code, message):
    raw = continual_params()
    for key, value in change["adapt"].items():
        if isinstance(value, dict):
            raw["adapt"][key].update(value)
        else:
            raw["adapt"][key] = value
    Path("continual.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = invoke("adapt", "-p", "continual.yaml")
    assert_clean_failure(result, code)
    assert message in result.output
    assert not (work / "models/adapted").exists()


def test_empty_and_non_utf8_stream_documents_are_named(work):
    (work / "stream" / "zz_empty.txt").write_text("  \n")
    Path("continual.yaml").write_text(yaml.safe_dump(continual_params(), sort_keys=False))
    result = invoke("adapt", "-p", "continual.yaml")
    assert_clean_failure(result, 1)
    assert "zz_empty.txt" in result.output and "empty" in result.output
    (work / "stream" / "zz_empty.txt").write_bytes(b"caf\xe9 au lait\n")
    result = invoke("adapt", "-p", "continual.yaml")
    assert_clean_failure(result, 1)
    assert "zz_empty.txt" in result.output and "UTF-8" in result.output


def test_a_hybrid_whose_files_do_not_match_its_manifest_is_refused(work):
    metadata = work / "models/converted/hybrid.json"
    data = json.loads(metadata.read_text())
    data["plan"]["time_steps"] = data["plan"]["time_steps"] + 1
    metadata.write_text(json.dumps(data))
    Path("continual.yaml").write_text(yaml.safe_dump(continual_params(), sort_keys=False))
    result = invoke("adapt", "-p", "continual.yaml")
    assert_clean_failure(result, 1)
    assert "hybrid.json" in result.output and "manifest" in result.output
    assert not (work / "models/adapted").exists()


def test_continual_report_gives_means_spreads_and_ratios_to_the_reference(work):
    import pandas as pd
    from matplotlib.image import imread

    from snn_research.continual.adapt import CURVE_COLUMNS

    reports = work / "reports" / "curves"
    reports.mkdir(parents=True)
    # hand-made curves: two settings x two seeds, two rows each (start, end)
    ends = {("meta", 0): (20.0, 66.0, 0.30), ("meta", 1): (22.0, 64.0, 0.50),
            ("ann", 0): (10.0, 60.0, 0.10), ("ann", 1): (11.0, 62.0, 0.20)}
    starts = {"meta": (30.0, 64.0), "ann": (15.0, 60.0)}
    for (setting, seed), (new, old, bwt) in ends.items():
        rows = [dict.fromkeys(CURVE_COLUMNS, 0.0) for _ in range(2)]
        rows[0].update(chunk=0, new_ppl=starts[setting][0], old_ppl=starts[setting][1])
        rows[1].update(chunk=6, new_ppl=new, old_ppl=old, bwt_stream=bwt,
                       forgetting=old / starts[setting][1] - 1, new_gain=1 - new / starts[setting][0])
        pd.DataFrame(rows, columns=CURVE_COLUMNS).to_csv(reports / f"{setting}-s{seed}.csv", index=False)
    (work / "timings").mkdir()
    (work / "timings" / "meta-s0.json").write_text(json.dumps({"seconds_per_chunk": [50.0, 300.0, 40.0]}))
    (work / "timings" / "meta-s1.json").write_text(json.dumps({"seconds_per_chunk": [45.0, 60.0]}))
    paths = [str(reports / f"{s}-s{k}.csv") for s, k in ends]
    with saved_figures() as figures:
        result = invoke("continual-report", *paths, "--csv", "reports/all.csv", "--plot", "reports/all.png",
                        "--table", "reports/all.md", "--timings", "timings", "--reference", "ann",
                        "--summary", "reports/summary.csv")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(work / "reports/summary.csv").set_index("setting")
    assert summary.loc["meta", "seeds"] == 2 and summary.loc["meta", "chunks"] == 6
    assert summary.loc["meta", "new_ppl_mean"] == pytest.approx(21.0)
    assert (summary.loc["meta", "new_ppl_min"], summary.loc["meta", "new_ppl_max"]) == (20.0, 22.0)
    assert summary.loc["meta", "bwt_stream_mean"] == pytest.approx(0.4)
    # each run over the reference run with its own seed: 20 / 10 and 22 / 11 at the end, 30 / 15 at the start
    assert summary.loc["meta", "new_vs_reference_mean"] == pytest.approx(2.0)
    assert summary.loc["meta", "new_vs_reference_start_mean"] == pytest.approx(2.0)
    assert summary.loc["meta", "old_vs_reference_mean"] == pytest.approx((66 / 60 + 64 / 62) / 2)
    assert summary.loc["ann", "new_vs_reference_max"] == pytest.approx(1.0)
    table = (work / "reports/all.md").read_text()
    meta_row = next(line for line in table.splitlines() if line.startswith("| meta"))
    assert "| 2 | 6 |" in meta_row and "21.00 (20.00 ... 22.00)" in meta_row
    assert "s / chunk" not in table  # the DVC output holds no timings
    printed = next(line for line in result.output.splitlines() if line.startswith("| meta"))
    assert printed.endswith("| 50 |")  # the median over both runs' chunks: one slow chunk does not set it
    curves = pd.read_csv(work / "reports/all.csv")
    assert len(curves) == 8 and set(curves["seed"]) == {0, 1}
    # the plot: per panel, each setting's mean over its seeds at chunks 0 and 6 (the start rows' BWT is 0)
    [figure] = figures
    assert figure["lines"] == [
        ("meta", [0.0, 6.0], pytest.approx([30.0, 21.0])), ("ann", [0.0, 6.0], pytest.approx([15.0, 10.5])),
        ("meta", [0.0, 6.0], pytest.approx([64.0, 65.0])), ("ann", [0.0, 6.0], pytest.approx([60.0, 61.0])),
        ("meta", [0.0, 6.0], pytest.approx([0.0, 0.4])), ("ann", [0.0, 6.0], pytest.approx([0.0, 0.15])),
        ("meta", [0.0, 6.0], pytest.approx([0.0, (66 / 64 - 1) / 2])),
        ("ann", [0.0, 6.0], pytest.approx([0.0, (62 / 60 - 1) / 2])),
    ]
    assert imread(work / "reports/all.png").shape == (*figure["pixels"], 4)


def test_continual_report_refuses_a_reference_without_every_seed_or_of_another_length(work):
    import pandas as pd

    from snn_research.continual.adapt import CURVE_COLUMNS

    for name in ("meta-s0", "meta-s1", "ann-s0"):
        pd.DataFrame([dict.fromkeys(CURVE_COLUMNS, 1.0)], columns=CURVE_COLUMNS).to_csv(f"{name}.csv", index=False)
    result = invoke("continual-report", "meta-s0.csv", "meta-s1.csv", "ann-s0.csv", "--reference", "ann",
                    "--csv", "all.csv", "--plot", "all.png", "--table", "all.md")
    assert result.exit_code == 1 and "seed(s) [1]" in result.output
    assert not Path("all.csv").exists()
    longer = pd.DataFrame([dict.fromkeys(CURVE_COLUMNS, 1.0)] * 2, columns=CURVE_COLUMNS).assign(chunk=[0, 3])
    longer.to_csv("ann-s1.csv", index=False)
    result = invoke("continual-report", "meta-s0.csv", "meta-s1.csv", "ann-s0.csv", "ann-s1.csv", "--reference",
                    "ann", "--csv", "all.csv", "--plot", "all.png", "--table", "all.md")
    assert result.exit_code == 1 and "run meta-s1 ends after chunk 1" in result.output and "chunk 3" in result.output
    assert not Path("all.csv").exists()


def test_fisher_importance_is_the_mean_squared_gradient_normalised_per_group():
    from snn_research.continual.plasticity import fisher_importance

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
            self.log_threshold = torch.nn.Parameter(torch.tensor([0.5]))

    model = Tiny()
    blocks = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])

    def loss(m, block):  # d/dweight = block; d/dlog_threshold = 10 * sum(block)
        return (m.weight * block[0]).sum() + 10.0 * m.log_threshold.sum() * block[0].sum()

    importance = fisher_importance(model, {"weights": {"weight": model.weight},
                                           "dynamics": {"log_threshold": model.log_threshold}}, blocks, loss)
    squared = torch.tensor([(1 + 9) / 2, (4 + 0) / 2, (0 + 1) / 2])  # mean over blocks of grad^2
    assert torch.allclose(importance["weight"], squared / squared.mean())
    assert torch.allclose(importance["log_threshold"], torch.tensor([1.0]))  # its own group's mean
    with pytest.raises(ValueError, match="'dynamics'"):
        fisher_importance(model, {"weights": {"weight": model.weight},
                                  "dynamics": {"log_threshold": model.log_threshold}}, blocks,
                          lambda m, b: (m.weight * b[0]).sum())


def test_meta_plasticity_reduces_the_drift_of_important_weights_inside_adapt(work):
    from snn_research.continual.adapt import read_state

    raw = continual_params(stream__max_chunks=3, replay__ratio=0.0, meta__strength=0.0, output="models/free")
    run_adapt(raw)
    run_adapt(continual_params(stream__max_chunks=3, replay__ratio=0.0, meta__strength=3.0, output="models/meta"))
    state, _ = read_state(work / "models/meta" / STATE_DIR)
    start, free, meta = (state_tensors(work / f"models/{name}") for name in ("converted", "free", "meta"))
    weighted = {"free": 0.0, "meta": 0.0}
    for name, importance in state.importance.items():
        if name not in start:
            continue
        for label, after in (("free", free), ("meta", meta)):
            weighted[label] += float((importance * (after[name] - start[name]).double().square()).sum())
    assert weighted["free"] > 0
    assert weighted["meta"] < 0.5 * weighted["free"], weighted


def test_the_adapt_schema_documents_every_field():
    result = invoke("schema", "--adapt")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert {"model", "output", "old_splits", "stream", "replay", "meta", "evaluate"} <= set(schema["properties"])
    assert schema["$defs"]["ReplayParams"]["properties"]["ratio"]["maximum"] == 1.0


def test_a_stream_reads_any_package_corpus_the_splits_read():
    from snn_research.continual.params import STREAM_PACKAGES
    from snn_research.continual.stream import stream_documents
    from snn_research.data import PACKAGE_CORPORA, list_documents

    assert set(STREAM_PACKAGES) == set(PACKAGE_CORPORA)
    documents = stream_documents("package:python-stdlib")
    names = [doc.name for doc in documents]
    assert names == sorted(names) and len(names) == len(list_documents("package:python-stdlib")) > 50
    assert "def " in next(doc.text for doc in documents if doc.name == "argparse.py")
    topics = stream_documents("package:pydoc-topics")  # the earlier default: the same documents, same order
    from pydoc_data.topics import topics as shipped
    assert [(d.name, d.text) for d in topics] == [(name, shipped[name]) for name in sorted(shipped)]

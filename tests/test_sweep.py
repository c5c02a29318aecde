"""The coding x T sweep (pipelines/sweep-t): sweep-point, the rate series' noise, the SpikingJelly peer, the frontier
table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from pipeline_support import assert_clean_failure, inside, invoke, run_stages, saved_figures, tiny_params, write_params

from snn_research.evaluation.baselines import Prices
from snn_research.evaluation.frontier import frontier_table
from snn_research.evaluation.peer_qwen2 import as_qwen2, convert_peer, mlp_spikes_per_token, peer_levels
from snn_research.evaluation.sweep import SweepPoint, peer_ffn_energy, read_point, write_point


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny pipeline with the percentile clipping (as evaluate scores the converted hybrid) and one with the
    clipping search, each converted and evaluated (the converted hybrid standing in for the trained ones)."""
    from test_evaluate_stage import copy_as

    root = tmp_path_factory.mktemp("sweep")
    for clipping in ("percentile", "search"):
        folder = root / clipping
        with inside(folder):
            params = tiny_params(convert__clipping=clipping, convert__search_blocks=2)
            if clipping == "percentile":
                del params["convert"]["search_blocks"]
            write_params(params)
            run_stages("download-teacher", "split", "calibrate", "convert")
            for name, stage in (("distilled", "distill"), ("finetuned", "finetune")):
                copy_as(folder / "models" / "converted", folder / "models" / name, stage)
            copy_as(folder / "models" / "teacher", folder / "models" / "teacher_finetuned", "finetune-teacher")
            run_stages("evaluate")
    return root


@pytest.mark.parametrize("clipping", ["percentile", "search"])
def test_a_point_scores_what_convert_and_evaluate_score(pipeline, clipping):
    folder = pipeline / clipping
    with inside(folder):
        result = invoke("sweep-point", "--out", "reports/points/p.json")
        assert result.exit_code == 0, result.output
        point = read_point(Path("reports/points/p.json"))
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    converted = metrics["converted"]
    assert point.series == "weighted" and point.time_steps == metrics["time_steps"] and point.clipping == clipping
    assert point.teacher_ppl == pytest.approx(metrics["teacher"]["ppl"], rel=1e-5)
    for key in ("ppl", "bpb", "agreement_top1", "kl_full_to_teacher", "spike_rate", "ffn_energy_ratio",
                "ffn_energy_ratio_int8", "ffn_energy_ratio_lowbit", "ffn_memory_ratio_per_token", "model_energy_ratio"):
        assert getattr(point, key) == pytest.approx(converted[key], rel=1e-5, abs=1e-9), key
    assert point.ppl_ratio == pytest.approx(converted["ppl_ratio_to_teacher"], rel=1e-5)


@pytest.mark.parametrize(("encoder", "levels"), [("if", 3), ("weighted", 7), ("rate", 3)])
def test_a_point_takes_the_coding_and_t_from_the_overrides(pipeline, encoder, levels):
    with inside(pipeline / "percentile"):
        result = invoke("sweep-point", "-S", f"convert.encoder={encoder}", "-S", "convert.time_steps=3",
                        "--out", f"reports/points/{encoder}3.json")
        assert result.exit_code == 0, result.output
        point = read_point(Path(f"reports/points/{encoder}3.json"))
    assert (point.series, point.encoder, point.time_steps, point.levels) == (encoder, encoder, 3, levels)


def test_rate_noise_is_new_at_every_call_and_a_reloaded_hybrid_repeats_the_sequence(tmp_path):
    """Two calls of a loaded rate hybrid on the same ids draw different noise (as each scored batch and each
    decoding step does), and the folder loaded again draws the same sequence; at one encoder, ``reset_noise``
    restarts the draws, and setting a training step restarts that step's draws."""
    from test_converter import converted

    from snn_research.conversion.ann_to_snn_converter import load_hybrid, save_hybrid
    from snn_research.models.hybrid_transformer import HybridPlan, spiking_mlps

    _, hybrid, metadata, _ = converted("llama", HybridPlan(time_steps=4, encoder="rate", seed=2))
    save_hybrid(hybrid, None, metadata, tmp_path / "rate")
    first, again = load_hybrid(tmp_path / "rate"), load_hybrid(tmp_path / "rate")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        calls = [first(input_ids=ids).logits for _ in range(3)]
        repeated = [again(input_ids=ids).logits for _ in range(3)]
    assert not torch.equal(calls[0], calls[1]) and not torch.equal(calls[1], calls[2])
    assert all(torch.equal(one, two) for one, two in zip(calls, repeated))
    encoder = next(iter(spiking_mlps(first))).input_encoder
    x = (encoder.threshold.detach() / 2).expand(64, -1)  # a spike probability of 1/2 at every step
    encoder.reset_noise()
    trains = [encoder.spike_train(x) for _ in range(2)]
    assert not torch.equal(trains[0], trains[1])
    encoder.reset_noise()
    assert torch.equal(encoder.spike_train(x), trains[0])
    encoder.noise_step = 7  # as a training loop sets it before step 7: the step's draws, however often it is set
    step_seven = [encoder.spike_train(x) for _ in range(2)]
    encoder.noise_step = 7
    assert all(torch.equal(encoder.spike_train(x), train) for train in step_seven)
    assert not torch.equal(step_seven[0], trains[0])


def test_a_point_refuses_bad_params_and_missing_inputs_naming_them(pipeline, tmp_path):
    with inside(pipeline / "percentile"):
        result = invoke("sweep-point", "-S", "convert.encoder=weighted", "-S", "convert.time_steps=32",
                        "--out", "reports/points/bad.json")
        assert_clean_failure(result, 2)
        assert "convert.time_steps" in result.output and not Path("reports/points/bad.json").exists()
    with inside(tmp_path):
        write_params(tiny_params())
        result = invoke("sweep-point", "--out", "p.json")
        assert_clean_failure(result, 1)
        assert "models/teacher" in result.output and not Path("p.json").exists()


def test_point_files_are_validated_naming_the_file_and_field(tmp_path):
    good = point("if", 8)
    write_point(good, tmp_path / "good.json")
    back = read_point(tmp_path / "good.json")
    for key, value in good.model_dump().items():  # 6 significant digits on disk
        assert getattr(back, key) == (pytest.approx(value, rel=5e-6) if isinstance(value, float) else value), key
    assert back.ppl_ratio != good.ppl_ratio and f"{good.ppl_ratio:.6g}" == str(back.ppl_ratio)
    (tmp_path / "bad.json").write_text(json.dumps({**good.model_dump(), "agreement_top1": 1.5}))
    with pytest.raises(ValueError, match=r"bad\.json.*\n.*agreement_top1"):
        read_point(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="absent.json: no such sweep point"):
        read_point(tmp_path / "absent.json")


def point(series: str, time_steps: int, ppl: float = 80.0, energy: float = 0.3,
          teacher_ppl: float = 70.0) -> SweepPoint:
    return SweepPoint(series=series, encoder=series, time_steps=time_steps, levels=time_steps, clipping="search",
                      test_tokens=4096, teacher_ppl=teacher_ppl, ppl=ppl, ppl_ratio=ppl / teacher_ppl, bpb=2.0,
                      agreement_top1=0.8, kl_full_to_teacher=0.1, spike_rate=0.2, ffn_energy_ratio=energy,
                      ffn_energy_ratio_int8=energy * 20)


def test_frontier_writes_one_row_per_point_sorted_by_series_and_t(tmp_path):
    files = []
    for series, t, ppl in (("weighted", 8, 71.0), ("if", 8, 90.0), ("if", 2, 300.0), ("spikingjelly-qwen2", 4, 120.0)):
        files.append(tmp_path / f"{series}-{t}.json")
        write_point(point(series, t, ppl, energy=0.05 * t), files[-1])
    with saved_figures() as figures:
        result = invoke("frontier", *map(str, files), "--csv", str(tmp_path / "f.csv"), "--plot",
                        str(tmp_path / "f.png"))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "f.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["series"], int(r["time_steps"])) for r in rows] == [
        ("if", 2), ("if", 8), ("spikingjelly-qwen2", 4), ("weighted", 8)]
    assert [float(r["ppl"]) for r in rows] == [300.0, 90.0, 120.0, 71.0]
    assert [float(r["ffn_energy_ratio"]) for r in rows] == [0.1, 0.4, 0.2, 0.4]
    assert list(rows[0]) == list(SweepPoint.model_fields)
    # the plot: one line per series, perplexity against FFN energy in order of energy, and the teacher's level
    [figure] = figures
    lines = {label: (xs, ys) for label, xs, ys in figure["lines"]}
    assert lines == {"if": ([0.1, 0.4], [300.0, 90.0]), "spikingjelly-qwen2": ([0.2], [120.0]),
                     "weighted": ([0.4], [71.0]), "teacher": ([0.0, 1.0], [70.0, 70.0])}
    assert sorted(figure["texts"]) == ["T=2", "T=4", "T=8", "T=8"]
    assert imread(tmp_path / "f.png").shape == (*figure["pixels"], 4) == (440, 660, 4)  # 6 x 4 in at 110 dpi
    assert "weighted" in result.output and "1.014x" in result.output


def test_frontier_refuses_repeats_mixed_teachers_and_bad_files_writing_nothing(tmp_path):
    first, second, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    write_point(point("if", 8), first)
    write_point(point("if", 8, ppl=81.0), second)
    write_point(point("rate", 8, teacher_ppl=60.0), other)
    with pytest.raises(ValueError, match="b.json: if at T=8 again"):
        frontier_table([first, second])
    with pytest.raises(ValueError, match="different teachers or test sets"):
        frontier_table([first, other])
    (tmp_path / "bad.json").write_text("{not json")
    result = invoke("frontier", str(first), str(tmp_path / "bad.json"), "--csv", str(tmp_path / "f.csv"),
                    "--plot", str(tmp_path / "f.png"))
    assert_clean_failure(result, 1)
    assert "bad.json" in result.output and not (tmp_path / "f.csv").exists() and not (tmp_path / "f.png").exists()


def test_peer_ffn_energy_matches_a_hand_count():
    # Two layers, hidden d = 2, intermediate f = 3, T = 2; 3 spikes per token into layer 0's down_proj, 1 into
    # layer 1's. Prices picked so that a total reads as MACs x 1000 + ACs: MAC 1000 pJ, AC 1 pJ, INT8 MAC
    # 0.07 + 0.03 = 0.1 pJ.
    # Teacher, per layer and token: gate 2 x 3 = 6, up 6, down 3 x 2 = 6, SiLU 3, gating multiply 3: 24 MACs.
    # Peer, per layer and token: gate 6 + up 6 = 12 MACs on the teacher's table; SiLU 3 + multiply 3 + the
    # rescale of down_proj's 2 outputs = 8 MACs at FP32; its encoder's 2 IF neurons x 3 channels integrate at
    # each of the 2 steps: 12 ACs; each spike reaches down_proj's 2 outputs: 3 x 2 = 6 ACs in layer 0, 2 in
    # layer 1. Both layers: teacher 48 MACs; peer 24 + 16 MACs, 18 + 14 = 32 ACs.
    prices = Prices(e_mac_pj=1000.0, e_ac_pj=1.0, e_mult_int8_pj=0.07, e_add_int8_pj=0.03)
    energy = peer_ffn_energy(2, 3, 2, 2, [3.0, 1.0], prices)
    assert energy["ffn_energy_ratio"] == pytest.approx(40_032 / 48_000)
    assert energy["ffn_energy_ratio_int8"] == pytest.approx((24 * 0.1 + 16_032) / (48 * 0.1))
    assert energy["spike_rate"] == pytest.approx(4 / 24)  # 4 spikes over 2 layers x 6 neurons x 2 steps
    with pytest.raises(ValueError, match="no layers"):
        peer_ffn_energy(2, 3, 2, 2, [], prices)


def tiny_llama(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **changes)
    return LlamaForCausalLM(config).eval()


def test_the_qwen2_copy_of_a_llama_is_exact_and_other_models_are_refused():
    llama = tiny_llama()
    ids = torch.randint(0, 97, (2, 12))
    qwen = as_qwen2(llama, ids[:1])
    assert qwen.config.model_type == "qwen2"
    with torch.no_grad():
        gap = (qwen(input_ids=ids).logits - llama(input_ids=ids).logits).abs().max()
    assert float(gap) < 1e-5
    assert all(float(p.detach().abs().max()) == 0 for n, p in qwen.named_parameters() if n.endswith("proj.bias"))
    with pytest.raises(ValueError, match="attention_bias is True"):
        as_qwen2(tiny_llama(attention_bias=True), ids[:1])
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        as_qwen2(tiny_llama(hidden_act="gelu"), ids[:1])
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="Llama-family teacher.*'gpt2'"):
        as_qwen2(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97)).eval(), ids[:1])


def test_a_qwen2_copy_that_differs_is_refused(monkeypatch):
    import transformers

    original = transformers.Qwen2ForCausalLM.load_state_dict

    def shifted(self, state, strict=True):  # a copy that loses a weight
        state = dict(state)
        state["model.norm.weight"] = state["model.norm.weight"] + 1.0
        return original(self, state, strict=strict)

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "load_state_dict", shifted)
    with pytest.raises(ValueError, match="not exact"):
        as_qwen2(tiny_llama(), torch.randint(0, 97, (1, 8)))


def test_the_peer_without_spikingjelly_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jelly(name, *args, **kwargs):
        if name.startswith("spikingjelly"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jelly)
    with pytest.raises(ValueError, match="make peer"):
        convert_peer(tiny_llama(), torch.randint(0, 97, (2, 8)), 4, 2, 1.0, 2)


def test_peer_levels_follow_the_recipe_default():
    assert [peer_levels(t) for t in (1, 2, 4, 8, 32)] == [1, 1, 2, 4, 16]


def test_the_peer_converts_and_its_spikes_are_counted():
    pytest.importorskip("spikingjelly", reason="the peer needs SpikingJelly (make peer)")
    llama = tiny_llama()
    ids = torch.randint(0, 97, (4, 16))
    qwen = as_qwen2(llama, ids[:1])
    snn = convert_peer(qwen, ids, time_steps=8, levels=4, quantile=1.0, batch_size=2)
    with torch.no_grad():
        exact = snn(input_ids=ids, encoding_mode="exact_td").logits
        reference = llama(input_ids=ids).logits
    assert float((exact - reference).abs().max()) < 1e-4  # without its encoders the recipe is the teacher
    with torch.no_grad():  # the membranes are reset before each call: a batch's logits do not depend on the last
        halves = torch.cat([snn(input_ids=ids[:2]).logits, snn(input_ids=ids[2:]).logits])
        whole = snn(input_ids=ids).logits
    assert torch.equal(halves, whole)
    spikes = mlp_spikes_per_token(snn, ids, batch_size=2)
    assert len(spikes) == 2 and all(0 < s <= 2 * 8 * 48 for s in spikes)
    # by hand: the nonzero spikes layer 0's encoder sends, both signs, on the whole batch at once
    sent = {}
    encoder = snn.layers[0].encoders["mlp"]
    original = encoder.encode
    encoder.encode = lambda value, mask=None: sent.setdefault("spikes", original(value, mask))
    snn(input_ids=ids)
    assert spikes[0] == pytest.approx(int(sent["spikes"].count_nonzero()) / ids.numel())
    with pytest.raises(ValueError, match="SpikingJelly refused"):
        convert_peer(qwen, ids, time_steps=2, levels=4, quantile=1.0, batch_size=2)


def test_the_sweep_pipeline_scores_every_point_of_sweep_yaml_and_each_is_valid():
    import yaml

    from snn_research.config import load_params

    folder = Path(__file__).resolve().parents[1] / "pipelines" / "sweep-t"
    sweep = yaml.safe_load((folder / "sweep.yaml").read_text())
    frontier = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]["frontier"]
    files = [f"reports/points/{name}.json" for name in sweep["points"]] + [
        f"reports/points/spikingjelly-t{t}.json" for t in sweep["peer_time_steps"]]
    assert frontier["cmd"].split()[2:2 + len(files)] == files
    assert [d for d in frontier["deps"] if d.startswith("reports/")] == files
    for name, setting in sweep["points"].items():
        assert name == f"{setting['encoder']}-t{setting['time_steps']}"
        params = load_params(folder / "params.yaml", [f"convert.encoder={setting['encoder']}",
                                                      f"convert.time_steps={setting['time_steps']}"])
        assert (params.convert.encoder, params.convert.time_steps) == (setting["encoder"], setting["time_steps"])

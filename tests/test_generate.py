import json

import pytest
import torch
from conftest import tiny_config
from pipeline_support import assert_clean_failure, invoke
from transformers import AutoModelForCausalLM

from snn_research.conversion.ann_to_snn_converter import TeacherIdentity, convert, save_hybrid
from snn_research.conversion.calibrator import Calibrator
from snn_research.evaluation.energy import measure_energy
from snn_research.generate import GenerationOptions, _pieces, generate, generate_ids, load_model_folder, next_token
from snn_research.models.hybrid_transformer import HybridPlan
from snn_research.teacher import byte_tokenizer

TOKENIZER = byte_tokenizer()
PROMPT = "To be, or"  # with <bos>, 10 tokens: past Gemma 3's 8-token sliding window once generation starts


def teacher_and_hybrid(family: str, sites=("ffn",)) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny random teacher over the byte tokenizer's vocabulary and its T=8 conversion."""
    torch.manual_seed(0)
    config = tiny_config(family)
    config.vocab_size = len(TOKENIZER)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # wider than the default init so that the FFNs and spikes matter (as conftest.tiny_model)
        for param in teacher.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    teacher.eval()
    calibrator = Calibrator(teacher, sites=sites)
    generator = torch.Generator().manual_seed(2)
    calibrator.run([torch.randint(0, len(TOKENIZER), (2, 24), generator=generator) for _ in range(4)])
    calibrator.remove_hooks()
    identity = TeacherIdentity(source=f"random:{family}", sha256="0" * 64, model_type=config.model_type,
                               architectures=["X"], num_layers=2)
    hybrid, metadata, _ = convert(teacher, calibrator.result(99.9), HybridPlan(time_steps=8, sites=list(sites)),
                                  identity, "f" * 64)
    hybrid.hybrid_metadata = metadata
    return teacher, hybrid


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def models(request) -> dict[str, torch.nn.Module]:
    teacher, hybrid = teacher_and_hybrid(request.param)
    _, sited = teacher_and_hybrid(request.param, sites=("ffn", "qkv", "o", "head"))  # every site spiking
    return {"teacher": teacher, "hybrid": hybrid, "sited": sited}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    teacher, hybrid = teacher_and_hybrid("llama")
    root = tmp_path_factory.mktemp("generate")
    teacher.save_pretrained(root / "teacher")
    TOKENIZER.save_pretrained(root / "teacher")
    save_hybrid(hybrid, TOKENIZER, hybrid.hybrid_metadata, root / "hybrid")
    return {"teacher": str(root / "teacher"), "hybrid": str(root / "hybrid")}


def prompt_ids() -> list[int]:
    return TOKENIZER(PROMPT)["input_ids"]


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "sited"])
@pytest.mark.parametrize("sample", [False, True])
def test_cached_generation_matches_recomputing_the_full_sequence(models, kind, sample):
    model = models[kind]
    options = GenerationOptions(max_new_tokens=12, sample=sample, top_k=40, seed=5, stop_at_eos=False)
    cached, _, _ = generate_ids(model, prompt_ids(), options)
    sequence, generator = prompt_ids(), torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        for _ in range(options.max_new_tokens):
            logits = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1]
            sequence.append(next_token(logits, options, generator))
    assert cached == sequence[len(prompt_ids()):]


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_greedy_picks_the_argmax_of_a_plain_forward_at_every_step(models, kind):
    model = models[kind]
    tokens, _, _ = generate_ids(model, prompt_ids(), GenerationOptions(max_new_tokens=12, stop_at_eos=False))
    sequence = prompt_ids() + tokens
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0]  # (L, V)
    start = len(prompt_ids()) - 1  # the logits at the prompt's last token choose the first generated token
    assert tokens == logits[start:start + len(tokens)].argmax(-1).tolist()


def test_sampling_with_a_seed_is_reproducible_and_differs_across_seeds(models):
    model = models["hybrid"]

    def sampled(seed: int, top_k: int | None = None) -> list[int]:
        options = GenerationOptions(max_new_tokens=16, sample=True, top_k=top_k, seed=seed, stop_at_eos=False)
        return generate_ids(model, prompt_ids(), options)[0]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    greedy = generate_ids(model, prompt_ids(), GenerationOptions(max_new_tokens=16, stop_at_eos=False))[0]
    assert sampled(7, top_k=1) == greedy  # a draw from the single likeliest token is greedy decoding


@pytest.mark.parametrize("kind", ["teacher", "hybrid", "sited"])
def test_per_token_energy_averages_to_measure_energy_of_the_sequence(models, kind):
    model = models[kind]
    # a one-token prompt: every position of the sequence gets its own single-position forward pass
    tokens, stats, _ = generate_ids(model, [1], GenerationOptions(max_new_tokens=12, stop_at_eos=False))
    sequence = torch.tensor([[1] + tokens[:-1]])  # the last token chosen is never fed back
    report = measure_energy(model, sequence)
    count = sequence.shape[1]
    assert sum(s["energy_pj"] for s in stats) / count == pytest.approx(report.hybrid_energy_pj, rel=1e-9)
    assert sum(s["ffn_energy_pj"] for s in stats) / count == pytest.approx(report.hybrid_ffn_energy_pj, rel=1e-9)
    assert sum(s["dense_energy_pj"] for s in stats) / count == pytest.approx(report.teacher_energy_pj, rel=1e-9)
    assert sum(s["dense_ffn_energy_pj"] for s in stats) / count == pytest.approx(report.teacher_ffn_energy_pj,
                                                                                 rel=1e-9)
    if kind != "teacher":
        assert sum(s["spike_rate"] for s in stats) / count == pytest.approx(report.mean_spike_rate, rel=1e-9)


def test_hybrid_reports_spike_rates_in_the_unit_interval_and_a_teacher_none(models):
    options = GenerationOptions(max_new_tokens=8, stop_at_eos=False)
    hybrid = generate(models["hybrid"], TOKENIZER, PROMPT, options)
    teacher = generate(models["teacher"], TOKENIZER, PROMPT, options)
    assert len(hybrid.tokens) == len(teacher.tokens) == 8
    assert all(0.0 < t.spike_rate < 1.0 for t in hybrid.tokens)
    assert all(t.energy_pj > t.ffn_energy_pj > 0 and t.dense_energy_pj > t.dense_ffn_energy_pj > 0
               for t in hybrid.tokens + teacher.tokens)
    assert all(t.spike_rate is None and t.energy_pj == t.dense_energy_pj for t in teacher.tokens)
    # attention reads one more key per position: a teacher's energy grows by the same step every token
    steps = {round(b.energy_pj - a.energy_pj, 6) for a, b in zip(teacher.tokens, teacher.tokens[1:])}
    assert len(steps) == 1 and steps.pop() > 0
    assert hybrid.kind == "hybrid" and hybrid.time_steps == 8 and teacher.kind == "teacher"
    assert hybrid.text == TOKENIZER.decode(hybrid.token_ids, skip_special_tokens=True)
    assert "".join(t.text for t in hybrid.tokens) == TOKENIZER.decode(hybrid.token_ids)
    assert hybrid.summary()["spike_rate"] == pytest.approx(sum(t.spike_rate for t in hybrid.tokens) / 8)


def test_generation_stops_at_the_end_of_sequence_token(models):
    model = models["teacher"]
    first = generate_ids(model, prompt_ids(), GenerationOptions(max_new_tokens=1))[0][0]
    tokens, _, _ = generate_ids(model, prompt_ids(), GenerationOptions(max_new_tokens=12), eos_ids={first})
    assert tokens == [first]


def test_a_multi_byte_character_shows_at_its_last_byte():
    ids = TOKENIZER("aé")["input_ids"][1:]  # 'a', then the two bytes of 'é'
    assert _pieces(TOKENIZER, ids) == ["a", "", "é"]
    assert _pieces(TOKENIZER, ids[:2]) == ["a", "\ufffd"]  # the last token shows what it has, unfinished or not


def test_options_refuse_values_naming_them():
    with pytest.raises(ValueError, match=r"temperature must be > 0 \(got 0.0\)"):
        GenerationOptions(temperature=0.0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1 \(got 0\)"):
        GenerationOptions(max_new_tokens=0)


def test_load_model_folder_tells_a_hybrid_from_a_teacher(folders):
    assert load_model_folder(folders["hybrid"])[2] == "hybrid"
    assert load_model_folder(folders["teacher"])[2] == "teacher"


def test_cli_prints_a_table_per_token_and_a_summary(folders):
    result = invoke("generate", folders["hybrid"], PROMPT, "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "spike rate" in result.output and "model pJ" in result.output
    model, _, _ = load_model_folder(folders["hybrid"])
    expected = generate(model, TOKENIZER, PROMPT, GenerationOptions(max_new_tokens=5))
    for i, token in enumerate(expected.tokens):
        assert f"│ {i} │ {token.token_id:>5} │" in result.output
        assert f"{token.spike_rate:.3f}" in result.output and f"{token.energy_pj:,.0f}" in result.output
    assert f"T=8, spike rate {expected.summary()['spike_rate']:.3f}" in result.output


def test_cli_compare_prints_both_runs_and_json_agrees(folders):
    args = ("generate", folders["teacher"], PROMPT, "--compare", folders["hybrid"], "--max-new-tokens", "6")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "(teacher)" in result.output and "(hybrid)" in result.output
    assert "first difference at generated token" in result.output or "agree on all" in result.output
    data = json.loads(invoke(*args, "--json").stdout)
    teacher, hybrid = data["runs"]
    assert teacher["kind"] == "teacher" and hybrid["kind"] == "hybrid"
    assert all(t["spike_rate"] is None for t in teacher["tokens"])
    assert all(0 <= t["spike_rate"] <= 1 for t in hybrid["tokens"])
    pairs = list(zip(teacher["token_ids"], hybrid["token_ids"]))
    expected = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    assert data["first_difference"] == expected
    assert hybrid["summary"]["tokens"] == len(hybrid["token_ids"])


def test_cli_refuses_a_missing_folder(tmp_path):
    result = invoke("generate", str(tmp_path / "no-such-model"), PROMPT)
    assert_clean_failure(result, 1)
    assert "no-such-model: model folder not found" in result.output


def test_cli_refuses_an_empty_prompt(folders):
    result = invoke("generate", folders["teacher"], "  ")
    assert_clean_failure(result, 1)
    assert "PROMPT is empty" in result.output


def test_cli_refuses_sampling_flags_without_sample(folders):
    result = invoke("generate", folders["teacher"], PROMPT, "--temperature", "0.5")
    assert_clean_failure(result, 1)
    assert "--temperature without --sample" in result.output and "(got --temperature 0.5)" in result.output

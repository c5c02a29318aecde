"""The lm-evaluation-harness adapter: its scores are the project's own, and the harness runs it on local tasks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline_support import REPO, invoke, prepare, tiny_params
from snn_research.evaluation.harness import FolderLM

TASKS = REPO / "tests" / "data" / "lm_eval"


@dataclass
class Request:
    args: tuple


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny converted hybrid (random Gemma 3, byte tokenizer) and its teacher."""
    return prepare(tmp_path_factory.mktemp("harness"), tiny_params(), ("download-teacher", "split", "calibrate",
                                                                       "convert"))


@pytest.fixture(scope="module")
def hybrid(pipeline) -> FolderLM:
    return FolderLM(pipeline / "models/converted", max_length=31)


def test_rolling_loglikelihood_of_one_block_equals_the_projects_scorer(pipeline, hybrid):
    from snn_research.data import tokenize_blocks
    from snn_research.evaluation.quality import evaluate_quality
    from snn_research.generate import load_model_folder

    teacher, _, _ = load_model_folder(pipeline / "models/teacher")
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 2
    tokens = hybrid._encode(text)
    text = hybrid.tokenizer.decode(tokens[:31])  # exactly one block's worth of text
    blocks = tokenize_blocks([text], hybrid.tokenizer, 32)
    assert blocks.input_ids.shape[0] == 1
    totals = evaluate_quality(teacher, {"hybrid": hybrid.model}, blocks.input_ids, blocks.target_bytes, 1)
    (rolling,) = hybrid.loglikelihood_rolling([Request((text,))])
    assert rolling == pytest.approx(-totals["hybrid"].nll, rel=1e-5)
    assert rolling < 0


def test_rolling_windows_predict_every_token_once_with_the_most_context(hybrid):
    tokens = list(range(3, 3 + 70))
    windows = hybrid.rolling_windows(tokens)
    assert windows[0] == (hybrid.prefix + tokens[:31], 31)
    scored = [token for ids, count in windows for token in ids[len(ids) - count:]]
    assert scored == tokens  # each token once, in order
    assert all(len(ids) - 1 <= hybrid.max_length for ids, _ in windows)  # at most max_length predictions
    assert len(windows[-1][0]) - 1 == hybrid.max_length  # the last window still has the full context


def test_rolling_loglikelihood_is_the_sum_of_its_windows_continuations(hybrid):
    text = "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken."
    tokens = hybrid._encode(text)
    assert len(tokens) > 2 * hybrid.max_length
    (rolling,) = hybrid.loglikelihood_rolling([Request((text,))])
    total = 0.0
    for ids, scored in hybrid.rolling_windows(tokens):
        context, target = ids[:-scored], ids[-scored:]
        with torch.no_grad():
            logits = hybrid.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].double()
        log_probs = logits.log_softmax(-1)[len(context) - 1:]
        total += float(log_probs.gather(-1, torch.tensor(target)[:, None]).sum())
    assert rolling == pytest.approx(total, rel=1e-5)


def test_loglikelihood_scores_the_continuation_after_its_context(hybrid):
    context, continuation = "To be, or not to ", "be"
    (whole,) = hybrid.loglikelihood_rolling([Request((context + continuation,))])
    (prefix,) = hybrid.loglikelihood_rolling([Request((context.rstrip(),))])
    (score, greedy), = hybrid.loglikelihood([Request((context, continuation))])
    assert score == pytest.approx(whole - prefix, rel=1e-5)  # the trailing space moved to the continuation
    context_ids, continuation_ids = hybrid.encode_pair(context, continuation)
    assert hybrid.tokenizer.decode(continuation_ids) == " be"
    with torch.no_grad():
        logits = hybrid.model(input_ids=torch.tensor([context_ids + continuation_ids]), use_cache=False).logits[0]
    predicted = logits[len(context_ids) - 1: -1].argmax(-1).tolist()
    assert greedy == (predicted == continuation_ids)


def test_generate_until_is_greedy_decoding_cut_at_the_first_stop(hybrid):
    ids = hybrid.prefix + hybrid._encode("All the world's a")
    generated = []
    with torch.no_grad():  # greedy decoding written here without a cache: one full forward per token
        for _ in range(12):
            token = int(hybrid.model(input_ids=torch.tensor([ids + generated]), use_cache=False).logits[0, -1].argmax())
            generated.append(token)
            if token == hybrid.tokenizer.eos_token_id:
                break
    text = hybrid.tokenizer.decode(generated, skip_special_tokens=True)
    (full,) = hybrid.generate_until([Request(("All the world's a", {"until": [], "max_gen_toks": 12}))])
    assert full == text
    stop = text[3:5]
    (cut,) = hybrid.generate_until([Request(("All the world's a", {"until": [stop], "max_gen_toks": 12}))])
    assert cut == text[: text.index(stop)]
    with pytest.raises(ValueError, match="greedily"):
        hybrid.generate_until([Request(("x", {"do_sample": True}))])


def _merging_tokenizer():
    """A BPE tokenizer whose merge 'bc' straddles the boundary of context 'ab' and continuation 'cd'."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "a": 1, "b": 2, "c": 3, "d": 4, " ": 5, "bc": 6}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c")]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>")


def test_a_pair_is_split_where_the_whole_texts_tokens_start():
    from snn_research.evaluation.harness import encode_pair

    tokenizer = _merging_tokenizer()
    whole = tokenizer("abcd", add_special_tokens=False)["input_ids"]
    assert whole == [1, 6, 4]  # 'bc' merges across the boundary
    context_ids, continuation_ids = encode_pair(tokenizer, [0], "ab", "cd")
    assert context_ids + continuation_ids == [0, *whole]  # the model sees the tokenizer's own split
    assert continuation_ids == [4]  # the straddling token counts with the context
    assert encode_pair(tokenizer, [0], "a ", "bd") == ([0, 1], [5, 2, 4])  # the space moves to the continuation
    assert encode_pair(tokenizer, [0], "<bos>ab", "d") == ([0, 1, 2], [4])  # no second BOS
    assert encode_pair(tokenizer, [0], "ab", "") == ([0, 1, 2], [])


def test_an_empty_or_overlong_continuation_is_scored_not_refused(hybrid):
    (empty,) = hybrid.loglikelihood([Request(("To be", ""))])
    assert empty == (0.0, True)
    long_continuation = " to be or not to be" * 4  # longer than the 31-token window
    (score, _), = hybrid.loglikelihood([Request(("Hamlet:", long_continuation))])
    _, continuation_ids = hybrid.encode_pair("Hamlet:", long_continuation)
    (rolling,) = hybrid.loglikelihood_rolling([Request(("Hamlet:" + long_continuation,))])
    assert len(continuation_ids) > hybrid.max_length and math.isfinite(score) and score < 0
    assert score > rolling  # only the last window's tokens are scored


def test_the_harness_runs_local_tasks_on_a_hybrid_folder_with_its_scores(pipeline, hybrid, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="the harness extra is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository
    result = invoke("lm-eval", str(pipeline / "models/converted"), "--tasks", "snn_tiny_cloze,snn_tiny_rolling",
                    "--include-path", str(TASKS), "--max-length", "31", "--output", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    # the cloze accuracy, by hand from the adapter's own log-likelihoods
    documents = [json.loads(line) for line in (TASKS / "tiny_cloze.jsonl").read_text().splitlines()]
    correct = 0
    for doc in documents:
        scores = [score for score, _ in hybrid.loglikelihood([Request((doc["context"], " " + choice))
                                                              for choice in doc["choices"]])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert results["snn_tiny_cloze"]["acc,none"] == pytest.approx(correct / len(documents))
    # word perplexity of the rolling task: exp(-sum of log-likelihoods / words), by hand
    texts = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines()]
    total = sum(hybrid.loglikelihood_rolling([Request((text,)) for text in texts]))
    words = sum(len(text.split()) for text in texts)  # the harness counts words by whitespace
    assert results["snn_tiny_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)


def test_lm_eval_names_unknown_tasks_and_missing_folders(pipeline, tmp_path):
    pytest.importorskip("lm_eval", reason="the harness extra is not installed")
    result = invoke("lm-eval", str(pipeline / "models/converted"), "--tasks", "no_such_task_anywhere",
                    "--output", str(tmp_path / "out.json"))
    assert result.exit_code == 1 and "no_such_task_anywhere" in result.output
    assert not (tmp_path / "out.json").exists()
    missing = tmp_path / "nothing"
    result = invoke("lm-eval", str(missing), "--tasks", "snn_tiny_cloze", "--include-path", str(TASKS))
    assert result.exit_code == 1 and "model folder not found" in result.output


def test_the_model_class_registers_under_its_name():
    pytest.importorskip("lm_eval", reason="the harness extra is not installed")
    from lm_eval.api.registry import get_model

    from snn_research.evaluation.harness import MODEL_NAME, register

    assert get_model(MODEL_NAME) is register()
    with pytest.raises(ValueError, match="path=<model folder>"):
        register().create_from_arg_string("max_length=8")

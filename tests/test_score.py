"""`snn-research score`: the teacher and hybrids on any text, with evaluate's scorer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from pipeline_support import assert_clean_failure, inside, invoke, prepare, tiny_params
from transformers import AutoModelForCausalLM

from snn_research.evaluation.domains import corpus_blocks
from snn_research.generate import load_model_folder
from snn_research.teacher import byte_tokenizer, random_config

PROSE = ("The committee met on a grey morning to weigh the harbour accounts, and found the ledgers in good "
         "order but the warehouses half empty. ") * 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = prepare(tmp_path_factory.mktemp("score"), tiny_params(), ("download-teacher", "split", "calibrate",
                                                                       "convert"))
    texts = folder / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(PROSE)
    (texts / "b.txt").write_text(PROSE.upper())
    shutil.copytree(folder / "models" / "teacher", folder / "teacher_copy")
    return folder


def test_scores_match_a_hand_count_and_the_teacher_scores_equal_to_itself(converted):
    with inside(converted):
        done = invoke("score", "models/converted", "teacher_copy", "--teacher", "models/teacher",
                      "--corpus", "path:texts/*.txt", "--max-blocks", "6", "--block-length", "32",
                      "--output", "score.json")
        assert done.exit_code == 0, done.output
        result = json.loads((converted / "score.json").read_text())
        teacher, tokenizer, _ = load_model_folder("models/teacher")
        blocks, _ = corpus_blocks("path:texts/*.txt", tokenizer, 32, 6)
    assert result["documents"] == 2 and result["blocks"] == 6 == blocks.input_ids.shape[0]
    assert result["scored_tokens"] == 6 * 31
    with torch.no_grad():  # the teacher's ppl and bpb by hand
        logits = teacher(input_ids=blocks.input_ids).logits[:, :-1].double()
    nll = -logits.log_softmax(-1).gather(-1, blocks.input_ids[:, 1:, None]).sum().item()
    assert result["teacher"]["ppl"] == pytest.approx(math.exp(nll / (6 * 31)), rel=1e-5)
    assert result["teacher"]["bpb"] == pytest.approx(nll / math.log(2) / int(blocks.target_bytes.sum()), rel=1e-5)
    copy = result["models"]["teacher_copy"]  # the teacher scored against itself
    assert copy["ppl_ratio_to_teacher"] == pytest.approx(1.0, abs=1e-6) and copy["agreement_top1"] == 1.0
    assert copy["kl_full_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    hybrid = result["models"]["models/converted"]
    assert 0 <= hybrid["agreement_top1"] <= 1 and hybrid["kl_full_to_teacher"] > 1e-6
    assert hybrid["ppl_ratio_to_teacher"] == pytest.approx(hybrid["ppl"] / result["teacher"]["ppl"])
    assert "| models/converted |" in done.output and "2 documents (186 scored tokens)" in done.output


def test_bad_corpora_and_folders_are_refused_by_name(converted, tmp_path):
    with inside(converted):
        none = invoke("score", "models/converted", "--teacher", "models/teacher", "--corpus", "path:nothing/*.txt")
        assert_clean_failure(none, 1)
        assert "corpus 'path:nothing/*.txt'" in none.output and "matches no files" in none.output
        short = invoke("score", "models/converted", "--teacher", "models/teacher", "--corpus", "path:texts/a.txt",
                       "--block-length", "4096")
        assert_clean_failure(short, 1)
        assert "no document holds a whole block of 4096 tokens" in short.output
        other = tmp_path / "wider"  # the tiny Gemma 3 with a vocabulary 41 tokens larger
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(random_config("gemma3", len(byte_tokenizer()) + 41)).save_pretrained(other)
        byte_tokenizer().save_pretrained(other)
        mismatch = invoke("score", str(other), "--teacher", "models/teacher", "--corpus", "path:texts/*.txt")
        assert_clean_failure(mismatch, 1)
        assert "scoring needs one tokenizer" in mismatch.output

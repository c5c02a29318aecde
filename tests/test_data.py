"""The document-level split (editions of a play stay together), token blocks, and bad corpora at the split stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_support import assert_clean_failure, copy_pipeline, invoke, prepare, set_dotted, tiny_params, write_params

from snn_research.config import SplitFractions
from snn_research.data import (
    FOLIO_ALIASES,
    SPLITS,
    Document,
    list_documents,
    shakespeare_folder,
    split_documents,
    tokenize_blocks,
    work_group,
)
from snn_research.teacher import byte_tokenizer

FRACTIONS = [SplitFractions(), SplitFractions(train=0.4, calib=0.2, val=0.2, test=0.2)]


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return list_documents("package:shakespeare")


def split_of(assignment: dict[str, list[Document]]) -> dict[str, str]:
    return {doc.name: name for name, docs in assignment.items() for doc in docs}


def test_every_folio_edition_has_a_gutenberg_partner(documents):
    names = {doc.name for doc in documents}
    groups = {doc.group for doc in documents if doc.name.endswith("_gut.txt")}
    folios = [name for name in names if name.endswith("_gut_f.txt")]
    assert len(folios) >= 30
    orphans = [name for name in folios if work_group(Path(name).stem) not in groups]
    assert orphans == [], f"Folio editions without a Gutenberg partner (extend FOLIO_ALIASES): {orphans}"


def test_every_alias_names_files_that_exist(documents):
    stems = {Path(doc.name).stem for doc in documents}
    for folio, gutenberg in FOLIO_ALIASES.items():
        assert f"{folio}_gut_f" in stems, folio
        assert f"{gutenberg}_gut" in stems, gutenberg
        assert work_group(f"{folio}_gut_f") == work_group(f"{gutenberg}_gut") == gutenberg


def test_work_group_strips_the_edition_suffix():
    assert work_group("hamlet_gut") == work_group("hamlet_gut_f") == "hamlet"
    assert work_group("twelfe-night_gut_f") == "twelfth_night"
    assert work_group("notes") == "notes"


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fractions", FRACTIONS, ids=["70-10-10-10", "40-20-20-20"])
def test_split_keeps_groups_together_and_respects_fractions(documents, fractions, seed):
    assignment = split_documents(documents, fractions, seed)
    where = split_of(assignment)

    assert sorted(where) == sorted(doc.name for doc in documents)  # every document exactly once
    assert sum(len(docs) for docs in assignment.values()) == len(documents)
    for group in {doc.group for doc in documents}:
        splits = {where[doc.name] for doc in documents if doc.group == group}
        assert len(splits) == 1, f"group {group!r} is in {splits}"
    assert where["hamlet_gut.txt"] == where["hamlet_gut_f.txt"]
    for folio, gutenberg in FOLIO_ALIASES.items():
        assert where[f"{folio}_gut_f.txt"] == where[f"{gutenberg}_gut.txt"], folio
    for name in SPLITS:
        target = getattr(fractions, name) * len(documents)
        assert abs(len(assignment[name]) - target) <= 2, (name, len(assignment[name]), target)


def test_split_is_deterministic_for_a_seed_and_differs_for_another(documents):
    first = split_of(split_documents(documents, SplitFractions(), seed=3))
    again = split_of(split_documents(list(reversed(documents)), SplitFractions(), seed=3))
    other = split_of(split_documents(documents, SplitFractions(), seed=4))
    assert first == again
    assert first != other


def test_too_few_groups_is_a_clear_error(documents):
    hamlet = [doc for doc in documents if doc.group in ("hamlet", "macbeth", "othello")]
    assert len(hamlet) == 6
    with pytest.raises(ValueError, match=r"3 document groups \(hamlet, macbeth, othello\).*at least 4"):
        split_documents(hamlet, SplitFractions(), seed=0)


def test_shakespeare_folder_has_the_texts():
    folder = shakespeare_folder()
    assert (folder / "hamlet_gut.txt").is_file()
    assert not any(doc.name == "metadata.txt" for doc in list_documents("package:shakespeare"))


# --- token blocks ---------------------------------------------------------------------------------------------


def test_blocks_start_with_bos_and_have_block_length():
    tokenizer = byte_tokenizer()
    texts = ["To be, or not to be, that is the question. " * 5, "Now is the winter of our discontent. " * 3]
    blocks = tokenize_blocks(texts, tokenizer, block_length=16)

    assert blocks.input_ids.shape[1] == 16
    assert (blocks.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (blocks.input_ids[:, 1:] != tokenizer.bos_token_id).all()
    assert blocks.document_index.tolist() == sorted(blocks.document_index.tolist())
    assert set(blocks.document_index.tolist()) == {0, 1}


def test_byte_tokenizer_target_bytes_add_up_exactly():
    # one token per byte: the blocks' target bytes plus the dropped tail are the document's bytes
    tokenizer = byte_tokenizer()
    texts = ["ab" * 50, "Friends, Romans, countrymen, lend me your ears;\n" * 4, "x" * 7]
    blocks = tokenize_blocks(texts, tokenizer, block_length=9)
    body = 8
    for index, text in enumerate(texts):
        mine = blocks.document_index == index
        total = len(text.encode("utf-8"))
        assert int(mine.sum()) == total // body
        assert int(blocks.target_bytes[mine].sum()) == (total // body) * body
    assert (blocks.target_bytes == body).all()
    assert blocks.dropped_tokens == sum(len(t.encode("utf-8")) % body for t in texts)
    assert int(blocks.target_bytes.sum()) + blocks.dropped_tokens == sum(len(t.encode("utf-8")) for t in texts)


def test_target_bytes_are_positive_and_bounded_for_multibyte_text():
    tokenizer = byte_tokenizer()
    text = "Ça, señor — ὦ φίλε! " * 10  # 1-, 2- and 3-byte characters
    blocks = tokenize_blocks([text], tokenizer, block_length=12)
    assert blocks.input_ids.shape[0] > 3
    assert (blocks.target_bytes > 0).all()
    assert int(blocks.target_bytes.sum()) <= len(text.encode("utf-8"))
    # a character cut by the last block's edge counts in that block and again in the dropped tail
    total = len(text.encode("utf-8"))
    assert total <= int(blocks.target_bytes.sum()) + blocks.dropped_tokens <= total + 2


def test_documents_shorter_than_a_block_give_no_blocks():
    blocks = tokenize_blocks(["short", "tiny"], byte_tokenizer(), block_length=32)
    assert blocks.input_ids.shape == (0, 32)
    assert blocks.dropped_tokens == len("short") + len("tiny")


# --- bad corpora through the split stage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ready(tmp_path_factory) -> Path:
    """A folder where download-teacher (random:gemma3) has run."""
    return prepare(tmp_path_factory.mktemp("teacher"), tiny_params(), ("download-teacher",))


def write_corpus(folder: Path, files: dict[str, bytes | str]) -> str:
    folder.mkdir()
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return f"path:{folder}/*.txt"


PLAY = "Enter HAMLET. To be, or not to be, that is the question.\n" * 20
GOOD = {f"{name}.txt": PLAY for name in ("alpha", "beta", "gamma", "delta", "epsilon")}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(None, ["nothing/*.txt", "matches no files"], id="glob-matches-nothing"),
        pytest.param({**GOOD, "empty.txt": ""}, ["empty.txt: the document is empty"], id="empty-file"),
        pytest.param({**GOOD, "blank.txt": " \n\t\n"}, ["blank.txt: the document is empty"], id="blank-file"),
        pytest.param({**GOOD, "latin1.txt": "Ophélie".encode("latin-1")},
                     ["latin1.txt: not UTF-8 text (invalid byte at offset 3)"], id="not-utf8"),
        pytest.param({"alpha.txt": PLAY, "beta.txt": PLAY, "gamma.txt": PLAY},
                     ["3 document groups (alpha, beta, gamma)", "needs at least 4"], id="too-few-documents"),
        pytest.param({f"{name}.txt": "Exit." for name in ("a", "b", "c", "d", "e")},
                     ["split 'train' has no blocks: its 2 documents (", ".txt", "are shorter than data.block_length=32"],
                     id="documents-too-short"),
    ],
)
def test_bad_corpus_stops_split_with_a_named_problem(teacher_ready, tmp_path, monkeypatch, files, expected):
    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    corpus = write_corpus(tmp_path / "corpus", files) if files is not None else f"path:{tmp_path}/nothing/*.txt"
    write_params(set_dotted(tiny_params(), {"data.corpus": corpus, "data.max_documents": None}))

    result = invoke("split")

    assert_clean_failure(result, 1)
    assert "error in split" in result.output
    for text in expected:
        assert text in result.output, f"{text!r} missing from:\n{result.output}"
    assert not (work / "data" / "splits").exists()
    assert list(work.glob("data/.splits*")) == []  # no temporary folder left behind


def test_good_path_corpus_splits(teacher_ready, tmp_path, monkeypatch):
    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    corpus = write_corpus(tmp_path / "corpus", GOOD)
    write_params(set_dotted(tiny_params(), {"data.corpus": corpus, "data.max_documents": None}))

    result = invoke("split")

    assert result.exit_code == 0, result.output
    from snn_research.artifacts import verify_folder

    manifest, _ = verify_folder(work / "data" / "splits", "split")
    domain = manifest.summary["domains"]["corpus"]
    assert sum(domain[name]["n_documents"] for name in SPLITS) == 5
    assert sorted(d for name in SPLITS for d in domain[name]["documents"]) == sorted(GOOD)

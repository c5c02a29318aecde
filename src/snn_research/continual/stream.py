"""The new-domain stream: documents in a fixed order, tokenized into blocks, cut into chunks.

``package:<name>`` reads a corpus the splits can read (``data.PACKAGE_CORPORA``), its documents in name
order: ``pydoc-topics``, the Python language reference's topic texts that ship with the CPython interpreter
(``pydoc_data.topics``; CPython 3.11.7 has 79 documents, about 465 k characters of technical English), needs no
download; ``django-docs``, ``sotu`` and ``moby-dick`` need ``make corpora``. Another Python version may ship
other texts: the stream then has other chunk hashes, and a continuation refuses it. ``path:<glob>`` reads
any UTF-8 text files, in sorted path order.

Every ``heldout_every``-th document (in name order) is held out as the new-domain test set; the others are
the stream, in name order or (``order: seeded``) in a permutation drawn from the seed, so that runs with
different seeds see the same documents in different orders and are scored on the same held-out set. Each document is cut into blocks as the splits are (its last partial block is dropped); the
stream's blocks are cut into chunks of ``chunk_blocks``, and a tail shorter than a chunk is not used (its
size is reported). Each chunk has a sha256 over its token ids, so a continuation can check
that it reads the same stream as the run it continues.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from snn_research.continual.params import StreamParams, parse_stream_source
from snn_research.data import list_documents, read_text, spread, tokenize_blocks


@dataclass(frozen=True)
class StreamDocument:
    name: str
    text: str


@dataclass
class Stream:
    chunks: list[torch.Tensor]  # each (chunk_blocks, L)
    chunk_sha256: list[str]
    heldout: torch.Tensor  # (N, L) new-domain test blocks
    documents: int
    heldout_documents: int
    unused_blocks: int  # the tail shorter than a chunk

    @property
    def blocks(self) -> int:
        return sum(chunk.shape[0] for chunk in self.chunks)


def stream_documents(source: str) -> list[StreamDocument]:
    """The source's documents in their fixed order; ValueError names an unreadable or empty one."""
    kind, value = parse_stream_source(source)
    if kind == "package":
        documents = [StreamDocument(doc.name, doc.text if doc.text is not None else read_text(doc.path))
                     for doc in sorted(list_documents(source), key=lambda doc: doc.name)]
    else:
        paths = sorted(Path(p) for p in glob.glob(value, recursive=True) if Path(p).is_file())
        if not paths:
            raise ValueError(f"stream source {source!r}: the glob matches no files")
        documents = [StreamDocument(str(path), read_text(path)) for path in paths]
    empty = [doc.name for doc in documents if not doc.text.strip()]
    if empty:
        raise ValueError(f"stream source {source!r}: document {empty[0]} is empty")
    if not documents:
        raise ValueError(f"stream source {source!r} has no documents")
    return documents


def chunk_sha256(chunk: torch.Tensor) -> str:
    return hashlib.sha256(chunk.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def build_stream(params: StreamParams, tokenizer, heldout_blocks: int, seed: int = 0) -> Stream:
    """Tokenize the source into the chunked stream and the held-out blocks (``heldout_blocks`` spread)."""
    documents = stream_documents(params.source)
    kept = [doc for i, doc in enumerate(documents) if i % params.heldout_every != 0]
    if params.order == "seeded":
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
        kept = [kept[i] for i in order]
    heldout = [doc for i, doc in enumerate(documents) if i % params.heldout_every == 0]
    if not kept:
        raise ValueError(f"stream source {params.source!r}: {len(documents)} document(s), all held out "
                         f"(stream.heldout_every = {params.heldout_every}); the stream needs at least one more")
    stream_blocks = tokenize_blocks([doc.text for doc in kept], tokenizer, params.block_length)
    test_blocks = tokenize_blocks([doc.text for doc in heldout], tokenizer, params.block_length)
    count = stream_blocks.input_ids.shape[0]
    if count < params.chunk_blocks:
        raise ValueError(f"stream source {params.source!r}: the stream has {count} block(s) of "
                         f"{params.block_length} tokens, shorter than one chunk (stream.chunk_blocks = "
                         f"{params.chunk_blocks})")
    if test_blocks.input_ids.shape[0] == 0:
        raise ValueError(f"stream source {params.source!r}: the held-out documents give no block of "
                         f"{params.block_length} tokens to test on")
    full = count // params.chunk_blocks
    chunks = list(stream_blocks.input_ids[: full * params.chunk_blocks].split(params.chunk_blocks))
    return Stream(
        chunks=chunks,
        chunk_sha256=[chunk_sha256(c) for c in chunks],
        heldout=spread(test_blocks, heldout_blocks).input_ids,
        documents=len(kept),
        heldout_documents=len(heldout),
        unused_blocks=count - full * params.chunk_blocks,
    )

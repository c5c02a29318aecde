"""split: each domain's whole documents (editions grouped) into train/calib/val/test, tokenised into blocks.

Every domain is split on its own, with the run's seed. train, calib and val are the weighted mixture of the
domains with a positive weight (``data.mix_blocks``); test holds every domain's test blocks, domain after
domain, each tagged with its domain. A domain of weight 0 is the unseen domain: no stage learns from it, so
all of its documents go to test. With one domain the files hold no domain tags and equal a plain split.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from snn_research.data import (
    SPLITS,
    TokenBlocks,
    concat_blocks,
    corpus_sha256,
    list_documents,
    mix_blocks,
    save_blocks,
    split_documents,
    spread,
    tokenize_blocks,
)
from snn_research.io import atomic_directory
from snn_research.stages.common import StageContext, console, progress_bar

LEARNING_SPLITS = ("train", "calib", "val")


def _block_info(blocks: TokenBlocks) -> dict:
    return {"blocks": int(blocks.input_ids.shape[0]), "tokens": int(blocks.input_ids.numel()),
            "target_bytes": int(blocks.target_bytes.sum())}


def _split_domain(source, data, seed: int, tokenizer, domain: str) -> tuple[dict[str, TokenBlocks], dict]:
    """One domain's documents split and tokenised: split -> blocks, and the domain's summary entry."""
    documents = list_documents(source.source)
    if data.max_documents is not None:
        groups = sorted({d.group for d in documents})[: data.max_documents]
        documents = [d for d in documents if d.group in groups]
    texts = {doc.name: doc.read() for doc in documents}
    if source.weight > 0:
        assignment = split_documents(documents, data.fractions, seed)
    else:  # unseen: nothing learns from it, so every document is test text
        assignment = {name: [] for name in SPLITS}
        assignment["test"] = sorted(documents, key=lambda d: d.name)
    entry = {"source": source.source, "weight": source.weight, "corpus_sha256": corpus_sha256(documents)}
    out: dict[str, TokenBlocks] = {}
    with progress_bar(f"tokenising {domain}", len(documents)) as advance:
        for name in SPLITS:
            docs = assignment[name]
            if not docs:
                continue
            split_blocks = tokenize_blocks([texts[d.name] for d in docs], tokenizer, data.block_length)
            advance(len(docs), info=name)
            if split_blocks.input_ids.shape[0] == 0:
                raise ValueError(
                    f"split {name!r} has no blocks: its {len(docs)} documents "
                    f"({', '.join(d.name for d in docs[:8])}{', ...' if len(docs) > 8 else ''}) are shorter "
                    f"than data.block_length={data.block_length} tokens; use a larger corpus or shorter blocks")
            split_blocks = spread(split_blocks, data.max_blocks_per_split)
            out[name] = split_blocks
            entry[name] = {
                "documents": [d.name for d in docs],
                "n_documents": len(docs),
                "bytes": sum(len(texts[d.name].encode("utf-8")) for d in docs),
                **_block_info(split_blocks),
                "dropped_tokens": split_blocks.dropped_tokens,
            }
    return out, entry


def run(context: StageContext) -> None:
    params = context.params
    data = params.data
    context.verify(context.paths.teacher, "download-teacher")
    tokenizer = AutoTokenizer.from_pretrained(context.paths.teacher, trust_remote_code=False)
    sources = data.domain_sources()
    one_domain = len(sources) == 1
    # domain -> split -> blocks; the summary records each domain's documents and counts
    blocks: dict[str, dict[str, TokenBlocks]] = {}
    summary: dict = {"block_length": data.block_length, "domains": {}}
    for domain, source in sources.items():
        field = "data.corpus" if data.domains is None else f"data.domains.{domain}"
        try:
            blocks[domain], summary["domains"][domain] = _split_domain(source, data, params.seed, tokenizer, domain)
        except ValueError as error:
            raise ValueError(f"{field} ({source.source}): {error}") from None
    names = list(sources)
    with atomic_directory(context.paths.splits) as tmp:
        for name in SPLITS:
            if one_domain:
                out = blocks[names[0]][name]
            elif name in LEARNING_SPLITS:
                seen = [domain for domain in names if sources[domain].weight > 0]
                out = mix_blocks([blocks[d][name] for d in seen], [sources[d].weight for d in seen])
                # the mixture's tags index the run's domains, not only the seen ones
                lookup = torch.tensor([names.index(d) for d in seen], dtype=torch.int32)
                out.domain_index = lookup[out.domain_index.long()]
                starved = [d for d in seen if not bool((out.domain_index == names.index(d)).any())]
                if starved:
                    raise ValueError(f"data.domains.{starved[0]}: its weight gives it no block of the {name} split "
                                     f"(the mixture has {out.input_ids.shape[0]} blocks); raise the weight or "
                                     "set it to 0 to keep the domain unseen")
            else:
                out = concat_blocks([blocks[d]["test"] for d in names])
            save_blocks(out, tmp / f"{name}.safetensors")
            summary[name] = {**_block_info(out), "per_domain_blocks": {
                d: int((out.domains() == i).sum()) for i, d in enumerate(names)}}
        context.manifest(tmp, "split", {"data": data.model_dump(), "seed": params.seed}, summary)
    for name in SPLITS:
        info = summary[name]
        mix = ", ".join(f"{d} {n}" for d, n in info["per_domain_blocks"].items() if n)
        console.print(f"split: {name:5s} {info['blocks']:5d} blocks, {info['tokens']:,} tokens"
                      + ("" if one_domain else f" ({mix})"))
        context.tracker.log_metrics({f"{name}_blocks": info["blocks"], f"{name}_tokens": info["tokens"]})
    context.tracker.log_artifact(context.paths.splits / "manifest.json")


"""split: whole documents (editions grouped) into train/calib/val/test, tokenised into blocks."""

from __future__ import annotations

from transformers import AutoTokenizer

from snn_research.data import (
    SPLITS,
    corpus_sha256,
    list_documents,
    read_text,
    save_blocks,
    split_documents,
    spread,
    tokenize_blocks,
)
from snn_research.io import atomic_directory
from snn_research.stages.common import StageContext, console, progress_bar


def run(context: StageContext) -> None:
    params = context.params
    data = params.data
    context.verify(context.paths.teacher, "download-teacher")
    tokenizer = AutoTokenizer.from_pretrained(context.paths.teacher, trust_remote_code=False)
    documents = list_documents(data.corpus)
    if data.max_documents is not None:
        groups = sorted({d.group for d in documents})[: data.max_documents]
        documents = [d for d in documents if d.group in groups]
    texts = {doc.name: read_text(doc.path) for doc in documents}
    assignment = split_documents(documents, data.fractions, params.seed)
    summary = {"corpus": data.corpus, "corpus_sha256": corpus_sha256(documents), "block_length": data.block_length}
    with atomic_directory(context.paths.splits) as tmp, progress_bar("tokenising", len(documents)) as advance:
        for name in SPLITS:
            docs = assignment[name]
            blocks = tokenize_blocks([texts[d.name] for d in docs], tokenizer, data.block_length)
            advance(len(docs), info=name)
            if blocks.input_ids.shape[0] == 0:
                raise ValueError(
                    f"split {name!r} has no blocks: its {len(docs)} documents ({', '.join(d.name for d in docs)}) "
                    f"are shorter than "
                    f"data.block_length={data.block_length} tokens; use a larger corpus or shorter blocks"
                )
            blocks = spread(blocks, data.max_blocks_per_split)
            save_blocks(blocks, tmp / f"{name}.safetensors")
            summary[name] = {
                "documents": [d.name for d in docs],
                "n_documents": len(docs),
                "bytes": sum(len(texts[d.name].encode("utf-8")) for d in docs),
                "blocks": int(blocks.input_ids.shape[0]),
                "tokens": int(blocks.input_ids.numel()),
                "target_bytes": int(blocks.target_bytes.sum()),
                "dropped_tokens": blocks.dropped_tokens,
            }
        context.manifest(tmp, "split", {"data": data.model_dump(), "seed": params.seed}, summary)
    for name in SPLITS:
        info = summary[name]
        console.print(f"split: {name:5s} {info['n_documents']:3d} documents, {info['blocks']:5d} blocks, "
                      f"{info['tokens']:,} tokens")
        context.tracker.log_metrics({f"{name}_documents": info["n_documents"], f"{name}_tokens": info["tokens"]})
    context.tracker.log_artifact(context.paths.splits / "manifest.json")

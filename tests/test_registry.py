"""`snn-research register`: a model folder logged as an MLflow pyfunc model, bound to the evaluation behind its
figures, registered, and the champion rule."""

import json
import os
import shutil

import pytest
from pipeline_support import assert_clean_failure, invoke
from test_generate import TOKENIZER, teacher_and_hybrid

from snn_research.artifacts import MANIFEST, write_manifest
from snn_research.conversion.ann_to_snn_converter import save_hybrid
from snn_research.generate import GenerationOptions, generate, load_model_folder
from snn_research.io import sha256_file
from snn_research.registry import beats

NAME = "tiny-hybrid"
ENERGY = {"e_mac_pj": 4.6, "e_ac_pj": 0.9, "ffn_budget": None}
INPUTS = ("data/splits", "models/teacher", "models/finetuned")  # as evaluate records them: relative folders


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A pipeline folder as the stages leave it: a split, a teacher, a finetuned hybrid and a second finetuned
    hybrid (``models/other``, another manifest), each with its manifest."""
    teacher, hybrid = teacher_and_hybrid("llama")
    root = tmp_path_factory.mktemp("pipeline")
    write_split(root, "test block\n")
    teacher.save_pretrained(root / "models/teacher")
    TOKENIZER.save_pretrained(root / "models/teacher")
    write_manifest(root / "models/teacher", "download-teacher", {"teacher": {"source": "random:llama"}})
    for folder, seed in (("models/finetuned", 0), ("models/other", 1)):
        save_hybrid(hybrid, TOKENIZER, hybrid.hybrid_metadata, root / folder)
        write_manifest(root / folder, "finetune", {"seed": seed})
    return root


@pytest.fixture
def pipeline(built, tmp_path, monkeypatch):
    """A copy of ``built`` as the working directory, with MLflow tracking into a sqlite store of its own."""
    root = shutil.copytree(built, tmp_path / "pipeline")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


def write_split(root, text: str) -> None:
    (root / "data/splits").mkdir(parents=True, exist_ok=True)
    (root / "data/splits/test.txt").write_text(text)
    write_manifest(root / "data/splits", "split", {"data": {"max_documents": 8}})


def evaluate(root, metrics: dict, max_blocks: int | None = 4, energy: dict = ENERGY, summary: dict | None = None):
    """What evaluate leaves: ``reports/metrics.json`` and the manifest of ``reports/evaluation``, which records
    the input folders' manifest sha256s and the params evaluate read."""
    (root / "reports/evaluation").mkdir(parents=True, exist_ok=True)
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    (root / "reports/evaluation/summary.md").write_text("# Evaluation\n")
    inputs = {folder: sha256_file(root / folder / MANIFEST) for folder in INPUTS}
    params = {"evaluate": {"max_blocks": max_blocks, "energy_blocks": 1, "batch_size": 4}, "energy": energy}
    write_manifest(root / "reports/evaluation", "evaluate", params, inputs, summary)


def figures(ppl: float, energy: float) -> dict:
    return {"teacher": {"ppl": 10.0, "bpb": 1.5}, "finetuned": {"ppl": ppl, "bpb": 2.0, "ffn_energy_ratio": energy}}


def register(*args: str):
    return invoke("register", *args, "--name", NAME)


def client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_champion_rule_needs_a_better_metric_at_no_more_energy():
    assert beats((9.0, 0.30), (10.0, 0.30), "ppl")
    assert not beats((9.0, 0.31), (10.0, 0.30), "ppl")  # better but costlier
    assert not beats((10.0, 0.20), (10.0, 0.30), "ppl")  # cheaper but not better
    assert beats((0.9, 0.30), (0.8, 0.30), "agreement_top1")  # higher is better there


def test_register_moves_the_champion_only_on_a_win_and_the_champion_generates(pipeline):
    import mlflow

    evaluate(pipeline, figures(20.0, 0.30))
    first = register()
    assert first.exit_code == 0, first.output
    assert "version 1" in first.output and "is now champion" in first.output
    evaluate(pipeline, figures(25.0, 0.25))
    worse = register()
    assert worse.exit_code == 0 and "version 2" in worse.output and "is not champion" in worse.output
    evaluate(pipeline, figures(15.0, 0.40))
    costlier = register()
    assert costlier.exit_code == 0 and "version 3" in costlier.output and "is not champion" in costlier.output
    evaluate(pipeline, figures(15.0, 0.30))
    better = register()
    assert better.exit_code == 0 and "version 4" in better.output and "is now champion" in better.output
    other_metric = register("--metric", "bpb")
    assert_clean_failure(other_metric, 1)
    assert "was chosen on 'ppl', not 'bpb'" in other_metric.output

    registry = client()
    champion = registry.get_model_version_by_alias(NAME, "champion")
    assert int(champion.version) == 4
    assert len(registry.search_model_versions(f"name = '{NAME}'")) == 4  # the refused one registered nothing
    assert champion.tags["model_manifest"] == sha256_file(pipeline / "models/finetuned" / MANIFEST)
    assert champion.tags["test.splits"] == sha256_file(pipeline / "data/splits" / MANIFEST)
    assert champion.tags["test.teacher"] == sha256_file(pipeline / "models/teacher" / MANIFEST)
    assert (champion.tags["test.max_blocks"], champion.tags["test.energy_blocks"]) == ("4", "1")
    assert json.loads(champion.tags["test.energy"]) == {"e_mac_pj": 4.6, "e_ac_pj": 0.9}  # a budget prices nothing
    run = registry.get_run(champion.run_id)
    assert run.data.metrics["ppl"] == 15.0
    artifacts = [a.path for a in registry.list_artifacts(run.info.run_id, "conversion")]
    assert artifacts == ["conversion/hybrid.json"]

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = loaded.predict(["To be, or"], params={"max_new_tokens": 4})
    model, tokenizer, kind = load_model_folder(pipeline / "models/finetuned")
    assert kind == "hybrid"
    assert out == [generate(model, tokenizer, "To be, or", GenerationOptions(max_new_tokens=4)).text]


def test_a_teacher_registers_at_an_ffn_energy_ratio_of_one_and_does_not_beat_a_cheaper_hybrid(pipeline):
    import mlflow

    evaluate(pipeline, figures(20.0, 0.30))
    assert register().exit_code == 0
    teacher = register("models/teacher", "--entry", "teacher")
    assert teacher.exit_code == 0, teacher.output
    # ppl 10 beats 20, but at FFN energy 1.0 against 0.3
    assert "version 2" in teacher.output and "is not champion" in teacher.output
    assert "FFN energy 1.000 against 0.300" in teacher.output

    version = client().get_model_version(NAME, "2")
    assert (version.tags["entry"], version.tags["metric_value"], version.tags["ffn_energy_ratio"]) == (
        "teacher",
        "10.0",
        "1.0",
    )
    assert version.tags["model_manifest"] == version.tags["test.teacher"]
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
    model, tokenizer, kind = load_model_folder(pipeline / "models/teacher")
    assert kind == "teacher"
    assert loaded.predict(["To be, or"], params={"max_new_tokens": 4}) == [
        generate(model, tokenizer, "To be, or", GenerationOptions(max_new_tokens=4)).text
    ]


def test_champion_moves_only_between_versions_scored_on_the_same_test(pipeline):
    evaluate(pipeline, figures(20.0, 0.30))
    assert "is now champion" in register().output
    evaluate(pipeline, figures(15.0, 0.30), max_blocks=8)
    more_blocks = register()
    assert more_blocks.exit_code == 0, more_blocks.output
    assert (
        "version 2 (run" in more_blocks.output
        and "is not champion: scored on another test than version 1 (test.max_blocks 8 against 4): "
        "version 1 stays champion"
        in more_blocks.output
    )
    write_split(pipeline, "another test block\n")
    evaluate(pipeline, figures(10.0, 0.20))
    other_split = register()
    assert "version 3" in other_split.output and "is not champion" in other_split.output
    assert "(test.splits " in other_split.output and "version 1 stays champion" in other_split.output
    evaluate(pipeline, figures(12.0, 0.30), energy={**ENERGY, "e_ac_pj": 0.5})
    other_prices = register()
    assert "is not champion" in other_prices.output and "test.energy" in other_prices.output

    write_split(pipeline, "test block\n")  # the first test again; a training budget does not change it
    evaluate(pipeline, figures(15.0, 0.30), energy={**ENERGY, "ffn_budget": 0.5})
    same_test = register()
    assert "version 5" in same_test.output and "is now champion: ppl 15 beats 20" in same_test.output
    assert int(client().get_model_version_by_alias(NAME, "champion").version) == 5


def test_register_refuses_a_folder_its_metrics_entry_did_not_score(pipeline):
    evaluate(pipeline, figures(20.0, 0.30))
    other = register("models/other")
    assert_clean_failure(other, 1)
    assert (
        "reports/metrics.json: entry 'finetuned' scores another model than models/other: the sha256 of "
        "models/other/manifest.json" in other.output
    )
    assert "is not among the inputs recorded in reports/evaluation/manifest.json" in other.output
    teacher_as_hybrid = register("models/teacher")
    assert_clean_failure(teacher_as_hybrid, 1)
    assert (
        "models/teacher/manifest.json: made by stage 'download-teacher', but metrics entry 'finetuned' scores "
        "the output of 'finetune'" in teacher_as_hybrid.output
    )
    (pipeline / "models/other" / MANIFEST).unlink()
    unmade = register("models/other")
    assert_clean_failure(unmade, 1)
    assert "models/other/manifest.json: manifest is missing" in unmade.output
    assert client().search_registered_models() == []


def test_register_refuses_metrics_without_their_evaluation_record(pipeline):
    evaluate(pipeline, figures(20.0, 0.30), summary={"metrics_sha256": "0" * 64})
    other_bytes = register()
    assert_clean_failure(other_bytes, 1)
    assert (
        "reports/metrics.json: its sha256 is not the metrics_sha256 000000000000... that "
        "reports/evaluation/manifest.json records" in other_bytes.output
    )
    assert client().search_registered_models() == []
    evaluate(pipeline, figures(20.0, 0.30), summary={"metrics_sha256": sha256_file(pipeline / "reports/metrics.json")})
    same_bytes = register()
    assert same_bytes.exit_code == 0 and "version 1" in same_bytes.output, same_bytes.output
    write_split(pipeline, "a test split made after the evaluation\n")
    stale = register()
    assert_clean_failure(stale, 1)
    assert (
        "reports/evaluation/manifest.json: no folder at its recorded inputs (['data/splits', 'models/finetuned', "
        "'models/teacher']) still holds the manifest evaluate read for stage ['split']" in stale.output
    )
    shutil.rmtree(pipeline / "reports/evaluation")
    no_record = register()
    assert_clean_failure(no_record, 1)
    assert "reports/evaluation: input folder is missing (run 'snn-research evaluate' first)" in no_record.output
    assert len(client().search_model_versions(f"name = '{NAME}'")) == 1


def test_register_refuses_a_metrics_file_without_the_entry(pipeline):
    evaluate(pipeline, {"teacher": {"ppl": 10.0}})
    result = register()
    assert_clean_failure(result, 1)
    assert "no entry 'finetuned'" in result.output

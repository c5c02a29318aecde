"""`snn-research register`: a hybrid logged as an MLflow pyfunc model, registered, and the champion rule."""

import json

import pytest
from pipeline_support import assert_clean_failure, invoke
from test_generate import TOKENIZER, teacher_and_hybrid

from snn_research.conversion.ann_to_snn_converter import save_hybrid
from snn_research.generate import GenerationOptions, generate, load_model_folder
from snn_research.registry import beats

NAME = "tiny-hybrid"


@pytest.fixture(scope="module")
def hybrid_folder(tmp_path_factory):
    _, hybrid = teacher_and_hybrid("llama")
    folder = tmp_path_factory.mktemp("registry") / "hybrid"
    save_hybrid(hybrid, TOKENIZER, hybrid.hybrid_metadata, folder)
    return folder


def write_metrics(path, ppl: float, energy: float):
    path.write_text(json.dumps({"teacher": {"ppl": 10.0},
                                "finetuned": {"ppl": ppl, "bpb": 2.0, "ffn_energy_ratio": energy}}))
    return path


def test_champion_rule_needs_a_better_metric_at_no_more_energy():
    assert beats((9.0, 0.30), (10.0, 0.30), "ppl")
    assert not beats((9.0, 0.31), (10.0, 0.30), "ppl")  # better but costlier
    assert not beats((10.0, 0.20), (10.0, 0.30), "ppl")  # cheaper but not better
    assert beats((0.9, 0.30), (0.8, 0.30), "agreement_top1")  # higher is better there


def test_register_moves_the_champion_only_on_a_win_and_the_champion_generates(hybrid_folder, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(hybrid_folder), "--name", NAME, "--uri", uri, "--metrics"]
    first = invoke("register", *args, str(write_metrics(tmp_path / "m1.json", 20.0, 0.30)))
    assert first.exit_code == 0, first.output
    assert "version 1" in first.output and "is now champion" in first.output
    worse = invoke("register", *args, str(write_metrics(tmp_path / "m2.json", 25.0, 0.25)))
    assert worse.exit_code == 0 and "version 2" in worse.output and "is not champion" in worse.output
    costlier = invoke("register", *args, str(write_metrics(tmp_path / "m3.json", 15.0, 0.40)))
    assert costlier.exit_code == 0 and "version 3" in costlier.output and "is not champion" in costlier.output
    better = invoke("register", *args, str(write_metrics(tmp_path / "m4.json", 15.0, 0.30)))
    assert better.exit_code == 0 and "version 4" in better.output and "is now champion" in better.output
    other_metric = invoke("register", *args, str(tmp_path / "m4.json"), "--metric", "bpb")
    assert_clean_failure(other_metric, 1)
    assert "was chosen on 'ppl', not 'bpb'" in other_metric.output

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 4
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 4  # the refused one registered nothing
    run = client.get_run(client.get_model_version(NAME, "4").run_id)
    assert run.data.metrics["ppl"] == 15.0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "conversion")]
    assert artifacts == ["conversion/hybrid.json"]

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = loaded.predict(["To be, or"], params={"max_new_tokens": 4})
    model, tokenizer, kind = load_model_folder(hybrid_folder)
    assert kind == "hybrid"
    assert out == [generate(model, tokenizer, "To be, or", GenerationOptions(max_new_tokens=4)).text]


def test_register_refuses_a_metrics_file_without_the_entry(hybrid_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps({"teacher": {"ppl": 10.0}}))
    result = invoke("register", str(hybrid_folder), "--name", NAME, "--uri", f"sqlite:///{tmp_path / 'x.db'}",
                    "--metrics", str(tmp_path / "m.json"))
    assert_clean_failure(result, 1)
    assert "no entry 'finetuned'" in result.output

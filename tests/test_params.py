"""params.yaml validation: a bad value stops any stage at once, naming the field and the value, exit code 2."""

from __future__ import annotations

import json
import math

import pytest
from pipeline_support import STAGES, assert_clean_failure, invoke, set_dotted, write_params

from snn_research.config import Params

SECTIONS = ("seed", "tracking", "teacher", "data", "calibrate", "convert", "distill", "finetune", "evaluate")

# (id, values to set, the dotted field the message must name, the value as the message must show it)
BAD = [
    ("seed-negative", {"seed": -1}, "seed", "-1"),
    ("seed-string", {"seed": "abc"}, "seed", "'abc'"),
    ("seed-fraction", {"seed": 1.5}, "seed", "1.5"),
    ("tracking-enabled-word", {"tracking.enabled": "maybe"}, "tracking.enabled", "'maybe'"),
    ("tracking-experiment-empty", {"tracking.experiment": ""}, "tracking.experiment", "''"),
    ("tracking-strict-word", {"tracking.strict": "sometimes"}, "tracking.strict", "'sometimes'"),
    ("tracking-uri-number", {"tracking.uri": 5}, "tracking.uri", "5"),
    ("tracking-unknown-key", {"tracking.token": "secret"}, "tracking.token", "'secret'"),
    ("teacher-hf-no-owner", {"teacher.source": "hf:no-owner"}, "teacher.source", "'hf:no-owner'"),
    ("teacher-hf-empty-revision", {"teacher.source": "hf:owner/repo@"}, "teacher.source", "'hf:owner/repo@'"),
    ("teacher-path-empty", {"teacher.source": "path:"}, "teacher.source", "'path:'"),
    ("teacher-package-unknown", {"teacher.source": "package:gpt-5"}, "teacher.source", "'package:gpt-5'"),
    ("teacher-random-unknown", {"teacher.source": "random:bert"}, "teacher.source", "'random:bert'"),
    ("teacher-unknown-kind", {"teacher.source": "s3:bucket/model"}, "teacher.source", "'s3:bucket/model'"),
    ("teacher-empty", {"teacher.source": ""}, "teacher.source", "''"),
    ("teacher-no-kind", {"teacher.source": "gpt2"}, "teacher.source", "'gpt2'"),
    ("teacher-dtype", {"teacher.dtype": "float16"}, "teacher.dtype", "'float16'"),
    ("teacher-trust-remote-code", {"teacher.trust_remote_code": True}, "teacher.trust_remote_code", "True"),
    ("data-corpus-package", {"data.corpus": "package:wikipedia"}, "data.corpus", "'package:wikipedia'"),
    ("data-corpus-path-empty", {"data.corpus": "path:"}, "data.corpus", "'path:'"),
    ("data-corpus-empty", {"data.corpus": ""}, "data.corpus", "''"),
    ("data-block-length-small", {"data.block_length": 4}, "data.block_length", "4"),
    ("data-block-length-word", {"data.block_length": "long"}, "data.block_length", "'long'"),
    ("data-max-documents-small", {"data.max_documents": 2}, "data.max_documents", "2"),
    ("data-max-blocks-zero", {"data.max_blocks_per_split": 0}, "data.max_blocks_per_split", "0"),
    ("data-unknown-key", {"data.shuffle": True}, "data.shuffle", "True"),
    ("fractions-sum", {"data.fractions.train": 0.9}, "data.fractions", "'train': 0.9"),
    ("fractions-zero", {"data.fractions.calib": 0.0}, "data.fractions.calib", "0.0"),
    ("fractions-negative", {"data.fractions.test": -0.1}, "data.fractions.test", "-0.1"),
    ("fractions-unknown-key", {"data.fractions.holdout": 0.1}, "data.fractions.holdout", "0.1"),
    ("calibrate-percentile-high", {"calibrate.percentile": 100.5}, "calibrate.percentile", "100.5"),
    ("calibrate-percentile-zero", {"calibrate.percentile": 0}, "calibrate.percentile", "0"),
    ("calibrate-bins", {"calibrate.bins_per_octave": 2}, "calibrate.bins_per_octave", "2"),
    ("calibrate-batch-zero", {"calibrate.batch_size": 0}, "calibrate.batch_size", "0"),
    ("calibrate-unknown-key", {"calibrate.percentil": 99.0}, "calibrate.percentil", "99.0"),
    ("convert-time-steps-zero", {"convert.time_steps": 0}, "convert.time_steps", "0"),
    ("convert-time-steps-fraction", {"convert.time_steps": 1.5}, "convert.time_steps", "1.5"),
    ("convert-encoder", {"convert.encoder": "poisson"}, "convert.encoder", "'poisson'"),
    ("convert-neuron", {"convert.neuron": "izhikevich"}, "convert.neuron", "'izhikevich'"),
    ("convert-leak-needs-lif", {"convert.learnable_leak": True, "convert.neuron": "if"}, "convert.learnable_leak",
     "True"),
    ("convert-rate-membrane", {"convert.encoder": "rate", "convert.membrane_init": "half"}, "convert.membrane_init",
     "'half'"),
    ("convert-layers-twice", {"convert.layers": [0, 0]}, "convert.layers", "[0, 0]"),
    ("convert-layers-empty", {"convert.layers": []}, "convert.layers", "[]"),
    ("convert-beta", {"convert.beta": 1.5}, "convert.beta", "1.5"),
    ("convert-sharpness-inf", {"convert.sharpness": float("inf")}, "convert.sharpness", "inf"),
    ("convert-surrogate", {"convert.surrogate": "relu"}, "convert.surrogate", "'relu'"),
    ("distill-steps-negative", {"distill.steps": -1}, "distill.steps", "-1"),
    ("distill-temperature-zero", {"distill.temperature": 0}, "distill.temperature", "0"),
    ("distill-top-k-negative", {"distill.top_k": -5}, "distill.top_k", "-5"),
    ("distill-lr-high", {"distill.lr": 2.0}, "distill.lr", "2.0"),
    ("distill-no-loss", {"distill.kl_weight": 0, "distill.ffn_mse_weight": 0, "distill.ce_weight": 0},
     "distill.kl_weight", "0"),
    ("layerwise-lr-zero", {"distill.layerwise.lr": 0}, "distill.layerwise.lr", "0"),
    ("layerwise-steps-negative", {"distill.layerwise.steps_per_layer": -1}, "distill.layerwise.steps_per_layer",
     "-1"),
    ("layerwise-enabled-word", {"distill.layerwise.enabled": "yes please"}, "distill.layerwise.enabled",
     "'yes please'"),
    ("layerwise-unknown-key", {"distill.layerwise.epochs": 3}, "distill.layerwise.epochs", "3"),
    ("layerwise-null", {"distill.layerwise": None}, "distill.layerwise", "None"),
    ("curriculum-below-target", {"distill.curriculum.start_time_steps": 4, "convert.time_steps": 8},
     "distill.curriculum.start_time_steps", "4"),
    ("curriculum-anneal-zero", {"distill.curriculum.anneal_fraction": 0}, "distill.curriculum.anneal_fraction", "0"),
    ("curriculum-start-zero", {"distill.curriculum.start_time_steps": 0}, "distill.curriculum.start_time_steps", "0"),
    ("finetune-patience-zero", {"finetune.patience": 0}, "finetune.patience", "0"),
    ("finetune-lr-nan", {"finetune.lr": float("nan")}, "finetune.lr", "nan"),
    ("finetune-eval-every-zero", {"finetune.eval_every": 0}, "finetune.eval_every", "0"),
    ("finetune-unknown-key", {"finetune.early_stop": True}, "finetune.early_stop", "True"),
    ("energy-negative", {"energy.e_mac_pj": -4.6}, "energy.e_mac_pj", "-4.6"),
    ("evaluate-timing-word", {"evaluate.timing": "sometimes"}, "evaluate.timing", "'sometimes'"),
    ("evaluate-max-blocks-zero", {"evaluate.max_blocks": 0}, "evaluate.max_blocks", "0"),
    ("evaluate-energy-blocks-word", {"evaluate.energy_blocks": "all"}, "evaluate.energy_blocks", "'all'"),
    ("evaluate-read-batch-over", {"evaluate.read_batch": 3, "evaluate.energy_blocks": 2}, "evaluate.read_batch", "3"),
    ("convert-digits-if", {"convert.encoder": "if", "convert.digits": "signed"}, "convert.digits", "'signed'"),
    ("section-not-mapping", {"data": [1, 2]}, "data", "[1, 2]"),
    ("unknown-top-level-key", {"bogus": 1}, "bogus", "1"),
    ("misspelt-section", {"evaluation": {"max_blocks": 1}}, "evaluation", "{'max_blocks': 1}"),
]


def test_the_bad_cases_are_many_and_distinct():
    ids = [case[0] for case in BAD]
    assert len(set(ids)) == len(ids) >= 40
    assert {case[2].split(".")[0] for case in BAD} >= set(SECTIONS)


# the cases are spread over every stage command: each must validate the whole file first
@pytest.mark.parametrize(
    ("stage", "values", "field", "shown"),
    [pytest.param(STAGES[i % len(STAGES)], *case[1:], id=case[0]) for i, case in enumerate(BAD)],
)
def test_bad_params_stop_every_stage_naming_field_and_value(workdir, tiny, stage, values, field, shown):
    write_params(set_dotted(tiny, values), "bad.yaml")

    result = invoke(stage, "-p", "bad.yaml")

    assert_clean_failure(result, 2)
    assert "bad.yaml" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith(f"{field}:")]
    assert lines, f"no line names {field!r}:\n{result.output}"
    assert any(shown in line for line in lines), f"{shown!r} not shown for {field}:\n{result.output}"
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"], "a stage touched the disk"


def test_membrane_init_is_refused_for_encoders_without_a_membrane_start(workdir, tiny):
    for encoder in ("rate", "weighted"):
        write_params(set_dotted(tiny, {"convert.encoder": encoder, "convert.membrane_init": "symmetric"}))
        result = invoke("check")
        assert_clean_failure(result, 2)
        assert any(line.startswith("convert.membrane_init:") and "'symmetric'" in line
                   for line in result.output.splitlines()), result.output
    write_params(set_dotted(tiny, {"convert.encoder": "if", "convert.membrane_init": "zero"}))
    result = invoke("check")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["convert"]["membrane_init"] == "zero"


def test_missing_params_file_is_named(workdir):
    result = invoke("calibrate", "-p", "nowhere.yaml")
    assert_clean_failure(result, 2)
    assert "nowhere.yaml" in result.output and "not found" in result.output
    assert list(workdir.iterdir()) == []


def test_invalid_yaml_is_named(workdir):
    (workdir / "broken.yaml").write_text("seed: 0\ndistill: [steps: 3,\n")
    result = invoke("distill", "-p", "broken.yaml")
    assert_clean_failure(result, 2)
    assert "broken.yaml: not valid YAML" in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["broken.yaml"]


def test_top_level_list_is_named(workdir):
    (workdir / "list.yaml").write_text("- seed: 0\n- teacher: {source: random:gpt2}\n")
    result = invoke("split", "-p", "list.yaml")
    assert_clean_failure(result, 2)
    assert "list.yaml: the top level must be a mapping of sections (got list)" in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["list.yaml"]


def test_check_rejects_bad_params_too(workdir, tiny):
    write_params(set_dotted(tiny, {"distill.layerwise.lr": -1.0}))
    result = invoke("check")
    assert_clean_failure(result, 2)
    # the field and the value, not pydantic's wording of the bound
    lines = [line for line in result.output.splitlines() if line.startswith("distill.layerwise.lr: ")]
    assert len(lines) == 1 and lines[0].endswith("(got -1.0)"), result.output


def test_schema_is_json_with_every_section():
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert set(SECTIONS) <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    definitions = schema["$defs"]
    assert {"layerwise", "curriculum", "kl_weight"} <= set(definitions["DistillParams"]["properties"])
    assert definitions["DataParams"]["properties"]["block_length"]["minimum"] == 8


def test_check_prints_params_with_defaults_filled_in(workdir):
    raw = {"teacher": {"source": "random:gpt2"}, "distill": {"steps": 3, "layerwise": {"lr": 0.01}}}
    write_params(raw, "partial.yaml")

    result = invoke("check", "-p", "partial.yaml")

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == Params.model_validate(raw).model_dump(mode="json")
    assert printed["teacher"]["source"] == "random:gpt2"
    assert printed["distill"]["steps"] == 3 and printed["distill"]["layerwise"]["lr"] == 0.01
    assert printed["distill"]["layerwise"]["steps_per_layer"] == 64  # a default, filled in
    assert math.isclose(printed["calibrate"]["percentile"], 99.9)
    assert printed["data"]["fractions"] == {"train": 0.7, "calib": 0.1, "val": 0.1, "test": 0.1}
    assert sorted(p.name for p in workdir.iterdir()) == ["partial.yaml"]

"""MLflow models: a hybrid (or teacher) folder logged as a pyfunc model, registered, and a ``champion`` alias.

The flavour is MLflow's ``python_function`` with a ``PythonModel`` whose ``load_context`` rebuilds the
model through ``generate.load_model_folder`` (``load_hybrid`` for a hybrid), from the model folder stored
as the logged model's artifact ``model``. The conversion metadata (``hybrid.json``) is that folder's and
is also logged as the run's artifact ``conversion/hybrid.json``. ``predict`` takes prompts (a list of
strings) and returns their continuations (greedy unless ``sample``); the params
``max_new_tokens``, ``sample``, ``temperature``, ``top_k`` (0: all tokens) and ``seed`` are passed to ``generate``.

Binding: a version's figures come from one entry of evaluate's ``metrics.json``, and evaluate's record of
that evaluation is the manifest of its ``evaluation`` folder (the input folders' manifest sha256s and the
params it read). A model folder is registered only when its own ``manifest.json`` was made by the stage
whose output the entry scores and its sha256 is among the inputs the record lists; when the record's summary
holds ``metrics_sha256``, the metrics file must have those bytes. Each version is tagged with its folder's
manifest sha256 (``model_manifest``) and with its test identity, the ``test.*`` tags: the manifest sha256 of
the split folder and of the teacher folder evaluate read (recognised by the folders at the recorded paths
still holding those manifests), ``evaluate.max_blocks``, ``evaluate.energy_blocks`` and the energy constants
(params ``energy`` without ``ffn_budget``, a training target that prices nothing).

Champion rule: a new version takes the alias ``champion`` when there is no champion yet, or when it has the
champion's test identity and beats it on the chosen metric (lower is better for ``ppl``, ``bpb`` and
``kl_full_to_teacher``, higher for ``agreement_top1``) at an equal or lower ``ffn_energy_ratio``; a champion
without the ``test.*`` tags keeps the alias until it is moved by hand. A teacher (entry ``teacher`` or
``teacher_finetuned``: dense FP32 models) has an FFN energy ratio of 1.0, the ratio of its own FFN energy to
the FP32 teacher's. Every version carries its metrics and identity as tags, so the rule needs nothing but the
registry.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = {"ppl": True, "bpb": True, "kl_full_to_teacher": True, "agreement_top1": False}
ALIAS = "champion"
ENERGY = "ffn_energy_ratio"
# metrics.json entry -> the stage that makes the folder it scores
ENTRY_STAGES = {
    "teacher": "download-teacher",
    "teacher_finetuned": "finetune-teacher",
    "converted": "convert",
    "distilled": "distill",
    "finetuned": "finetune",
}
REFERENCES = ("teacher", "teacher_finetuned")  # dense FP32 models: FFN energy ratio 1.0 against the FP32 teacher
# the test behind a version's figures; the champion moves only between versions equal on every one
TEST_TAGS = ("test.splits", "test.teacher", "test.max_blocks", "test.energy_blocks", "test.energy")


def _python_model_class():
    import mlflow.pyfunc

    class HybridModel(mlflow.pyfunc.PythonModel):
        """Generates with the hybrid (or teacher) folder stored as the artifact ``model``."""

        def load_context(self, context) -> None:
            from snn_research.generate import load_model_folder

            self.model, self.tokenizer, self.kind = load_model_folder(context.artifacts["model"])

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            from snn_research.generate import GenerationOptions, generate

            prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
            given = dict(params or {})
            if not given.get("top_k"):
                given["top_k"] = None  # 0: the whole vocabulary
            options = GenerationOptions(**given)
            return [generate(self.model, self.tokenizer, str(p), options).text for p in prompts]

    return HybridModel


# predict's params and their defaults (top_k 0: the whole vocabulary), as generate's GenerationOptions
PREDICT_PARAMS = {"max_new_tokens": 32, "sample": False, "temperature": 1.0, "top_k": 0, "seed": 0}


def signature():
    """The logged model's signature: prompts in, continuations out, with predict's params."""
    from mlflow.models import infer_signature

    return infer_signature(["a prompt"], ["its continuation"], params=PREDICT_PARAMS)


@dataclass
class Registration:
    name: str
    version: int
    run_id: str
    champion: bool  # this version holds the alias now
    previous_champion: int | None
    reason: str


def metric_of(metrics: dict[str, Any], entry: str, metric: str) -> tuple[float, float]:
    """(metric, ffn_energy_ratio) of ``entry`` in a metrics.json; ValueError names what is missing.

    A teacher entry without ``ffn_energy_ratio`` gets 1.0: its FFNs are the FP32 teacher's FFNs.
    """
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"--metric {metric!r}: choose one of {sorted(LOWER_IS_BETTER)}")
    entries = sorted(key for key, row in metrics.items() if isinstance(row, dict) and key != "domains")
    if entry not in entries:
        raise ValueError(f"metrics.json has no entry {entry!r} (entries: {entries})")
    row = metrics[entry]
    if entry in REFERENCES and ENERGY not in row:
        row = {**row, ENERGY: 1.0}
    missing = [key for key in (metric, ENERGY) if not isinstance(row.get(key), (int, float))]
    if missing:
        raise ValueError(f"metrics.json entry {entry!r} lacks {missing}")
    return float(row[metric]), float(row[ENERGY])


def beats(candidate: tuple[float, float], champion: tuple[float, float], metric: str) -> bool:
    """The champion rule's figures: better on ``metric`` at an equal or lower FFN energy ratio."""
    value, energy = candidate
    best, best_energy = champion
    better = value < best if LOWER_IS_BETTER[metric] else value > best
    return better and energy <= best_energy


def _binding_tags(model_dir: Path, metrics_path: Path, entry: str, evaluation: Path) -> dict[str, str]:
    """``model_manifest`` and the ``test.*`` tags of ``model_dir`` scored as ``entry`` of ``metrics_path``.

    ``evaluation`` is the folder whose manifest is evaluate's record of that evaluation. ValueError, naming the
    file and the field, when the folder is not the one the entry scores or the record lacks what the identity needs.
    """
    from snn_research.artifacts import MANIFEST, verify_folder
    from snn_research.io import sha256_file

    model, model_digest = verify_folder(model_dir)
    stage = ENTRY_STAGES[entry]
    if model.stage != stage:
        raise ValueError(
            f"{model_dir / MANIFEST}: made by stage {model.stage!r}, but metrics entry {entry!r} "
            f"scores the output of {stage!r}"
        )
    record, _ = verify_folder(evaluation, "evaluate")
    record_path = Path(evaluation) / MANIFEST
    recorded_metrics = record.summary.get("metrics_sha256")
    if recorded_metrics is not None and sha256_file(metrics_path) != recorded_metrics:
        raise ValueError(
            f"{metrics_path}: its sha256 is not the metrics_sha256 {str(recorded_metrics)[:12]}... "
            f"that {record_path} records; the metrics come from another evaluation"
        )
    if model_digest not in record.inputs.values():
        raise ValueError(
            f"{metrics_path}: entry {entry!r} scores another model than {model_dir}: the sha256 of "
            f"{model_dir / MANIFEST} ({model_digest[:12]}...) is not among the inputs recorded in "
            f"{record_path}; evaluate this folder first"
        )
    stages = _recorded_stages(record.inputs)
    missing = [name for name in ("split", "download-teacher") if name not in stages]
    if missing:
        raise ValueError(
            f"{record_path}: no folder at its recorded inputs ({sorted(record.inputs)}) still holds the "
            f"manifest evaluate read for stage {missing}; run from the pipeline folder, after evaluate"
        )
    tested = record.params.get("evaluate", {})
    energy = {key: value for key, value in record.params.get("energy", {}).items() if key != "ffn_budget"}
    absent = [f"evaluate.{key}" for key in ("max_blocks", "energy_blocks") if key not in tested]
    if not energy:
        absent.append("energy")
    if absent:
        raise ValueError(f"{record_path}: params lack {absent}")
    identity = {
        "test.splits": stages["split"],
        "test.teacher": stages["download-teacher"],
        "test.max_blocks": json.dumps(tested["max_blocks"]),
        "test.energy_blocks": json.dumps(tested["energy_blocks"]),
        "test.energy": json.dumps(energy, sort_keys=True),
    }
    return {"model_manifest": model_digest, **identity}


def _recorded_stages(inputs: dict[str, str]) -> dict[str, str]:
    """stage -> manifest sha256 of each recorded input whose folder still holds the manifest recorded for it."""
    from snn_research.artifacts import MANIFEST, read_manifest
    from snn_research.io import sha256_file

    stages = {}
    for folder, digest in inputs.items():
        path = Path(folder) / MANIFEST
        if path.is_file() and sha256_file(path) == digest:
            stages[read_manifest(folder).stage] = digest
    return stages


def identity_differences(tags: dict[str, str], champion_tags: dict[str, str]) -> list[str]:
    """The ``test.*`` tags on which a version and the champion differ, as 'tag value against value'; a champion
    without them (its alias set by hand) differs on every one."""

    def shown(text: str | None) -> str:
        if text is None:
            return "none"
        return f"{text[:12]}..." if len(text) == 64 else text  # a sha256

    return [
        f"{key} {shown(tags[key])} against {shown(champion_tags.get(key))}"
        for key in TEST_TAGS
        if tags[key] != champion_tags.get(key)
    ]


def register(
    model_dir: Path,
    metrics_path: Path,
    name: str,
    entry: str = "finetuned",
    metric: str = "ppl",
    tracking_uri: str = "sqlite:///mlflow.db",
    experiment: str = "snn-research",
    evaluation: Path | None = None,
) -> Registration:
    """Log ``model_dir`` as a pyfunc model, register it as ``name``, move ``champion`` if it wins.

    ``evaluation`` is evaluate's evaluation folder (default: the folder ``evaluation`` beside ``metrics_path``,
    where every pipeline's params put it). The model is logged into the active MLflow run when there is one
    (``evaluate`` registers from inside its own stage run), else into a new run of ``experiment`` at ``tracking_uri``.
    """
    import mlflow

    model_dir, metrics_path = Path(model_dir), Path(metrics_path)
    evaluation = metrics_path.parent / "evaluation" if evaluation is None else Path(evaluation)
    if entry not in ENTRY_STAGES:
        raise ValueError(f"--entry {entry!r}: choose one of {sorted(ENTRY_STAGES)}")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json)")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{metrics_path}: unreadable metrics ({error})") from None
    value, energy = metric_of(metrics, entry, metric)
    if not (math.isfinite(value) and math.isfinite(energy)):
        raise ValueError(f"{metrics_path}: {entry}.{metric} or {entry}.{ENERGY} is not finite")
    binding = _binding_tags(model_dir, metrics_path, entry, evaluation)

    try:
        return _register(model_dir, name, entry, metric, value, energy, binding, tracking_uri, experiment)
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"MLflow at {tracking_uri}: {error}") from None


def _champion(client, name: str):
    """The version holding the alias, or None (a registry without the model or the alias has none)."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None


def _register(
    model_dir: Path,
    name: str,
    entry: str,
    metric: str,
    value: float,
    energy: float,
    binding: dict[str, str],
    tracking_uri: str,
    experiment: str,
) -> Registration:
    import mlflow
    from mlflow import MlflowClient

    active = mlflow.active_run()
    if active is None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
    client = MlflowClient()
    current = _champion(client, name)
    held = None
    if current is not None:
        if current.tags.get("metric") != metric:
            raise ValueError(
                f"the champion of {name!r} (version {current.version}) was chosen on "
                f"{current.tags.get('metric')!r}, not {metric!r}: compare on the same metric"
            )
        try:
            held = (float(current.tags["metric_value"]), float(current.tags[ENERGY]))
        except (KeyError, ValueError):
            raise ValueError(
                f"the champion of {name!r} (version {current.version}) lacks the tags metric_value and "
                f"{ENERGY} that `snn-research register` sets; move the alias by hand"
            ) from None
    tags = {
        "metric": metric,
        "metric_value": repr(value),
        ENERGY: repr(energy),
        "entry": entry,
        "model_dir": str(model_dir.resolve()),
        **binding,
    }
    runs = (
        contextlib.nullcontext(active)
        if active is not None
        else mlflow.start_run(run_name=f"register {name}", tags={"role": "register"})
    )
    with runs as run:
        mlflow.log_metrics({metric: value, ENERGY: energy})
        if (model_dir / "hybrid.json").is_file():
            mlflow.log_artifact(str(model_dir / "hybrid.json"), artifact_path="conversion")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_python_model_class()(),
            artifacts={"model": str(model_dir)},
            registered_model_name=name,
            signature=signature(),
            pip_requirements=[],
            await_registration_for=0,
        )
    version = int(info.registered_model_version)
    for key, text in tags.items():
        client.set_model_version_tag(name, str(version), key, text)

    previous = None if current is None else int(current.version)
    differences = [] if current is None else identity_differences(tags, current.tags)
    if current is None:
        moves, reason = True, "no champion yet"
    elif differences:
        moves, reason = (
            False,
            (
                f"scored on another test than version {previous} ({'; '.join(differences)}): "
                f"version {previous} stays champion"
            ),
        )
    elif beats((value, energy), held, metric):
        moves, reason = True, f"{metric} {value:.4g} beats {held[0]:.4g} at FFN energy {energy:.3f} <= {held[1]:.3f}"
    else:
        moves, reason = (
            False,
            (
                f"{metric} {value:.4g} against {held[0]:.4g}, FFN energy {energy:.3f} against "
                f"{held[1]:.3f}: version {previous} stays champion"
            ),
        )
    if moves:
        client.set_registered_model_alias(name, ALIAS, str(version))
    return Registration(name, version, run.info.run_id, moves, previous, reason)

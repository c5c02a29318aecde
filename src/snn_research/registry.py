"""MLflow models: a hybrid (or teacher) folder logged as a pyfunc model, registered, and a ``champion`` alias.

The flavour is MLflow's ``python_function`` with a ``PythonModel`` whose ``load_context`` rebuilds the
model through ``generate.load_model_folder`` (``load_hybrid`` for a hybrid), from the model folder stored
as the logged model's artifact ``model``. The conversion metadata (``hybrid.json``) is that folder's and
is also logged as the run's artifact ``conversion/hybrid.json``. ``predict`` takes prompts (a list of
strings) and returns their continuations (greedy unless ``sample``); the params
``max_new_tokens``, ``sample``, ``temperature``, ``top_k`` (0: all tokens) and ``seed`` are passed to ``generate``.

Champion rule: a new version takes the alias ``champion`` when there is no champion yet, or when it
beats the champion on the chosen metric (lower is better for ``ppl``, ``bpb`` and ``kl_full_to_teacher``,
higher for ``agreement_top1``) at an equal or lower ``ffn_energy_ratio``. Every version carries its
metrics as tags, so the rule needs nothing but the registry.
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
    """(metric, ffn_energy_ratio) of ``entry`` in a metrics.json; ValueError names what is missing."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"--metric {metric!r}: choose one of {sorted(LOWER_IS_BETTER)}")
    row = metrics.get(entry)
    if not isinstance(row, dict):
        raise ValueError(f"metrics.json has no entry {entry!r} (entries: {sorted(k for k in metrics if isinstance(metrics[k], dict))})")
    missing = [key for key in (metric, ENERGY) if not isinstance(row.get(key), (int, float))]
    if missing:
        raise ValueError(f"metrics.json entry {entry!r} lacks {missing}")
    return float(row[metric]), float(row[ENERGY])


def beats(candidate: tuple[float, float], champion: tuple[float, float], metric: str) -> bool:
    """The champion rule: better on ``metric`` at an equal or lower FFN energy ratio."""
    value, energy = candidate
    best, best_energy = champion
    better = value < best if LOWER_IS_BETTER[metric] else value > best
    return better and energy <= best_energy


def register(model_dir: Path, metrics_path: Path, name: str, entry: str = "finetuned", metric: str = "ppl",
             tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "snn-research") -> Registration:
    """Log ``model_dir`` as a pyfunc model, register it as ``name``, move ``champion`` if it wins.

    The model is logged into the active MLflow run when there is one (``evaluate`` registers from inside its
    own stage run), else into a new run of ``experiment`` at ``tracking_uri``.
    """
    import mlflow

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json)")
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{metrics_path}: unreadable metrics ({error})") from None
    value, energy = metric_of(metrics, entry, metric)
    if not (math.isfinite(value) and math.isfinite(energy)):
        raise ValueError(f"{metrics_path}: {entry}.{metric} or {entry}.{ENERGY} is not finite")

    try:
        return _register(model_dir, name, entry, metric, value, energy, tracking_uri, experiment)
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"MLflow at {tracking_uri}: {error}") from None


def _champion(client, name: str):
    """The version holding the alias, or None (a registry without the model or the alias has none)."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None


def _register(model_dir: Path, name: str, entry: str, metric: str, value: float, energy: float, tracking_uri: str,
              experiment: str) -> Registration:
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
            raise ValueError(f"the champion of {name!r} (version {current.version}) was chosen on "
                             f"{current.tags.get('metric')!r}, not {metric!r}: compare on the same metric")
        try:
            held = (float(current.tags["metric_value"]), float(current.tags[ENERGY]))
        except (KeyError, ValueError):
            raise ValueError(f"the champion of {name!r} (version {current.version}) lacks the tags metric_value and "
                             f"{ENERGY} that `snn-research register` sets; move the alias by hand") from None
    tags = {"metric": metric, "metric_value": repr(value), ENERGY: repr(energy), "entry": entry,
            "model_dir": str(model_dir.resolve())}
    runs = (contextlib.nullcontext(active) if active is not None
            else mlflow.start_run(run_name=f"register {name}", tags={"role": "register"}))
    with runs as run:
        mlflow.log_metrics({metric: value, ENERGY: energy})
        if (model_dir / "hybrid.json").is_file():
            mlflow.log_artifact(str(model_dir / "hybrid.json"), artifact_path="conversion")
        info = mlflow.pyfunc.log_model(name="model", python_model=_python_model_class()(),
                                       artifacts={"model": str(model_dir)}, registered_model_name=name,
                                       signature=signature(), pip_requirements=[], await_registration_for=0)
    version = int(info.registered_model_version)
    for key, text in tags.items():
        client.set_model_version_tag(name, str(version), key, text)

    if current is None:
        client.set_registered_model_alias(name, ALIAS, str(version))
        return Registration(name, version, run.info.run_id, True, None, "no champion yet")
    if beats((value, energy), held, metric):
        client.set_registered_model_alias(name, ALIAS, str(version))
        return Registration(name, version, run.info.run_id, True, int(current.version),
                            f"{metric} {value:.4g} beats {held[0]:.4g} at FFN energy {energy:.3f} <= {held[1]:.3f}")
    return Registration(name, version, run.info.run_id, False, int(current.version),
                        f"{metric} {value:.4g} against {held[0]:.4g}, FFN energy {energy:.3f} against {held[1]:.3f}: "
                        f"version {current.version} stays champion")

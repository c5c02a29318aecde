"""report: the evaluation as one offline HTML page, report.html beside metrics.json.

Reads what evaluate and convert wrote: metrics.json (required), the energy report and the
per-layer tables and plot, conversion_metadata.json, and the T sweep's frontier plot when
``reports/frontier.png`` exists (where ``snn-research frontier`` writes it by default; only
pipelines/sweep-t makes it). Each optional file that is absent is left out with a note on the
page. ``evaluation/html_report.py`` renders the page; open it in any browser, it fetches nothing.

MLflow run ids stay out of report.html, the DVC output. They are random, so a page holding them
would change on every run with nothing in its inputs changed, and the smoke pipeline's outputs
are checked to be byte-reproducible. Declaring the page ``cache: false`` would not help: DVC
still records its hash in dvc.lock, so the page would still differ on every run. The ids go to
``report_runs.js`` beside the page instead, which DVC does not track (git ignores it) and the
page loads by that relative name: for each stage, its latest finished run recorded for this
pipeline folder (tags ``role``, ``stage``, ``pipeline_dir`` of ``tracking.py``), plus this
report's own run. When tracking is off or the store cannot be read, the sidecar says so and the
page shows that sentence instead of ids.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from snn_research.evaluation.html_report import RUNS_SCRIPT, ReportInputs, render_page, runs_script_text
from snn_research.io import atomic_write_text
from snn_research.stages.common import StageContext, console

FRONTIER = Path("reports/frontier.png")  # the frontier command's default --plot


def report_path(paths) -> Path:
    return paths.metrics.with_name("report.html")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON {what} ({error})") from None


def read_metrics_entries(path: Path) -> dict:
    """metrics.json as written by evaluate, loosely: older files without teacher_finetuned still load."""
    if not path.is_file():
        raise ValueError(f"{path}: not found; the report needs the evaluate stage's metrics "
                         "(run `snn-research evaluate` first)")
    metrics = _read_json(path, "metrics file")
    if not isinstance(metrics, dict) or "ppl" not in (metrics.get("teacher") or {}):
        raise ValueError(f"{path}: not a metrics.json of the evaluate stage (no teacher entry with a ppl)")
    return metrics


def read_layer_table(path: Path) -> list[dict]:
    """A per-layer CSV of evaluate: the layer as int, every other column as float."""
    with open(path, newline="") as handle:
        try:
            return [{key: int(value) if key == "layer" else float(value) for key, value in row.items()}
                    for row in csv.DictReader(handle)]
        except ValueError as error:
            raise ValueError(f"{path}: not a per-layer table of numbers ({error})") from None


def load_inputs(context: StageContext) -> ReportInputs:
    paths = context.paths
    files = {"metrics": paths.metrics, "energy": paths.evaluation / "energy.json",
             "prices": paths.evaluation / "manifest.json",
             "conversion": paths.conversion_report / "conversion_metadata.json",
             "spike_rates": paths.plots / "layer_spike_rates.csv", "ffn_errors": paths.plots / "layer_ffn_error.csv",
             "layers_png": paths.plots / "layers.png", "frontier_png": FRONTIER}
    metrics = read_metrics_entries(paths.metrics)
    energy = prices = None
    if paths.evaluation.is_dir():  # verified like any stage's input: a tampered file is refused
        prices = context.verify(paths.evaluation, "evaluate").params.get("energy")
        energy = _read_json(files["energy"], "energy report") if files["energy"].is_file() else None
    conversion = _read_json(files["conversion"], "conversion metadata") if files["conversion"].is_file() else None

    def optional(name: str, read):
        return read(files[name]) if files[name].is_file() else None

    return ReportInputs(
        metrics=metrics, energy=energy, prices=prices, conversion=conversion,
        spike_rates=optional("spike_rates", read_layer_table), ffn_errors=optional("ffn_errors", read_layer_table),
        layers_png=optional("layers_png", Path.read_bytes), frontier_png=optional("frontier_png", Path.read_bytes),
        sources={name: path.as_posix() for name, path in files.items()},
    )


def _started(milliseconds: int | None) -> str:
    if milliseconds is None:
        return ""
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _row(run, status: str) -> dict:
    return {"stage": run.data.tags.get("stage", run.info.run_name), "run_id": run.info.run_id,
            "pipeline_run_id": run.data.tags.get("mlflow.parentRunId", ""), "status": status,
            "started": _started(run.info.start_time)}


def latest_stage_runs(uri: str, experiment_name: str, folder: str, current_run_id: str | None = None) -> list[dict]:
    """Per stage, its latest finished run whose pipeline run was started in ``folder``, oldest first;
    then ``current_run_id`` (this report's run, still running) when given."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    ids = [experiment.experiment_id]
    pipelines = client.search_runs(ids, "tags.role = 'pipeline'", order_by=["attributes.start_time DESC"],
                                   max_results=1000)
    here = {run.info.run_id for run in pipelines if run.data.tags.get("pipeline_dir") == folder}
    finished = client.search_runs(ids, "tags.role = 'stage' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000)
    latest: dict[str, object] = {}
    for run in finished:
        stage, parent = run.data.tags.get("stage"), run.data.tags.get("mlflow.parentRunId")
        if parent in here and stage not in latest and run.info.run_id != current_run_id:
            latest[stage] = run
    rows = [_row(run, "FINISHED") for run in sorted(latest.values(), key=lambda run: run.info.start_time)]
    if current_run_id is not None:
        rows.append(_row(client.get_run(current_run_id), "RUNNING (this report)"))
    return rows


def pipeline_runs(tracking, folder: str | None = None) -> tuple[str, list[dict]]:
    """(a sentence on where the run ids come from, or why there are none; the runs)."""
    if not tracking.enabled:
        return "MLflow tracking is off (tracking.enabled: false): this pipeline recorded no runs.", []
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri  # as the stages' tracker resolves it
    folder = folder or str(Path.cwd())
    try:
        import mlflow

        active = mlflow.active_run()  # this stage's run, when its tracker could start one
        runs = latest_stage_runs(uri, tracking.experiment, folder, active.info.run_id if active else None)
    except Exception as error:  # noqa: BLE001 - an unreadable store costs the run ids, never the page
        return f"The tracking store {uri} could not be read ({type(error).__name__}: {error}): no run ids.", []
    if not runs:
        return (f"No finished stage runs for {folder} in {uri}, experiment {tracking.experiment!r}.", [])
    own = ", and this report's run" if runs[-1]["status"].startswith("RUNNING") else ""
    return (f"From {uri}, experiment {tracking.experiment!r}: the latest finished run of each stage "
            f"of the pipeline in {folder}{own}.", runs)


def run(context: StageContext) -> None:
    inputs = load_inputs(context)
    page = report_path(context.paths)
    atomic_write_text(page, render_page(inputs))
    note, runs = pipeline_runs(context.params.tracking)
    atomic_write_text(page.with_name(RUNS_SCRIPT), runs_script_text(note, runs))
    context.tracker.log_artifact(page)
    console.print(f"report: wrote {page} and its run ids in {page.with_name(RUNS_SCRIPT)} ({note})")

"""``snn-research``: one sub-command per pipeline stage, plus ``schema``.

Exit codes: 0 done; 1 bad data, a refused input artifact or a failed run (the
message names the file and the problem); 2 invalid params (the message names
the field); 3 the stage's outputs were written but MLflow tracking failed and
``tracking.strict`` is set.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import typer

from snn_research.config import Params, ParamsError, load_params
from snn_research.stages.common import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# stage -> (module under snn_research.stages, the params sections it reads)
STAGES = {
    "download-teacher": ("download_teacher", ("teacher", "seed")),
    "split": ("split", ("data", "seed")),
    "calibrate": ("calibrate", ("calibrate",)),
    "convert": ("convert", ("convert", "seed")),
    "distill": ("distill", ("distill", "seed")),
    "finetune": ("finetune", ("finetune", "seed")),
    "evaluate": ("evaluate", ("evaluate", "seed")),
}

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to validate and use")


def run_stage(stage: str, params_path: Path) -> None:
    from snn_research.stages.common import StageContext
    from snn_research.tracking import Tracker
    from snn_research.training.loop import TrainingDiverged

    try:
        params = load_params(params_path)
    except ParamsError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    module_name, sections = STAGES[stage]
    dump = params.model_dump(mode="json")
    tracker = Tracker(params, params_path, stage, {name: dump[name] for name in sections})
    module = importlib.import_module(f"snn_research.stages.{module_name}")
    context = StageContext(params=params, params_path=params_path, tracker=tracker)
    try:
        module.run(context)
    except (ValueError, OSError, TrainingDiverged, FloatingPointError) as error:
        tracker.finish("FAILED")
        console.print(f"[red]error in {stage}:[/] {error}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    tracker.finish()
    console.print(f"{stage}: done in {context.elapsed():.1f} s")
    if tracker.failed and params.tracking.strict:
        console.print(f"[red]error:[/] tracking failed and tracking.strict is set ({tracker.failed})")
        raise typer.Exit(3)


def _register(stage: str) -> None:
    def command(params: Path = ParamsOption) -> None:
        run_stage(stage, params)

    command.__doc__ = importlib.import_module(f"snn_research.stages.{STAGES[stage][0]}").__doc__.strip().split("\n")[0]
    app.command(name=stage)(command)


for _stage in STAGES:
    _register(_stage)


@app.command()
def schema() -> None:
    """Print the JSON schema of params.yaml."""
    typer.echo(json.dumps(Params.model_json_schema(), indent=2))


@app.command()
def check(params: Path = ParamsOption) -> None:
    """Validate a params file and print it with every default filled in."""
    try:
        loaded = load_params(params)
    except ParamsError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(loaded.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()

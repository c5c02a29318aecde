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
from rich.markup import escape  # messages quote paths and values that may hold [brackets]

from snn_research.config import Params, ParamsError, load_params
from snn_research.stages.common import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# stage -> (module under snn_research.stages, the params sections it reads)
STAGES = {
    "download-teacher": ("download_teacher", ("teacher", "seed")),
    "split": ("split", ("data", "seed")),
    "calibrate": ("calibrate", ("calibrate",)),
    "convert": ("convert", ("convert", "seed")),
    "distill": ("distill", ("distill", "seed", "energy")),
    "finetune": ("finetune", ("finetune", "seed", "energy")),
    "finetune-teacher": ("finetune_teacher", ("finetune", "seed", "convert")),
    "evaluate": ("evaluate", ("evaluate", "seed", "energy")),
}

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to validate and use")
SetOption = typer.Option(None, "--set", "-S", help="override a param: <dotted.key>=<value> (repeatable)")


def run_stage(stage: str, params_path: Path, overrides: list[str] | None = None) -> None:
    from snn_research.stages.common import StageContext
    from snn_research.tracking import Tracker
    from snn_research.training.loop import TrainingDiverged

    try:
        params = load_params(params_path, overrides)
    except ParamsError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    module_name, sections = STAGES[stage]
    dump = params.model_dump(mode="json")
    tracker = Tracker(params, params_path, stage, {name: dump[name] for name in sections})
    module = importlib.import_module(f"snn_research.stages.{module_name}")
    context = StageContext(params=params, params_path=params_path, tracker=tracker)
    try:
        module.run(context)
    except ParamsError as error:  # a params check that needed the model (e.g. a field its family ignores)
        tracker.finish("FAILED")
        console.print(f"[red]error in {stage}:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    except (ValueError, OSError, TrainingDiverged, FloatingPointError) as error:
        tracker.finish("FAILED")
        console.print(f"[red]error in {stage}:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    tracker.finish()
    console.print(f"{stage}: done in {context.elapsed():.1f} s")
    if tracker.failed and params.tracking.strict:
        console.print(f"[red]error:[/] tracking failed and tracking.strict is set ({escape(tracker.failed)})",
                      markup=True)
        raise typer.Exit(3)


def _register(stage: str) -> None:
    def command(params: Path = ParamsOption, overrides: list[str] = SetOption) -> None:
        run_stage(stage, params, overrides)

    command.__doc__ = importlib.import_module(f"snn_research.stages.{STAGES[stage][0]}").__doc__.strip().split("\n")[0]
    app.command(name=stage)(command)


for _stage in STAGES:
    _register(_stage)


@app.command()
def frontier(
    metrics: list[Path] = typer.Argument(..., help="metrics.json files, one per T"),
    csv_path: Path = typer.Option(Path("reports/frontier.csv"), "--csv", help="CSV for DVC plots"),
    plot_path: Path = typer.Option(Path("reports/frontier.png"), "--plot", help="PNG of ppl against FFN energy"),
) -> None:
    """Quality/energy frontier of a T sweep: perplexity against FFN energy ratio."""
    from snn_research.stages.frontier import write_frontier

    try:
        points = write_frontier(metrics, csv_path, plot_path)
    except ValueError as error:
        console.print(f"[red]error in frontier:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    for point in points:
        typer.echo(f"{point['model']:9s} T={point['time_steps']:3d}  ppl {point['ppl']:.3f}  "
                   f"FFN energy {point['ffn_energy_ratio']:.3f}")


@app.command(name="generate")
def generate_command(
    model_dir: Path = typer.Argument(..., help="teacher folder, or hybrid checkpoint folder (has hybrid.json)"),
    prompt: str = typer.Argument(..., help="text to continue"),
    compare: Path = typer.Option(None, "--compare", help="hybrid folder to run beside MODEL_DIR on the same prompt"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="tokens to generate"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(None, "--temperature", help="with --sample: > 0, divides the logits (default 1)"),
    top_k: int = typer.Option(None, "--top-k", min=1, help="with --sample: keep the k likeliest tokens (default all)"),
    seed: int = typer.Option(None, "--seed", min=0, help="with --sample: seed of the draws (default 0)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Continue a prompt; per token, the spike rate and estimated energy (pJ)."""
    from rich.console import Console

    from snn_research import generate as generation

    try:
        given = {"--temperature": temperature, "--top-k": top_k, "--seed": seed}
        if not sample and any(value is not None for value in given.values()):
            flags = [flag for flag, value in given.items() if value is not None]
            raise ValueError(f"{', '.join(flags)} without --sample: they only shape sampling "
                             f"(got {flags[0]} {given[flags[0]]})")
        if not prompt.strip():
            raise ValueError(f"PROMPT is empty (got {prompt!r})")
        options = generation.GenerationOptions(
            max_new_tokens=max_new_tokens, sample=sample, temperature=1.0 if temperature is None else temperature,
            top_k=top_k, seed=0 if seed is None else seed)
        runs = []
        for folder in [model_dir] + ([compare] if compare is not None else []):
            model, tokenizer, _ = generation.load_model_folder(folder)
            runs.append(generation.generate(model, tokenizer, prompt, options, name=str(folder)))
        if len(runs) == 2 and runs[0].prompt_ids != runs[1].prompt_ids:
            raise ValueError(f"{model_dir} and {compare} tokenize the prompt differently: compare needs one tokenizer")
    except (ValueError, OSError) as error:
        console.print(f"[red]error in generate:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(generation.runs_json(runs), indent=2))
    else:
        generation.print_runs(Console(markup=False, highlight=False), runs)


@app.command()
def schema() -> None:
    """Print the JSON schema of params.yaml."""
    typer.echo(json.dumps(Params.model_json_schema(), indent=2))


@app.command()
def check(params: Path = ParamsOption, overrides: list[str] = SetOption) -> None:
    """Validate a params file and print it with every default filled in."""
    try:
        loaded = load_params(params, overrides)
    except ParamsError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(loaded.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()

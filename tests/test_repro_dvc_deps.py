"""Every stage of every dvc.yaml depends on all the code it runs: its module's static import closure."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines import render_dvc

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = [ROOT / "dvc.yaml", *sorted(p for pattern in ("*/dvc.yaml", "*/dvc.template.yaml")
                                       for p in (ROOT / "pipelines").glob(pattern))]


def stage_definitions(dvc_file: Path) -> dict[str, dict]:
    """name -> definition; a ``foreach`` stage counts once, by its ``do`` template."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def listed_code(dvc_file: Path, deps: list) -> set[str]:
    """The deps under src/snn_research, relative to it (folders end in '/')."""
    package = (ROOT / "src" / "snn_research").resolve()
    listed = set()
    for dep in deps:
        if "${" in dep:
            continue
        path = (dvc_file.parent / dep).resolve()
        if path == package or package in path.parents:
            relative = path.relative_to(package).as_posix()
            listed.add(relative + "/" if path.is_dir() else relative)
    return listed


def uncovered(closure: list[Path], listed: set[str]) -> list[str]:
    folders = [entry for entry in listed if entry.endswith("/")]
    return [path.as_posix() for path in closure
            if path.as_posix() not in listed and not any(path.as_posix().startswith(folder) for folder in folders)]


@pytest.mark.parametrize("dvc_file", PIPELINES, ids=lambda p: p.parent.name if p.parent != ROOT else "root")
def test_every_stage_lists_its_whole_import_closure(dvc_file):
    missing = {}
    for name, stage in stage_definitions(dvc_file).items():
        command = stage["cmd"].split()
        assert command[0] == "snn-research", f"{dvc_file}: stage {name} runs {command[0]!r}"
        module = render_dvc.command_module(command[1])
        assert render_dvc.module_file(module) is not None, f"{dvc_file}: stage {name}: module {module} does not exist"
        gaps = uncovered(render_dvc.import_closure(module), listed_code(dvc_file, stage["deps"]))
        if gaps:
            missing[name] = gaps
    assert not missing, f"{dvc_file.relative_to(ROOT)}: stages miss code deps (run python pipelines/render_dvc.py): {missing}"


def test_rendered_files_are_the_committed_ones():
    for path, text in render_dvc.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from pipelines/render_dvc.py's rendering"


def test_closure_follows_imports_inside_functions_and_named_files(tmp_path, monkeypatch):
    package = tmp_path / "snn_research"
    (package / "stages").mkdir(parents=True)
    (package / "kernels").mkdir()
    (package / "__init__.py").write_text("__version__ = '1'\n")  # runs on every import: listed
    (package / "stages" / "__init__.py").write_text("")  # empty: runs nothing, not listed
    (package / "stages" / "train.py").write_text(
        "from snn_research import shared\n\ndef run():\n    from snn_research.kernels import fast\n    return fast\n")
    (package / "shared.py").write_text("from snn_research.unused_name_only import nothing  # not a module\n")
    (package / "kernels" / "__init__.py").write_text("")
    (package / "kernels" / "fast.py").write_text(
        "from pathlib import Path\nSOURCE = Path(__file__).with_name('fast.cpp')\nfrom .slow import step\n")
    (package / "kernels" / "slow.py").write_text("step = 1\n")
    (package / "kernels" / "fast.cpp").write_text("int main() { return 0; }\n")
    (package / "kernels" / "unrelated.cpp").write_text("")
    (package / "lonely.py").write_text("")
    monkeypatch.setattr(render_dvc, "SRC", tmp_path)

    closure = [path.as_posix() for path in render_dvc.import_closure("snn_research.stages.train")]

    assert closure == ["__init__.py", "kernels/fast.cpp", "kernels/fast.py", "kernels/slow.py", "shared.py",
                       "stages/train.py"]


def test_training_stages_depend_on_what_they_import_inside_functions():
    for stage in ("distill", "finetune"):
        closure = {path.as_posix() for path in render_dvc.import_closure(render_dvc.stage_module(stage))}
        assert {"evaluation/energy.py", "conversion/ann_to_snn_converter.py", "data.py", "teacher.py",
                "hybrid/neuron_kernel.cpp", "stages/training_common.py"} <= closure, stage
    evaluate = {path.as_posix() for path in render_dvc.import_closure(render_dvc.stage_module("evaluate"))}
    assert {"hybrid/neurons.py", "models/hybrid_transformer.py"} <= evaluate


def test_missing_module_is_named():
    with pytest.raises(ValueError, match=r"snn_research\.stages\.nowhere: no such module"):
        render_dvc.import_closure("snn_research.stages.nowhere")


# the pipelines that run the root's stages (sweep-t runs sweep points, continual runs adapt, research-full-spike
# its research steps: each has its own test)
STAGE_PIPELINES = [p for p in PIPELINES if p.parent.name not in ("sweep-t", "continual", "research-full-spike")]


@pytest.mark.parametrize("dvc_file", STAGE_PIPELINES,
                         ids=lambda p: p.parent.name if p.parent != ROOT else "root")
def test_stages_list_the_params_and_data_they_read(dvc_file):
    stages = stage_definitions(dvc_file)
    assert {"paths.splits", "calibrate"} <= set(stages["convert"]["params"])
    assert "${paths.splits}" in stages["convert"]["deps"]
    assert {"energy", "paths.teacher_finetuned"} <= set(stages["evaluate"]["params"])
    assert "${paths.teacher_finetuned}" in stages["evaluate"]["deps"]
    assert "paths" not in stages["evaluate"]["params"], "evaluate lists the paths it reads, not the whole section"
    teacher = stages["finetune-teacher"]
    assert teacher["cmd"] == "snn-research finetune-teacher"
    assert "convert.sites" in stages["calibrate"]["params"]  # calibration covers the sites convert will spike
    assert teacher["params"] == ["finetune", "device", "seed", "convert.layers", "convert.sites", "paths.teacher",
                                 "paths.splits",
                                 "paths.teacher_finetuned", "paths.checkpoints", "paths.plots"]
    assert teacher["outs"][0] == "${paths.teacher_finetuned}"
    plots = {next(iter(entry)): entry[next(iter(entry))] for entry in yaml.safe_load(dvc_file.read_text())["plots"]
             if isinstance(entry, dict)}
    assert "kl_top256_to_teacher" in plots["${paths.plots}/distill_val.csv"]["y"]


def test_continual_adapt_lists_the_params_and_the_model_each_setting_reads():
    stages = yaml.safe_load((ROOT / "pipelines" / "continual" / "dvc.yaml").read_text())["stages"]
    adapt = stages["adapt"]
    assert adapt["do"]["params"] == ["energy", "adapt", "settings.${item.setting}"]  # the seed is in the command
    assert "-S seed=${item.seed}" in adapt["do"]["cmd"]
    assert {"${item.model}", "../../data/splits"} <= set(adapt["do"]["deps"])  # the setting's model and the old domain
    runs = adapt["foreach"]
    assert runs["ann-s1"] == {"setting": "ann", "seed": 1, "model": "../../models/teacher_finetuned"}
    assert runs["control-s2"] == {"setting": "control", "seed": 2, "model": "../../models/finetuned"}
    settings = yaml.safe_load((ROOT / "pipelines" / "continual" / "params.yaml").read_text())["settings"]
    for setting in settings:  # every setting under at least three seeds
        assert len({run["seed"] for run in runs.values() if run["setting"] == setting}) >= 3, setting
    assert {run["setting"] for run in runs.values()} == set(settings)
    curves = {f"reports/curves/{name}.csv" for name in runs}
    assert curves <= set(stages["report"]["deps"])
    assert "--reference ann" in stages["report"]["cmd"]


@pytest.mark.parametrize("dvc_file", STAGE_PIPELINES,
                         ids=lambda p: p.parent.name if p.parent != ROOT else "root")
def test_every_stage_that_computes_on_a_device_lists_it(dvc_file):
    stages = stage_definitions(dvc_file)
    for name in ("calibrate", "convert", "distill", "finetune", "finetune-teacher", "evaluate"):
        assert "device" in stages[name]["params"], name
    assert "device" not in stages["split"]["params"]


def test_research_steps_list_the_params_and_data_they_read():
    dvc_file = ROOT / "pipelines" / "research-full-spike" / "dvc.template.yaml"
    if not dvc_file.exists():
        dvc_file = dvc_file.with_name("dvc.yaml")
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    step = stages["step"]["do"]
    assert step["cmd"] == "snn-research research-step ${item}"
    # a step calibrates, converts, recovers, evaluates and prices on a device
    assert {"calibrate", "convert", "distill", "evaluate", "energy", "device", "seed"} <= set(step["params"])
    assert {"${paths.teacher}", "${paths.splits}", "research.yaml"} <= set(step["deps"])
    assert "../../src/snn_research/research/full_spike.py" in step["deps"]
    steps = yaml.safe_load((dvc_file.parent / "research.yaml").read_text())["steps"]
    assert stages["step"]["foreach"] == list(range(len(steps)))  # one DVC stage per step of research.yaml
    assert {f"reports/research/step_{i}.json" for i in range(len(steps))} <= set(stages["report"]["deps"])

"""Every pipeline folder validates; the mirrors run the same commands as the root pipeline."""

from pathlib import Path

import pytest
import yaml

from snn_research.cli import STAGES
from snn_research.config import load_params

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = ROOT / "pipelines" / "continual"
# sweep-t runs sweep points, continual runs adapt and research-full-spike its research steps after
# the shared first stages: none mirrors the root
MIRRORS = sorted(p for pattern in ("*/dvc.yaml", "*/dvc.template.yaml") for p in (ROOT / "pipelines").glob(pattern)
                 if p.parent.name not in ("sweep-t", "continual", "research-full-spike"))


def _stages(path: Path, prefix: str) -> dict:
    text = path.read_text().replace(prefix, "src/")
    return yaml.safe_load(text)["stages"]


def test_root_pipeline_has_the_seven_stages_in_order():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"snn-research {name}"
        own_code = STAGES[name][0]
        assert f"src/snn_research/stages/{own_code}.py" in stage["deps"], name


@pytest.mark.parametrize("dvc_file", MIRRORS, ids=lambda p: p.parent.name)
def test_pipeline_mirrors_the_root_stages(dvc_file):
    assert _stages(dvc_file, "../../src/") == _stages(ROOT / "dvc.yaml", "src/")


@pytest.mark.parametrize("params", [ROOT / "params.yaml", *sorted(p for p in (ROOT / "pipelines").glob("*/params.yaml")
                                                                  if p.parent != CONTINUAL)],
                         ids=lambda p: p.parent.name)
def test_every_params_file_validates(params):
    load_params(params)


def test_the_continual_params_validate_for_every_run_its_pipeline_runs():
    import shlex

    from snn_research.continual.params import load_adapt_params

    stages = yaml.safe_load((CONTINUAL / "dvc.yaml").read_text())["stages"]
    command = stages["adapt"]["do"]["cmd"]
    for name, run in stages["adapt"]["foreach"].items():
        words = shlex.split(command.replace("${key}", name).replace("${item.setting}", run["setting"])
                            .replace("${item.seed}", str(run["seed"])))
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
        shared, params = load_adapt_params(CONTINUAL / "params.yaml", run["setting"], overrides)
        assert params.model == run["model"], name  # the dep DVC tracks is the model the run adapts
        assert shared.seed == run["seed"], name
        assert params.output == f"models/{name}" and params.curves == f"reports/curves/{name}.csv", name


def test_each_stage_lists_the_params_sections_it_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, (_, sections) in STAGES.items():
        listed = {entry.split(".")[0] for entry in stages[name]["params"]}
        assert set(sections) <= listed, name

"""Every pipeline folder validates and runs the same seven commands as the root pipeline."""

from pathlib import Path

import pytest
import yaml

from snn_research.cli import STAGES
from snn_research.config import load_params

ROOT = Path(__file__).resolve().parents[1]
MIRRORS = sorted(p.parent for p in (ROOT / "pipelines").glob("*/dvc.yaml") if p.parent.name != "sweep-t")


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


@pytest.mark.parametrize("folder", MIRRORS, ids=lambda p: p.name)
def test_pipeline_mirrors_the_root_stages(folder):
    assert _stages(folder / "dvc.yaml", "../../src/") == _stages(ROOT / "dvc.yaml", "src/")


@pytest.mark.parametrize("params", [ROOT / "params.yaml", *sorted((ROOT / "pipelines").glob("*/params.yaml"))],
                         ids=lambda p: p.parent.name)
def test_every_params_file_validates(params):
    load_params(params)


def test_each_stage_lists_the_params_sections_it_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, (_, sections) in STAGES.items():
        listed = {entry.split(".")[0] for entry in stages[name]["params"]}
        assert set(sections) <= listed, name

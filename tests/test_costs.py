"""Each command's cost (wall time, peak memory) goes to reports/timings/ and MLflow, never into a DVC output."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_support import REPO, assert_clean_failure, inside, invoke, run_stages, tiny_params, write_params

from snn_research.costs import CostMeter, StageCost, cost_table, file_name, read_costs, write_cost

from snn_research.config import PathsParams
from snn_research.costs import _reset_peak_rss

RESETS = sys.platform.startswith("linux") and _reset_peak_rss()
linux_only = pytest.mark.skipif(not RESETS, reason="needs Linux's VmHWM and a writable /proc/self/clear_refs")
MIB = 1 << 20


def _touch(size: int) -> bytearray:
    """``size`` bytes, every page written (resident, not only reserved)."""
    block = bytearray(size)
    for offset in range(0, size, 4096):
        block[offset] = 1
    return block


@linux_only
def test_the_meter_records_the_peak_of_the_work_not_of_what_came_before():
    with CostMeter("big") as big:
        block = _touch(400 * MIB)
        del block
    with CostMeter("small", interval_s=0.05) as small:
        block = _touch(40 * MIB)
        time.sleep(0.2)
        del block
    assert big.cost.peak_rss_scope == small.cost.peak_rss_scope == "stage"
    # the first work's 400 MiB is in its peak; the second's peak is reset, so it stays far below the first's
    assert big.cost.peak_rss_bytes >= 400 * MIB
    assert small.cost.peak_rss_bytes < big.cost.peak_rss_bytes - 300 * MIB
    assert small.cost.peak_rss_bytes >= 40 * MIB
    assert small.cost.wall_s >= 0.2
    # the timeline samples the resident size while the work ran: the 40 MiB shows in it
    assert len(small.cost.rss_timeline) >= 3
    assert max(mib for _, mib in small.cost.rss_timeline) * MIB >= small.cost.peak_rss_bytes - 20 * MIB
    if not torch.cuda.is_initialized():
        assert big.cost.peak_gpu_bytes is None  # nothing to read where CUDA is not in use


def test_file_names_and_the_table():
    assert file_name("research-step 0") == "research-step-0.json"
    assert file_name("sweep-point weighted-t5") == "sweep-point-weighted-t5.json"
    with pytest.raises(ValueError, match="no letter or digit"):
        file_name(" / ")
    costs = [StageCost(name=name, finished_utc="2026-01-01T00:00:00+00:00", wall_s=wall, peak_rss_bytes=gib << 30,
                       peak_rss_scope="stage", threads=2, processes=1, interval_s=1.0)
             for name, wall, gib in (("evaluate", 30.0, 3), ("calibrate", 10.4, 5))]
    table = cost_table(costs, order=["calibrate", "evaluate"]).splitlines()
    stamp = "2026-01-01T00:00:00+00:00"
    assert table[2] == f"| calibrate | 10 | 5.00 | 2 | {stamp} |"  # pipeline order, not the order given
    assert table[3] == f"| evaluate | 30 | 3.00 | 2 | {stamp} |"
    assert table[4] == "| all | 40 | 5.00 (max) | | |"


def test_reading_skips_other_json_and_refuses_a_broken_cost(tmp_path):
    cost = StageCost(name="split", finished_utc="x", wall_s=1.0, peak_rss_bytes=MIB, peak_rss_scope="process",
                     threads=1, processes=1, interval_s=1.0)
    write_cost(cost, tmp_path)
    (tmp_path / "replay-s0.json").write_text(json.dumps({"seconds_per_chunk": [1.0]}))  # continual's own file
    assert [c.name for c in read_costs(tmp_path)] == ["split"]
    (tmp_path / "calibrate.json").write_text(json.dumps({**cost.model_dump(), "name": "calibrate", "wall_s": -1}))
    with pytest.raises(ValueError, match=r"calibrate\.json: not a stage cost.*wall_s"):
        read_costs(tmp_path)


def test_stages_record_their_cost_in_timings_and_mlflow(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the stages' mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would send a later test's runs
    # here: set through monkeypatch, the variable is put back as it was when the test ends
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with inside(tmp_path):
        write_params(tiny_params(tracking__enabled=True, tracking__uri=uri, tracking__strict=True))
        run_stages("download-teacher", "split", "calibrate")
        shown = invoke("costs")
    assert shown.exit_code == 0, shown.output
    costs = {cost.name: cost for cost in read_costs(tmp_path / "reports" / "timings")}
    assert set(costs) == {"download-teacher", "split", "calibrate"}
    for cost in costs.values():
        assert cost.wall_s > 0 and cost.processes == 1
        assert cost.peak_rss_scope == ("stage" if RESETS else "process")
        assert cost.peak_rss_bytes >= max(mib for _, mib in cost.rss_timeline) * MIB  # the peak bounds every sample
    assert shown.output.splitlines()[2].startswith("| download-teacher | ")  # pipeline order
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.role = 'stage'", output_format="list")
    logged = {run.data.tags["stage"]: run.data.metrics for run in runs}
    for name, cost in costs.items():
        assert logged[name]["cost_wall_s"] == pytest.approx(cost.wall_s)
        assert logged[name]["cost_peak_rss_gib"] == pytest.approx(cost.peak_rss_bytes / (1 << 30))


def test_a_failed_stage_records_no_cost(tmp_path):
    with inside(tmp_path):
        write_params(tiny_params())
        failed = invoke("calibrate")  # no teacher, no splits
    assert_clean_failure(failed, 1)
    assert not (tmp_path / "reports" / "timings").exists()


def test_costs_of_an_empty_folder_say_so(tmp_path):
    failed = invoke("costs", str(tmp_path))
    assert_clean_failure(failed, 1)
    assert "holds no stage cost" in failed.output


def _resolved(value: str, paths: dict[str, str]) -> Path:
    """An output path of a dvc.yaml with ``${paths.X}`` taken from the folder's params (or its default);
    any other ``${...}`` (a foreach key) stands for one path component."""
    for name, path in paths.items():
        value = value.replace("${paths." + name + "}", str(path))
    return Path(re.sub(r"\$\{[^}]*\}", "item", value).rstrip("/"))


def test_no_dvc_output_holds_the_timings():
    """A timing differs on every run: inside a DVC output it would make every rerun a change."""
    folders = [REPO] + sorted(path.parent for path in (REPO / "pipelines").glob("*/dvc.yaml"))
    defaults = {name: str(value) for name, value in PathsParams().model_dump().items()}
    timings = Path("reports/timings")
    checked = 0
    for folder in folders:
        params = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").is_file() else {}
        paths = {**defaults, **{k: str(v) for k, v in (params or {}).get("paths", {}).items()}}
        stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
        for stage in stages.values():
            body = stage.get("do", stage)
            for out in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                path = _resolved(next(iter(out)) if isinstance(out, dict) else out, paths)
                assert "$" not in str(path), (folder, path)
                assert not timings.is_relative_to(path) and not path.is_relative_to(timings), (folder, path)
                checked += 1
    assert checked > 50
    # the check itself: an output at reports/ or inside reports/timings would be caught
    assert timings.is_relative_to(_resolved("${paths.evaluation}", {"evaluation": "reports"}))

"""The report stage's offline HTML page: its numbers, escaping, no network, missing inputs, run ids kept out."""

from __future__ import annotations

import copy
import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import test_evaluate_stage
from pipeline_support import assert_clean_failure, inside, invoke, run_stages, tiny_params, write_params

from snn_research.artifacts import write_manifest
from snn_research.config import TrackingParams
from snn_research.evaluation.html_report import (
    RUNS_SCRIPT,
    ReportInputs,
    energy_chart_png,
    render_page,
    runs_script_text,
)
from snn_research.evaluation.report import HYBRID_KEYS, INTEGER_KEYS
from snn_research.stages.report import latest_stage_runs, pipeline_runs

evaluated = test_evaluate_stage.evaluated  # its tiny pipeline (teacher to evaluate), reused, not rebuilt here

TEACHER = {"ppl": 74.6006, "bpb": 1.82901}
TEACHER_FINETUNED = {"ppl": 65.1576, "bpb": 1.77161, "agreement_top1": 0.834681, "kl_full_to_teacher": 0.0660818}
FINETUNED = {
    "ppl": 68.1493, "bpb": 1.79065, "agreement_top1": 0.784191, "kl_full_to_teacher": 0.129883,
    "ppl_ratio_to_teacher": 0.913522, "ppl_ratio_to_teacher_finetuned": 1.04591, "spike_rate": 0.223978,
    "break_even_spike_rate": 1.0191, "break_even_spike_rate_int8": 0.0469803, "ffn_energy_ratio": 0.290533,
    "model_energy_ratio": 0.815871, "ffn_energy_ratio_int8": 5.81066, "model_energy_ratio_int8": 2.24852,
    "activation_bits": 6, "ffn_energy_ratio_lowbit": 7.42259, "model_energy_ratio_lowbit": 2.38282,
    "ffn_memory_ratio_per_step": 2.74216, "model_memory_ratio_per_step": 1.45622,
    "ffn_memory_ratio_per_token": 0.659863, "model_memory_ratio_per_token": 0.910929,
}
PRICES = {"e_mac_pj": 4.6, "e_ac_pj": 0.9, "e_mult_int8_pj": 0.2, "e_add_int8_pj": 0.03, "e_add_int32_pj": 0.1,
          "e_read_pj_per_byte": 1.25, "ffn_budget": 0.3}
HYBRIDS = ("converted", "distilled", "finetuned")


def hand_made_metrics() -> dict:
    """metrics.json of a two-layer run: the hybrids differ from the finetuned one by a scale."""
    assert list(FINETUNED) == [k for k in HYBRID_KEYS if k not in INTEGER_KEYS], \
        "the hand-made metrics follow the evaluate stage's fields (a float-weight hybrid's)"
    scaled = {name: {k: v if k == "activation_bits" else round(v * scale, 6) for k, v in FINETUNED.items()}
              for name, scale in (("converted", 1.13), ("distilled", 1.09))}
    return {"time_steps": 5, "teacher": TEACHER, "teacher_finetuned": TEACHER_FINETUNED, **scaled,
            "finetuned": FINETUNED}


def hand_made_energy(metrics: dict) -> dict:
    return {name: {**metrics[name], "hybrid_energy_pj": 1.0246e9, "teacher_energy_pj": 1.2558e9,
                   "hybrid_ffn_energy_pj": 9.469e7, "teacher_ffn_energy_pj": 3.259e8,
                   "teacher_weight_bytes_per_token": 1.0722e9, "hybrid_weight_bytes_per_token_per_step": 2.2046e9,
                   "hybrid_weight_bytes_per_token": 1.0722e9, "tokens": 1024, "sequence_length": 256}
            for name in HYBRIDS}


def hand_made_conversion() -> dict:
    sites = [{"key": f"model.layers.{layer}.mlp:{site}", "layer": layer, "site": site}
             for layer in (0, 1) for site in ("input", "product")]
    choices = [("scale x1", 0.0079, 0.0079), ("channel max", 0.0079, 0.0035), ("scale x1.15", 0.0147, 0.0146),
               ("channel max", 0.0146, 0.0047)]
    return {
        "format_version": 2,
        "teacher": {"source": "package:gemma3-270m", "model_type": "gemma3_text", "num_layers": 2},
        "calibration": {"tokens": 16384, "percentile": 99.9, "bins_per_octave": 32, "relative_error_bound": 0.0219},
        "plan": {"layers": None, "time_steps": 5, "encoder": "weighted", "granularity": "channel",
                 "learnable_threshold": True},
        "sites": sites,
        "clipping": {"method": "search", "search_tokens": 2048, "sites": [
            {"key": site["key"], "choice": choice, "error_before": before, "error_chosen": chosen}
            for site, (choice, before, chosen) in zip(sites, choices)]},
    }


def layer_rows() -> tuple[list[dict], list[dict]]:
    rates = [{"layer": layer, **{f"{n}_{s}": 0.3 + 0.01 * layer for n in HYBRIDS for s in ("input", "second")}}
             for layer in (0, 1)]
    errors = [{"layer": layer, **{n: 0.02 + 0.001 * layer for n in HYBRIDS}} for layer in (0, 1)]
    return rates, errors


def png() -> bytes:
    return energy_chart_png({"finetuned": FINETUNED})  # any PNG stands in for the per-layer plot


@pytest.fixture
def inputs() -> ReportInputs:
    metrics = hand_made_metrics()
    rates, errors = layer_rows()
    return ReportInputs(metrics=metrics, energy=hand_made_energy(metrics), prices=PRICES,
                        conversion=hand_made_conversion(), spike_rates=rates, ffn_errors=errors, layers_png=png(),
                        frontier_png=png(), sources={"metrics": "reports/metrics.json"})


def section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else None]


def row_cells(part: str, first: str) -> list[str]:
    """The unescaped cells of the first table row in ``part`` whose first cell is ``first``."""
    for row in re.findall(r"<tr>(.*?)</tr>", part, re.S):
        cells = [html.unescape(cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


def test_quality_table_has_every_model_and_its_ratios(inputs):
    quality = section(render_page(inputs), "Quality")
    assert row_cells(quality, "model")[1:5] == ["ppl", "bpb", "ppl / teacher", "ppl / teacher finetuned"]
    assert row_cells(quality, "finetuned") == ["finetuned", "68.15", "1.791", "0.914", "1.046", "0.784", "0.1299",
                                               "0.2240", "0.291", "0.816"]
    # the references' ratios are computed from their ppl
    assert row_cells(quality, "teacher")[1:5] == ["74.60", "1.829", "1.000", "1.145"]
    assert row_cells(quality, "teacher_finetuned")[1:7] == ["65.16", "1.772", "0.873", "1.000", "0.835", "0.06608"]
    assert row_cells(quality, "converted")[1] == f"{68.1493 * 1.13:.2f}"


def test_energy_section_has_every_baseline_and_the_break_even_rates(inputs):
    energy = section(render_page(inputs), "Energy against each baseline")
    expected = {"FP32 ANN (the teacher as it runs)": ("0.291", "0.816"),
                "INT8 ANN (8-bit weights and activations)": ("5.811", "2.249"),
                "low-bit ANN (8-bit weights, 6-bit activations)": ("7.423", "2.383"),
                "FP32 + weight reads, spiking weights read every time step": ("2.742", "1.456"),
                "FP32 + weight reads, spiking weights read once per token": ("0.660", "0.911")}
    for label, (ffn, model) in expected.items():
        assert row_cells(energy, label)[-2:] == [ffn, model], label  # the finetuned columns come last
    rates, absolute = energy.split("<h3>Per token, absolute</h3>")
    assert row_cells(rates, "finetuned")[1:5] == ["0.2240", "1.0191", "0.0470", "6"]
    assert row_cells(absolute, "finetuned")[1:6] == ["1.025 mJ", "1.256 mJ", "94.69 µJ", "325.9 µJ", "1.072 GB"]
    assert row_cells(energy, "e_read_pj_per_byte") == ["e_read_pj_per_byte", "1.25"]
    assert 'class="below">0.291<' in energy and 'class="above">5.811<' in energy


def test_conversion_plan_and_clipping_summary(inputs):
    plan = section(render_page(inputs), "Conversion plan")
    assert row_cells(plan, "encoder") == ["encoder", "weighted"]
    assert row_cells(plan, "layers") == ["layers", "—"]
    assert row_cells(plan, "spiking sites") == ["spiking sites", "2 input, 2 product"]
    assert row_cells(plan, "channel max") == ["channel max", "2", "0.01125", "0.0041"]
    assert row_cells(plan, "all sites")[1] == "4"
    assert "lower at 3, higher at 0 of 4 sites" in plan


def test_every_value_is_escaped(inputs):
    hostile = "<script>alert('x')</script>"
    metrics = copy.deepcopy(inputs.metrics)
    metrics[hostile] = metrics.pop("distilled")
    conversion = copy.deepcopy(inputs.conversion)
    conversion["plan"]["encoder"] = "<b>weighted</b>"
    conversion["teacher"]["source"] = 'path:"a&b"'
    page = render_page(ReportInputs(metrics=metrics, conversion=conversion, sources={"metrics": "<i>m</i>"}))
    assert hostile not in page and "<b>weighted" not in page and "<i>m</i>" not in page
    assert html.escape(hostile) in page and "&lt;b&gt;weighted&lt;/b&gt;" in page
    assert "path:&quot;a&amp;b&quot;" in page
    assert row_cells(section(page, "Quality"), hostile)[1] == f"{68.1493 * 1.09:.2f}"
    assert len(re.findall(r"<script\b", page)) == 2  # the run-id sidecar and the inline code that shows it


def test_page_fetches_nothing(inputs):
    page = render_page(inputs)
    assert "http://" not in page and "https://" not in page
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert references, "the page has images"
    assert all(ref.startswith("data:image/png;base64,") or ref == RUNS_SCRIPT for ref in references), references
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_missing_optional_inputs_are_left_out_with_a_note(inputs):
    metrics = copy.deepcopy(inputs.metrics)
    del metrics["teacher_finetuned"]
    for name in HYBRIDS:
        del metrics[name]["ppl_ratio_to_teacher_finetuned"]  # as before the fine-tuned teacher existed
    page = render_page(ReportInputs(metrics=metrics, sources={"frontier_png": "reports/frontier.png"}))
    notes = page[page.index('<div class="notes">'):page.index("<h2>Quality</h2>")]
    assert "no teacher_finetuned entry" in notes
    assert "reports/frontier.png not found: the quality/energy frontier" in notes
    for field in ("energy", "conversion", "layers_png", "spike_rates"):
        assert f"{field} not found" in notes, field
    quality = section(page, "Quality")
    assert "teacher_finetuned" not in quality
    assert row_cells(quality, "finetuned")[3:5] == ["0.914", "—"]
    assert "<h2>Conversion plan</h2>" not in page and "frontier</h2>" not in page and "<img" in page  # the chart
    assert "Per token, absolute" not in page  # absolute figures need energy.json; the ratios come from metrics
    assert row_cells(section(page, "Energy against each baseline"), "INT8 ANN (8-bit weights and activations)")[-2:] \
        == ["5.811", "2.249"]


def write_outputs(folder: Path, inputs: ReportInputs) -> None:
    """The files the report stage reads, as evaluate and convert lay them out."""
    reports = folder / "reports"
    (reports / "plots").mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps(inputs.metrics, indent=2))
    (reports / "conversion_metadata.json").write_text(json.dumps(inputs.conversion))
    (reports / "evaluation").mkdir()
    (reports / "evaluation" / "energy.json").write_text(json.dumps(inputs.energy))
    write_manifest(reports / "evaluation", "evaluate", {"energy": PRICES})
    for name, rows in (("layer_spike_rates.csv", inputs.spike_rates), ("layer_ffn_error.csv", inputs.ffn_errors)):
        with open(reports / "plots" / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (reports / "plots" / "layers.png").write_bytes(inputs.layers_png)


def sidecar(folder: Path) -> dict:
    text = (folder / "reports" / RUNS_SCRIPT).read_text()
    return json.loads(text.removeprefix("window.snnResearchRuns = ").rstrip().removesuffix(";"))


def test_stage_keeps_run_ids_out_of_the_page_and_writes_the_same_bytes_again(workdir, inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SNN_RESEARCH_RUN_KEY", "report-test")
    write_outputs(workdir, inputs)
    write_params(tiny_params(tracking__enabled=True, tracking__uri=f"sqlite:///{workdir}/mlflow.db"))
    run_stages("report")
    page = (workdir / "reports" / "report.html").read_bytes()
    first = sidecar(workdir)
    assert [run["stage"] for run in first["runs"]] == ["report"] and first["runs"][0]["status"].startswith("RUNNING")
    run_stages("report")
    second = sidecar(workdir)
    assert (workdir / "reports" / "report.html").read_bytes() == page
    assert [run["stage"] for run in second["runs"]] == ["report", "report"]  # the first report's run, finished
    assert second["runs"][0]["run_id"] == first["runs"][0]["run_id"] != second["runs"][1]["run_id"]
    for run in second["runs"]:
        assert run["run_id"].encode() not in page and run["pipeline_run_id"].encode() not in page
    assert b"68.15" in page and "experiment 'snn-research-smoke'" in second["note"]


def test_missing_metrics_is_an_error_naming_the_file(workdir):
    write_params(tiny_params())
    result = invoke("report")
    assert_clean_failure(result, 1)
    assert "reports/metrics.json: not found" in result.output
    assert not (workdir / "reports" / "report.html").exists()


def test_latest_finished_run_of_each_stage_in_this_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("snn-research")

    def started(stage: str | None, parent: str | None = None, folder: str = "/here", status: str = "FINISHED") -> str:
        tags = {"role": "stage", "stage": stage, "mlflow.parentRunId": parent} if stage else \
            {"role": "pipeline", "pipeline_dir": folder}
        run = client.create_run(experiment, tags=tags, run_name=stage or "pipeline")
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    first, second, elsewhere = started(None), started(None), started(None, folder="/elsewhere")
    started("evaluate", first)
    convert = started("convert", first)
    evaluate = started("evaluate", second)
    started("evaluate", second, status="FAILED")
    started("evaluate", elsewhere)

    rows = latest_stage_runs(uri, "snn-research", "/here")
    assert [(row["stage"], row["run_id"], row["pipeline_run_id"]) for row in rows] == [
        ("convert", convert, first), ("evaluate", evaluate, second)]
    assert latest_stage_runs(uri, "no-such-experiment", "/here") == []


def test_tracking_off_or_an_unreadable_store_is_said_instead_of_ids(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    note, runs = pipeline_runs(TrackingParams(enabled=False))
    assert runs == [] and "tracking is off" in note
    (tmp_path / "mlflow.db").write_text("not a database")
    broken = f"sqlite:///{tmp_path}/mlflow.db"
    note, runs = pipeline_runs(TrackingParams(uri=broken))
    assert runs == [] and note.startswith(f"The tracking store {broken} could not be read")


def test_stage_on_a_tiny_pipelines_outputs(evaluated, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with inside(evaluated):
        run_stages("report")
    page = (evaluated / "reports" / "report.html").read_text()
    metrics = json.loads((evaluated / "reports" / "metrics.json").read_text())
    for name in ("teacher", "teacher_finetuned", *HYBRIDS):
        assert row_cells(section(page, "Quality"), name)[1] == f"{metrics[name]['ppl']:.2f}", name
    assert row_cells(section(page, "Conversion plan"), "time_steps") == ["time_steps", str(metrics["time_steps"])]
    assert page.count("data:image/png;base64,") == 2  # the energy chart and evaluate's per-layer plot
    assert "reports/frontier.png not found" in page
    assert "tracking is off" in sidecar(evaluated)["note"]


def not_one_colour(path: Path) -> bool:
    try:
        from PIL import Image
    except ImportError:
        from matplotlib.image import imread

        pixels = imread(path)
        return bool((pixels.min(axis=(0, 1)) != pixels.max(axis=(0, 1))).any())
    with Image.open(path) as image:
        return any(low != high for low, high in image.convert("RGB").getextrema())


def chromium(*args: str) -> subprocess.CompletedProcess:
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (.ci/run installs Debian's chromium package)")
def test_headless_chromium_draws_the_page_and_its_run_ids(tmp_path, inputs):
    page = tmp_path / "report.html"
    page.write_text(render_page(inputs))
    screenshot = tmp_path / "report.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", page.as_uri())
    assert screenshot.is_file() and screenshot.stat().st_size > 0
    assert not_one_colour(screenshot)
    without_ids = chromium("--dump-dom", page.as_uri()).stdout
    assert "68.15" in without_ids and "5.811" in without_ids
    assert f"read from {RUNS_SCRIPT} beside it" in without_ids

    run = {"stage": "evaluate", "run_id": "0123abcd" * 4, "pipeline_run_id": "feed" * 8, "status": "FINISHED",
           "started": "2025-01-01 00:00:00 UTC"}
    (tmp_path / RUNS_SCRIPT).write_text(runs_script_text("From the test's store <b>", [run]))
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert "0123abcd" * 4 in dom and "feed" * 8 in dom
    assert "From the test's store &lt;b&gt;" in dom  # text, never markup
    assert f"read from {RUNS_SCRIPT} beside it" not in dom


def test_energy_chart_is_a_png_of_the_same_bytes_each_time():
    first = energy_chart_png({"finetuned": FINETUNED})
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 1000
    assert first == energy_chart_png({"finetuned": FINETUNED})

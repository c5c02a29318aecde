"""DVC outputs depend on params and inputs only: no wall-clock time, host or absolute path in a manifest."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from pipeline_support import prepare, tiny_params

from snn_research.config import Params
from snn_research.stages.common import StageContext


class RecordingTracker:
    """Stands in for the MLflow tracker: keeps what the stage logs."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(metrics)


def test_two_writes_of_the_same_output_give_identical_manifest_bytes(tmp_path):
    params = Params.model_validate(tiny_params())
    written = []
    for name, seconds_ago in (("quick", 0.0), ("slow", 250.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\x00\x01\x02")
        tracker = RecordingTracker()
        context = StageContext(params=params, params_path=Path("params.yaml"), tracker=tracker,
                               started=time.perf_counter() - seconds_ago)
        context.manifest(folder, "download-teacher", {"seed": 0}, {"parameters": 3})
        written.append((folder / "manifest.json").read_bytes())
        # the stage's duration goes to MLflow instead
        assert len(tracker.metrics) == 1 and tracker.metrics[0]["seconds"] >= seconds_ago
    assert written[0] == written[1]
    assert json.loads(written[0])["summary"] == {"parameters": 3}


def test_stage_manifests_are_the_same_bytes_in_two_folders(tmp_path):
    """download-teacher and split run in two different folders: their manifests hold no path, host or time."""
    params = tiny_params()
    first = prepare(tmp_path / "first", params, ("download-teacher", "split"))
    second = prepare(tmp_path / "elsewhere" / "second", params, ("download-teacher", "split"))
    for folder in ("models/teacher", "data/splits"):
        text = (first / folder / "manifest.json").read_text()
        assert text == (second / folder / "manifest.json").read_text(), folder
        assert str(tmp_path) not in text and socket.gethostname() not in text, folder
        assert "seconds" not in json.loads(text)["summary"], folder


def test_measured_errors_keep_four_significant_digits():
    from snn_research.conversion.ann_to_snn_converter import ClippingBlock
    from snn_research.io import significant

    assert significant(0.007931686937808990) == 0.007932
    assert significant(0.0079316869) == significant(0.0079316871)  # last-bit noise of a float32 sum
    assert significant(1234567.0) == 1235000.0 and significant(0.0) == 0.0 and significant(-2.71828) == -2.718
    block = ClippingBlock(path="model.layers.0.mlp", error_percentile=0.003528452245518565, error_chosen=0.01)
    assert block.error_percentile == 0.003528


def test_the_conversion_writes_the_same_bytes_at_one_and_two_threads(tmp_path):
    """Calibrate and convert (with the clipping search) run at 1 and at 2 threads: the conversion metadata,
    its folder's manifest and the thresholds are the same bytes."""
    import torch

    params = tiny_params(convert__clipping="search", data__max_documents=12, data__block_length=64,
                         data__max_blocks_per_split=24, convert__search_blocks=24)
    threads = torch.get_num_threads()
    written = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            folder = prepare(tmp_path / f"threads{count}", params, ("download-teacher", "split", "calibrate", "convert"))
            written.append({name: (folder / name).read_bytes() for name in (
                "reports/conversion_metadata.json", "models/converted/manifest.json",
                "models/converted/hybrid.json")})
    finally:
        torch.set_num_threads(threads)
    assert b'"method": "search"' in written[0]["reports/conversion_metadata.json"].replace(b'":"', b'": "')
    assert written[0] == written[1]


def test_stage_manifests_name_the_device_their_stage_computed_on(tmp_path):
    """calibrate and convert run the model (on the CPU here); split runs none and records no device."""
    folder = prepare(tmp_path / "run", tiny_params(), ("download-teacher", "split", "calibrate", "convert"))
    device = {path: json.loads((folder / path / "manifest.json").read_text())["device"]
              for path in ("data/splits", "reports/calibration", "models/converted")}
    assert device == {"data/splits": None, "reports/calibration": "cpu", "models/converted": "cpu"}

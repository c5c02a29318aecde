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

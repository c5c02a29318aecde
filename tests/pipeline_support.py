"""Helpers for tests that run pipeline stages: a tiny params file, the CLI in-process, prepared folders.

Stages read and write fixed paths relative to the current directory, so every test
runs them inside its own temporary folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner, Result

from snn_research.cli import app

REPO = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = REPO / "pipelines" / "smoke" / "params.yaml"
STAGES = ("download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher", "evaluate")

# the smoke pipeline made smaller still: 8 plays, 32-token blocks, a handful of steps
TINY = {
    "tracking": {"enabled": False},
    "data": {"max_documents": 8, "block_length": 32, "max_blocks_per_split": 8},
    "calibrate": {"max_blocks": 4, "batch_size": 4},
    "distill": {
        "layerwise": {"blocks": 4, "steps_per_layer": 2},
        "steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "val_blocks": 2,
    },
    "finetune": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2,
                 "val_blocks": 2},
    "evaluate": {"max_blocks": 4, "batch_size": 4, "energy_blocks": 1, "timing": False},
}


def merge(base: dict, changes: dict) -> dict:
    """A deep copy of ``base`` with the nested ``changes`` laid over it."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(params: dict, values: dict[str, Any]) -> dict:
    """A copy of ``params`` with ``{"distill.layerwise.lr": 0}``-style values set (sections made as needed)."""
    out = copy.deepcopy(params)
    for key, value in values.items():
        node = out
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return out


def tiny_params(**values: Any) -> dict:
    """The smoke params made tiny; keyword arguments are dotted keys with '__' for '.'."""
    params = merge(yaml.safe_load(SMOKE_PARAMS.read_text()), TINY)
    return set_dotted(params, {key.replace("__", "."): value for key, value in values.items()})


def write_params(params: dict, path: Path | str = "params.yaml") -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def invoke(*args: str) -> Result:
    """``snn-research <args>`` in-process; stdout and stderr together in ``result.output``."""
    # a wide console keeps each message on one line, whatever the terminal
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "1000"})


def run_stages(*stages: str, params: Path | str = "params.yaml") -> dict[str, Result]:
    results = {}
    for stage in stages:
        result = invoke(stage, "-p", str(params))
        assert result.exit_code == 0, f"{stage} failed ({result.exit_code}):\n{result.output}\n{result.exception!r}"
        results[stage] = result
    return results


def assert_clean_failure(result: Result, exit_code: int) -> None:
    """The command stopped with ``exit_code`` and a message, not with a traceback."""
    assert result.exit_code == exit_code, f"exit {result.exit_code}, expected {exit_code}:\n{result.output}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "error" in result.output


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[Path]:
    """Run with ``folder`` as the working directory (for fixtures wider than a function)."""
    previous = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


def prepare(folder: Path, params: dict, stages: tuple[str, ...]) -> Path:
    """Write ``params`` into ``folder`` and run ``stages`` there."""
    with inside(folder):
        write_params(params)
        run_stages(*stages)
    return folder


def copy_pipeline(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def rewrite_manifest_hash(folder: Path, name: str) -> None:
    """Make ``folder/manifest.json`` agree with the current bytes of ``name`` (to get past the hash check)."""
    from snn_research.io import sha256_file

    manifest_path = Path(folder) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = sha256_file(Path(folder) / name)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def save_tiny_model_folder(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A Hugging Face folder (config, safetensors, byte-level tokenizer) for a ``path:`` teacher."""
    import torch
    from transformers import AutoModelForCausalLM

    from snn_research.teacher import byte_tokenizer, random_config

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(random_config(family, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


@contextlib.contextmanager
def saved_figures() -> Iterator[list[dict]]:
    """Every matplotlib figure saved inside the block, as it was plotted: its axes' lines (label, x, y), the
    texts written on them (annotations), and the size in pixels it was saved at."""
    import pytest
    from matplotlib.figure import Figure

    figures: list[dict] = []
    original = Figure.savefig

    def spy(figure, fname, *args, **kwargs):
        dpi = kwargs.get("dpi") or figure.dpi
        width, height = figure.get_size_inches() * dpi
        figures.append({
            "lines": [(line.get_label(), [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
                      for axis in figure.axes for line in axis.get_lines()],
            "texts": [text.get_text() for axis in figure.axes for text in axis.texts],
            "pixels": (round(height), round(width)),
        })
        return original(figure, fname, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", spy)
        yield figures

"""Manifests: every output folder says what it holds, from which inputs, made how.

``manifest.json`` lists the sha256 of every file in its folder, the sha256 of
each input folder's manifest (which in turn pins that folder's files), the
params the stage read, the package versions and the type of device the stage
computed on (``cpu``, ``cuda``, ``mps``; none for a stage that runs no model:
devices round differently, so it is part of what made the numbers). A stage calls
``verify_folder`` on each input first: a missing, unparsable or tampered input
is refused with a message naming the file.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snn_research.errors import format_validation_error
from snn_research.io import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
StageName = Literal["download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher",
                    "evaluate"]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = 1
    stage: StageName
    files: dict[str, str] = Field(description="file path relative to the folder -> sha256")
    inputs: dict[str, str] = Field(default_factory=dict, description="input folder -> sha256 of its manifest.json")
    params: dict[str, Any] = Field(default_factory=dict, description="the params sections this stage read")
    versions: dict[str, str] = Field(default_factory=dict)
    device: str | None = Field(default=None, description="device type the stage computed on; None: it ran no model")
    summary: dict[str, Any] = Field(default_factory=dict, description="what the stage made, in numbers")


def package_versions() -> dict[str, str]:
    """The versions that decide a stage's numbers; no host, path or time, so a rerun writes the same bytes."""
    import torch
    import transformers

    from snn_research import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "snn_research": __version__,
    }


def folder_files(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(
    folder: Path,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str] | None = None,
    summary: dict[str, Any] | None = None,
    device: Any = None,
) -> Manifest:
    """Hash every file of ``folder`` (written, not yet published) and write its manifest.

    ``device``: the device the stage computed on (a ``torch.device`` or its name); its type is recorded, not
    its index, since which of a machine's GPUs ran it does not change the numbers. None: the stage ran no model.
    """
    manifest = Manifest(
        stage=stage,
        files=folder_files(folder),
        inputs=inputs or {},
        params=json.loads(json.dumps(params, default=str)),
        versions=package_versions(),
        summary=summary or {},
        device=None if device is None else str(device).split(":")[0],  # 'cuda:1' -> 'cuda'
    )
    atomic_write_text(Path(folder) / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(folder: Path, stage: str | None = None) -> Manifest:
    """The manifest of ``folder``; ``stage`` (the stage that makes the folder) only improves the messages."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        maker = f"'snn-research {stage}'" if stage else "the stage that makes it"
        raise ValueError(f"{folder}: input folder is missing (run {maker} first)")
    if not path.is_file():
        raise ValueError(f"{path}: manifest is missing; the folder was not written by a completed stage")
    # parsed here, not by pydantic, so the messages are this project's and stay put across pydantic releases
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid manifest: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: invalid manifest: the top level must be a JSON object (got {type(document).__name__})")
    try:
        return Manifest.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"{path}: invalid manifest: {format_validation_error(error)}") from None


def verify_folder(folder: Path, stage: str | None = None) -> tuple[Manifest, str]:
    """Check a folder against its manifest; returns it and the manifest's own sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder, stage)
    if stage is not None and manifest.stage != stage:
        raise ValueError(f"{folder / MANIFEST}: made by stage {manifest.stage!r}, expected {stage!r}")
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {folder / MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"{path}: sha256 {actual[:12]}... does not match its manifest ({expected[:12]}...); "
                "the file was modified or truncated after the stage wrote it"
            )
    return manifest, sha256_file(folder / MANIFEST)

"""convert: the teacher's chosen FFNs become spiking blocks with calibrated thresholds."""

from __future__ import annotations

import shutil

from snn_research.conversion.ann_to_snn_converter import (
    METADATA_FILE,
    THRESHOLDS_FILE,
    TeacherIdentity,
    convert,
    write_hybrid_files,
)
from snn_research.conversion.calibrator import load_calibration
from snn_research.io import atomic_directory, atomic_write_text

CONVERSION_METADATA_FILE = "conversion_metadata.json"
from snn_research.models.hybrid_transformer import HybridPlan
from snn_research.stages.common import StageContext, console
from snn_research.teacher import load_teacher


def run(context: StageContext) -> None:
    params = context.params
    teacher_manifest = context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.calibration, "calibrate")
    teacher, tokenizer = load_teacher(context.paths.teacher)
    calibration, calibration_file = load_calibration(context.paths.calibration)
    plan = HybridPlan(**params.convert.model_dump())
    info = teacher_manifest.summary
    identity = TeacherIdentity(
        source=info["source"],
        sha256=info["source_sha256"],
        model_type=info["model_type"],
        architectures=info["architectures"],
        num_layers=info["num_layers"],
    )
    hybrid, metadata, _ = convert(teacher, calibration, plan, identity, calibration_file.data_sha256)
    with atomic_directory(context.paths.converted) as tmp:
        written = write_hybrid_files(hybrid, tokenizer, metadata, tmp)
        context.manifest(tmp, "convert", {"convert": params.convert.model_dump(), "seed": params.seed},
                         {"sites": len(written.sites), "time_steps": plan.time_steps})
    # the metadata JSON and its tensors, also as top-level reports
    folder = context.paths.conversion_report
    folder.mkdir(parents=True, exist_ok=True)
    tensors_tmp = folder / (THRESHOLDS_FILE + ".tmp")
    shutil.copyfile(context.paths.converted / THRESHOLDS_FILE, tensors_tmp)
    tensors_tmp.replace(folder / THRESHOLDS_FILE)
    atomic_write_text(folder / CONVERSION_METADATA_FILE, (context.paths.converted / METADATA_FILE).read_text())
    context.tracker.log_metrics({"sites": len(written.sites), "time_steps": plan.time_steps})
    context.tracker.log_artifact(folder / CONVERSION_METADATA_FILE)
    console.print(f"convert: {len(written.sites)} sites over {len(written.sites) // 2} FFNs at T={plan.time_steps} "
                  f"-> {context.paths.converted}")

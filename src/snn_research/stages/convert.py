"""convert: the teacher's chosen FFNs become spiking blocks with calibrated thresholds."""

from __future__ import annotations

import shutil

from snn_research.config import ParamsError
from snn_research.conversion.ann_to_snn_converter import (
    METADATA_FILE,
    THRESHOLDS_FILE,
    ClippingBlock,
    ClippingChoice,
    ClippingRecord,
    PlanConflict,
    TeacherIdentity,
    add_headroom,
    convert,
    headroom_factor,
    refresh_metadata,
    write_hybrid_files,
)
from snn_research.conversion.calibrator import load_calibration
from snn_research.conversion.threshold_search import search_clipping
from snn_research.data import load_blocks, spread
from snn_research.devices import place
from snn_research.io import atomic_directory, atomic_write_text
from snn_research.stages.common import StageContext, console
from snn_research.teacher import load_teacher

CONVERSION_METADATA_FILE = "conversion_metadata.json"


def run(context: StageContext) -> None:
    params = context.params
    teacher_manifest = context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.calibration, "calibrate")
    teacher, tokenizer = load_teacher(context.paths.teacher)
    calibration, calibration_file = load_calibration(context.paths.calibration)
    plan = params.convert.calibration_plan()  # all of T unless some steps are headroom
    info = teacher_manifest.summary
    identity = TeacherIdentity(
        source=info["source"],
        sha256=info["source_sha256"],
        model_type=info["model_type"],
        architectures=info["architectures"],
        num_layers=info["num_layers"],
    )
    try:
        hybrid, metadata, _ = convert(teacher, calibration, plan, identity, calibration_file.data_sha256)
    except PlanConflict as conflict:
        raise ParamsError(f"{context.params_path}: invalid params\nconvert.{conflict}") from None
    record = ClippingRecord(method="percentile")
    if params.convert.clipping == "search":
        context.verify(context.paths.splits, "split")
        calib = spread(load_blocks(context.paths.splits, "calib"), params.convert.search_block_count)
        teacher, hybrid, blocks = place(context.device, teacher=teacher, hybrid=hybrid, blocks=calib.input_ids)
        groups = calib.domains() if params.convert.search_objective == "worst_domain" else None
        if groups is not None and int(groups.unique().numel()) < 2:
            raise ValueError(f"convert.search_objective 'worst_domain': the {calib.input_ids.shape[0]} search blocks "
                             f"(convert.search_blocks) hold {int(groups.unique().numel())} text domain(s); the "
                             "worst of one is the pooled error, so raise search_blocks")
        choices, block_errors = search_clipping(hybrid, teacher, list(blocks.split(params.calibrate.batch_size)),
                                                block_groups=groups)
        record = ClippingRecord(method="search", search_tokens=int(blocks.numel()),
                                objective=params.convert.search_objective,
                                sites=[ClippingChoice(**choice.__dict__) for choice in choices],
                                blocks=[ClippingBlock(**error.__dict__) for error in block_errors])
        metadata, _ = refresh_metadata(hybrid, metadata)
        for error in block_errors:  # paths end in '.<layer>.mlp'
            context.tracker.log_metrics({"clip_error_percentile": error.error_percentile,
                                         "clip_error_chosen": error.error_chosen}, step=int(error.path.split(".")[-2]))
        before = sum(e.error_percentile for e in block_errors) / len(block_errors)
        after = sum(e.error_chosen for e in block_errors) / len(block_errors)
        console.print(f"convert: clipping search over {len(choices)} sites: mean relative FFN output error "
                      f"{before:.4f} at the percentile thresholds -> {after:.4f}")
    headroom = params.convert.headroom_steps
    if headroom:
        time_steps = add_headroom(hybrid, headroom)
        metadata, _ = refresh_metadata(hybrid, metadata)
        console.print(f"convert: {headroom} headroom steps: thresholds x{headroom_factor(time_steps, headroom):.3f} "
                      f"at T = {time_steps} (calibrated at T = {plan.time_steps})")
        plan = params.convert.plan()
    metadata = metadata.model_copy(update={"clipping": record, "headroom_steps": headroom})
    hybrid.to("cpu")  # the files are written from CPU tensors on any device
    with atomic_directory(context.paths.converted) as tmp:
        written = write_hybrid_files(hybrid, tokenizer, metadata, tmp)
        context.manifest(tmp, "convert", {"convert": params.convert.model_dump(), "seed": params.seed,
                                          "calibrate": params.calibrate.model_dump()},
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
    console.print(f"convert: {len(written.sites)} sites ({', '.join(plan.sites)}) at T={plan.time_steps} "
                  f"-> {context.paths.converted}")

"""calibrate: stream the calib split through the teacher; percentile thresholds for every site."""

from __future__ import annotations

from snn_research.conversion.calibrator import Calibrator, save_calibration
from snn_research.data import load_blocks, spread
from snn_research.devices import place
from snn_research.io import atomic_directory, sha256_file
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.teacher import load_teacher


def run(context: StageContext) -> None:
    params = context.params.calibrate
    sites = context.params.convert.sites  # calibrate what convert will spike
    context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.splits, "split")
    model, _ = load_teacher(context.paths.teacher)
    blocks = spread(load_blocks(context.paths.splits, "calib"), params.max_blocks).input_ids
    model, blocks = place(context.device, teacher=model, blocks=blocks)
    calibrator = Calibrator(model, bins_per_octave=params.bins_per_octave, sites=sites)
    batches = list(blocks.split(params.batch_size))
    with progress_bar("calibrating", len(batches)) as advance:
        for batch in batches:
            calibrator.observe(batch)
            advance(info=f"{calibrator.tokens:,} tokens")
    calibrator.remove_hooks()
    result = calibrator.result(params.percentile)
    with atomic_directory(context.paths.calibration) as tmp:
        summary = save_calibration(result, tmp, sha256_file(context.paths.splits / "calib.safetensors"))
        context.manifest(tmp, "calibrate", {"calibrate": params.model_dump(), "convert.sites": list(sites)},
                         {"tokens": result.tokens, "sites": len(result.sites), "percentile": result.percentile,
                          "relative_error_bound": result.relative_error_bound})
    context.tracker.log_metrics({"tokens": result.tokens, "relative_error_bound": result.relative_error_bound})
    for site in summary.sites:
        if site.layer is None:  # the LM head's site: one value, no layer axis
            context.tracker.log_metrics({f"threshold_layer.{site.site}": site.layer_threshold})
            continue
        context.tracker.log_metrics({f"threshold_layer.{site.site}": site.layer_threshold}, step=site.layer)
    context.tracker.log_artifact(context.paths.calibration / "calibration.json")
    console.print(f"calibrate: {len(result.sites)} sites from {result.tokens:,} tokens "
                  f"(percentile {result.percentile}, error bound {result.relative_error_bound:.2%})")

"""sweep-point and sweep-peer: one training-free point of the coding x T sweep each (``pipelines/sweep-t``).

``sweep-point`` converts the teacher exactly as the ``convert`` stage does with the params given
(``-S convert.encoder=... -S convert.time_steps=...``), the clipping search included, keeps the hybrid
in memory, and scores it as ``evaluate`` scores its hybrids: ``evaluate.max_blocks`` test blocks for
quality, ``evaluate.energy_blocks`` of them for energy (``measure_energy`` + ``baselines.compare``).

``sweep-peer`` does the same for SpikingJelly 2.0's Qwen2 recipe at T (``evaluation/peer_qwen2.py``),
calibrated on the same calib blocks as ``calibrate`` and scored on the same test blocks.

Neither trains: the sweep is the conversion's frontier. The distilled and fine-tuned hybrids of one
setting are what the full pipelines (the root, ``pipelines/smollm2``) measure.
"""

from __future__ import annotations

import math
from pathlib import Path

from snn_research.config import ParamsError
from snn_research.conversion.ann_to_snn_converter import PlanConflict, TeacherIdentity, convert
from snn_research.conversion.calibrator import load_calibration
from snn_research.conversion.threshold_search import search_clipping
from snn_research.data import load_blocks, single_domain, spread
from snn_research.devices import place
from snn_research.evaluation.baselines import Prices, compare
from snn_research.evaluation.energy import encoder_levels, measure_energy
from snn_research.evaluation.quality import evaluate_quality
from snn_research.evaluation.sweep import PEER_SERIES, SweepPoint, peer_ffn_energy, write_point
from snn_research.models.families import family_for_model
from snn_research.stages.common import StageContext, console, progress_bar
from snn_research.teacher import load_teacher


def _test_blocks(context: StageContext):
    params = context.params.evaluate
    test = spread(single_domain(load_blocks(context.paths.splits, "test"), str(context.paths.splits), "sweep-point"),
                  params.max_blocks)
    return test, spread(test, params.energy_blocks).input_ids


def _quality(context: StageContext, teacher, model, test) -> dict[str, float]:
    batch = context.params.evaluate.batch_size
    with progress_bar("scoring", -(-test.input_ids.shape[0] // batch)) as advance:
        totals = evaluate_quality(teacher, {"model": model}, test.input_ids, test.target_bytes, batch, progress=advance)
    teacher_ppl = totals["teacher"].summary(teacher=True)["ppl"]
    scores = totals["model"].summary(teacher=False)
    return {"teacher_ppl": teacher_ppl, "ppl_ratio": scores["ppl"] / teacher_ppl,
            "test_tokens": int(test.input_ids.numel()), **scores}


def run_point(context: StageContext, out: Path) -> SweepPoint:
    params = context.params
    teacher_manifest = context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.calibration, "calibrate")
    context.verify(context.paths.splits, "split")
    teacher, _ = load_teacher(context.paths.teacher)
    calibration, calibration_file = load_calibration(context.paths.calibration)
    if params.convert.headroom_steps:
        raise ParamsError(f"{context.params_path}: invalid params\nconvert.headroom_steps: sweep-point converts "
                          "without headroom; set 0")
    plan = params.convert.plan()
    info = teacher_manifest.summary
    identity = TeacherIdentity(source=info["source"], sha256=info["source_sha256"], model_type=info["model_type"],
                               architectures=info["architectures"], num_layers=info["num_layers"])
    try:
        hybrid, _, _ = convert(teacher, calibration, plan, identity, calibration_file.data_sha256)
    except PlanConflict as conflict:
        raise ParamsError(f"{context.params_path}: invalid params\nconvert.{conflict}") from None
    test, energy_ids = _test_blocks(context)
    teacher, hybrid, test_ids, energy_ids = place(context.device, teacher=teacher, hybrid=hybrid,
                                                  test_ids=test.input_ids, energy_ids=energy_ids)
    test.input_ids = test_ids
    if params.convert.clipping == "search":
        blocks = spread(load_blocks(context.paths.splits, "calib"), params.convert.search_block_count).input_ids
        blocks = place(context.device, blocks=blocks)
        search_clipping(hybrid, teacher, list(blocks.split(params.calibrate.batch_size)))
    quality = _quality(context, teacher, hybrid, test)
    prices = Prices.from_params(params.energy)
    report = measure_energy(hybrid, energy_ids, prices.e_mac_pj, prices.e_ac_pj)
    figures = compare(report, prices)
    encoders = [module for module in hybrid.modules() if hasattr(module, "time_steps") and hasattr(module, "kind")]
    point = SweepPoint(
        series=plan.encoder, encoder=plan.encoder, time_steps=plan.time_steps,
        levels=encoder_levels(encoders[0]) if encoders else plan.time_steps, clipping=params.convert.clipping,
        spike_rate=report.mean_spike_rate,
        **{key: figures[key] for key in ("ffn_energy_ratio", "ffn_energy_ratio_int8", "ffn_energy_ratio_lowbit",
                                         "ffn_memory_ratio_per_token", "model_energy_ratio")},
        **quality)
    write_point(point, out)
    _log(context, point, out)
    return point


def run_peer(context: StageContext, out: Path, time_steps: int, levels: int | None, quantile: float) -> SweepPoint:
    from snn_research.evaluation.peer_qwen2 import as_qwen2, convert_peer, mlp_spikes_per_token, peer_levels

    params = context.params
    if not 0 < time_steps:
        raise ParamsError(f"--time-steps must be >= 1 (got {time_steps})")
    if not 0.0 < quantile <= 1.0:
        raise ParamsError(f"--quantile must lie in (0, 1] (got {quantile})")
    levels = peer_levels(time_steps) if levels is None else levels
    context.verify(context.paths.teacher, "download-teacher")
    context.verify(context.paths.splits, "split")
    teacher, _ = load_teacher(context.paths.teacher)
    test, energy_ids = _test_blocks(context)
    calib_ids = spread(load_blocks(context.paths.splits, "calib"), params.calibrate.max_blocks).input_ids
    teacher, test_ids, energy_ids, calib_ids = place(context.device, teacher=teacher, test_ids=test.input_ids,
                                                     energy_ids=energy_ids, calib_ids=calib_ids)
    test.input_ids = test_ids
    qwen = as_qwen2(teacher, test_ids[:1])
    snn = convert_peer(qwen, calib_ids, time_steps, levels, quantile, params.calibrate.batch_size)
    snn.set_collect_statistics(False)  # quality first; the statistics pass below counts the spikes
    quality = _quality(context, teacher, snn, test)
    spikes = mlp_spikes_per_token(snn, energy_ids, params.evaluate.batch_size)
    family = family_for_model(teacher)
    energy = peer_ffn_energy(teacher.config.hidden_size, teacher.config.intermediate_size, family.ffn_elementwise,
                             time_steps, spikes, Prices.from_params(params.energy))
    point = SweepPoint(series=PEER_SERIES, encoder="signed-qcfs", time_steps=time_steps, levels=time_steps,
                       clipping=f"quantile {quantile:g}, {levels} calibration levels", **energy, **quality)
    write_point(point, out)
    _log(context, point, out)
    return point


def _log(context: StageContext, point: SweepPoint, out: Path) -> None:
    values = point.model_dump()
    context.tracker.log_metrics({k: v for k, v in values.items()
                                 if isinstance(v, float) and math.isfinite(v)})
    console.print(f"{point.series} T={point.time_steps}: ppl {point.ppl:.3f} ({point.ppl_ratio:.3f}x teacher), "
                  f"agreement {point.agreement_top1:.3f}, KL {point.kl_full_to_teacher:.3f}, FFN energy "
                  f"{point.ffn_energy_ratio:.3f} (INT8 {point.ffn_energy_ratio_int8:.2f}) -> {out}")

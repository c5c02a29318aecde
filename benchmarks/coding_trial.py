"""Training-free trial of spike codings on the default pipeline's teacher: quality against FFN energy.

    python -m benchmarks.coding_trial if:8:percentile weighted:5:search lif:8:percentile

Each argument is ``encoder:T:clipping``. It converts the teacher in ``models/teacher`` with
the calibration in ``reports/calibration`` (run ``dvc repro calibrate`` first), optionally
searches the clipping on 8 calib blocks, and scores 8 test blocks against the teacher:
perplexity ratio, top-1 agreement, full KL, and the FFN energy ratio and spike rate of
``measure_energy`` on 2 blocks. One JSON line per setting, plus the wall time of the
conversion and scoring (the LIF encoder is simulated, the others are closed forms).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from snn_research.conversion.ann_to_snn_converter import TeacherIdentity, convert
from snn_research.conversion.calibrator import load_calibration
from snn_research.conversion.threshold_search import search_clipping
from snn_research.data import load_blocks, spread
from snn_research.evaluation.energy import measure_energy
from snn_research.models.hybrid_transformer import HybridPlan
from snn_research.teacher import load_teacher


def _score(model, teacher, test: torch.Tensor) -> tuple[float, float, float]:
    """(mean next-token NLL, agreement with the teacher's top-1, full KL to the teacher) per position."""
    nll = agree = kl = 0.0
    positions = 0
    with torch.no_grad():
        for batch in test.split(4):
            reference = teacher(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            logp = model(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            targets = batch[:, 1:]
            nll += -logp.gather(-1, targets[..., None]).sum().item()
            agree += (logp.argmax(-1) == reference.argmax(-1)).sum().item()
            kl += (reference.exp() * (reference - logp)).sum().item()
            positions += targets.numel()
    return nll / positions, agree / positions, kl / positions


def main(settings: list[str]) -> None:
    teacher, _ = load_teacher("models/teacher")
    calibration, _ = load_calibration("reports/calibration")
    test = spread(load_blocks("data/splits", "test"), 8).input_ids
    calib = spread(load_blocks("data/splits", "calib"), 8).input_ids
    identity = TeacherIdentity(source="trial", sha256="0" * 64, model_type=teacher.config.model_type,
                               architectures=[], num_layers=teacher.config.num_hidden_layers)
    teacher_nll, _, _ = _score(teacher, teacher, test)
    print(json.dumps({"teacher_ppl": round(math.exp(teacher_nll), 3)}), flush=True)
    for setting in settings:
        encoder, time_steps, clipping = setting.split(":")
        started = time.perf_counter()
        plan = HybridPlan(time_steps=int(time_steps), encoder=encoder)
        hybrid, _, _ = convert(teacher, calibration, plan, identity, "0" * 64)
        if clipping == "search":
            search_clipping(hybrid, teacher, list(calib.split(4)))
        elif clipping != "percentile":
            raise SystemExit(f"{setting}: clipping must be 'percentile' or 'search'")
        nll, agreement, kl = _score(hybrid, teacher, test)
        energy = measure_energy(hybrid, test[:2])
        print(json.dumps({
            "setting": setting, "ppl_ratio": round(math.exp(nll - teacher_nll), 4), "agreement_top1": round(agreement, 4),
            "kl_full_to_teacher": round(kl, 4), "ffn_energy_ratio": round(energy.ffn_energy_ratio, 4),
            "spike_rate": round(energy.mean_spike_rate, 4), "seconds": round(time.perf_counter() - started, 1),
        }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])

"""How each stage's cost grows with the model and with the data: randomly initialised Gemma 3 models.

    python -m benchmarks.scale                         # 100m, 270m and 1b, data scales 1 and 2 (about an hour)
    python -m benchmarks.scale --sizes 100m --scales 1,2
    python -m benchmarks.scale --sizes 1b --scales 1 --set distill.batch_size=1   # any param over the benchmark's
    make bench-scale

For each size a random Gemma 3 text model (the 262,144-entry vocabulary, the real 270M and 1B shapes, and a
smaller 100M one; a byte-level tokenizer, so the text's token count differs from Gemma's) is written to a
throw-away folder and every stage runs on it as its own ``snn-research`` process, as DVC runs them: the
default pipeline's params with the training cut to one step of each kind (one layer-wise step per layer,
one distillation step, one fine-tuning step of the hybrid and of the teacher) and no MLflow. Each stage
records its own wall time and peak resident memory (``reports/timings/``, see ``snn_research.costs``),
which are read back here.

Data scale s sets every data-sized knob to s times a base: calibration blocks 8s, clipping-search blocks
2s, layer-wise blocks 4s, validation blocks 2s, test blocks 4s, energy blocks s (256-token blocks). At
s = 1 and s = 2 the stages see twice the tokens; a stage whose memory is bounded by its model shows the
same peak at both. Each row gives seconds, peak resident GiB, the peak over the model's FP32 bytes, and
the ratios against the previous size (same scale) and against scale 1 (same size). Rows go to
reports/bench/scale.csv. Random weights are fine for cost: spike rates of a random model differ from a
trained one's, which changes no tensor's size.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import BENCH_DIR, ROOT
from snn_research.config import ParamsError, apply_overrides

STAGES = ("download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher", "evaluate")
VOCAB = 262144
# Gemma 3 text shapes: 270m and 1b are the released models' (hidden, FFN, layers, heads, kv heads, head dim);
# 100m is a narrower, shallower one with the same vocabulary (whose embedding is most of its parameters)
SIZES = {
    "100m": dict(hidden_size=352, intermediate_size=1408, num_hidden_layers=10, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=128),
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256),
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256),
}


def data_knobs(scale: int) -> dict[str, int]:
    """Every data-sized param at data scale ``scale`` (the module docstring)."""
    return {"calibrate.max_blocks": 8 * scale, "convert.search_blocks": 2 * scale,
            "distill.layerwise.blocks": 4 * scale, "distill.val_blocks": 2 * scale,
            "finetune.val_blocks": 2 * scale, "evaluate.max_blocks": 4 * scale, "evaluate.energy_blocks": scale}


ONE_STEP = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 1, "distill.warmup_steps": 0,
            "distill.eval_every": 1, "distill.checkpoint_every": 1000, "finetune.steps": 1,
            "finetune.warmup_steps": 0, "finetune.eval_every": 1, "finetune.checkpoint_every": 1000,
            "evaluate.timing": False, "evaluate.registry.name": None, "tracking.enabled": False,
            "data.max_blocks_per_split": 64, "device": "cpu"}


def gemma3_config(size: str):
    from transformers import Gemma3TextConfig

    dims = SIZES[size]
    layers = dims["num_hidden_layers"]
    return Gemma3TextConfig(vocab_size=VOCAB, max_position_embeddings=32768, sliding_window=512,
                            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(layers)],
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **dims)


def write_random_teacher(size: str, folder: Path, seed: int = 0) -> int:
    """A random Gemma 3 of ``size`` saved as a model folder (FP32); returns its parameter count."""
    import torch
    from transformers import Gemma3ForCausalLM

    from snn_research.teacher import byte_tokenizer

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(gemma3_config(size))
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    del model
    return count


def as_overrides(values: dict) -> list[str]:
    """``{"distill.steps": 1}`` -> ``["distill.steps=1"]`` for ``config.apply_overrides`` (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def run_stage(folder: Path, stage: str) -> tuple[dict | None, str]:
    """One stage as its own process; (its cost record, '') or (None, why it failed). The stage's cost file
    is removed first, so a record left by an earlier run is never read as this one's."""
    record = folder / "reports" / "timings" / f"{stage}.json"
    record.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "snn_research", stage, "-p", "params.yaml"], cwd=folder, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return None, f"exit {done.returncode}{killed}: {' | '.join(tail)}"
    if not record.is_file():
        return None, "the stage succeeded but wrote no cost record (its output says why)"
    return json.loads(record.read_text()), ""


def stage_params(base: dict, source: Path, scale: int, extra: list[str]) -> dict:
    """The default params with one step of each kind, data scale ``scale``, the random teacher at
    ``source``, then the user's ``--set`` items."""
    knobs = {**ONE_STEP, **data_knobs(scale), "teacher.source": f"path:{source}"}
    return apply_overrides(copy.deepcopy(base), as_overrides(knobs) + extra)


FIELDS = ("size", "params_m", "scale", "stage", "seconds", "peak_gib", "peak_over_fp32", "failure")


def measure(sizes: list[str], scales: list[int], workdir: Path, progress: Path | None = None,
            extra: list[str] | None = None) -> list[dict]:
    """Every stage at every size and scale; each row is also appended to ``progress`` (CSV) as it comes, so
    an interrupted run keeps what it measured."""
    rows = []
    if progress is not None:
        progress.parent.mkdir(parents=True, exist_ok=True)
        with progress.open("w", newline="") as handle:
            csv.DictWriter(handle, fieldnames=FIELDS).writeheader()
    base_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for size in sizes:
        folder = workdir / size
        source = workdir / f"{size}-source"
        count = write_random_teacher(size, source)
        fp32 = 4 * count
        print(f"{size}: {count / 1e6:.0f}M parameters, {fp32 / 2**30:.2f} GiB in FP32", flush=True)
        for scale in scales:
            folder.mkdir(parents=True, exist_ok=True)
            params = stage_params(base_params, source, scale, extra or [])
            (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            for stage in STAGES:
                if scale != scales[0] and stage in ("download-teacher", "split"):
                    continue  # the same teacher and splits: data scale changes what later stages read
                cost, failure = run_stage(folder, stage)
                row = {"size": size, "params_m": round(count / 1e6, 1), "scale": scale, "stage": stage,
                       "seconds": cost["wall_s"] if cost else None,
                       "peak_gib": round(cost["peak_rss_bytes"] / 2**30, 3) if cost else None,
                       "peak_over_fp32": round(cost["peak_rss_bytes"] / fp32, 2) if cost else None,
                       "failure": failure}
                rows.append(row)
                if progress is not None:
                    with progress.open("a", newline="") as handle:
                        csv.DictWriter(handle, fieldnames=FIELDS).writerow(row)
                shown = failure or f"{row['seconds']:8.1f} s  {row['peak_gib']:6.2f} GiB  " \
                                   f"{row['peak_over_fp32']:5.2f}x FP32"
                print(f"  {size:5s} s={scale} {stage:17s} {shown}", flush=True)
                if failure:
                    break
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    return rows


def add_ratios(rows: list[dict], sizes: list[str], scales: list[int]) -> None:
    """Each row's seconds and peak over the next smaller size's (same scale, same stage) and over the first
    scale's (same size); ``sizes`` smallest first, ``scales`` ascending."""
    found = {(r["size"], r["scale"], r["stage"]): r for r in rows}
    for r in rows:
        index = sizes.index(r["size"])
        previous = found.get((sizes[index - 1], r["scale"], r["stage"])) if index else None
        first = found.get((r["size"], scales[0], r["stage"])) if r["scale"] != scales[0] else None
        for key, other in (("vs_smaller", previous), ("vs_scale1", first)):
            ok = other and r["seconds"] and other["seconds"]
            r[f"seconds_{key}"] = round(r["seconds"] / other["seconds"], 2) if ok else None
            r[f"peak_{key}"] = round(r["peak_gib"] / other["peak_gib"], 2) if ok else None


def table(rows: list[dict], first_scale: int = 1) -> str:
    head = ("| size | params (M) | data scale | stage | seconds | peak GiB | peak / FP32 model | seconds vs smaller "
            f"| peak vs smaller | seconds vs scale {first_scale} | peak vs scale {first_scale} |")
    lines = [head, "|" + "---|" * 11]

    def cell(value):
        return "-" if value is None else str(value)

    for r in rows:
        if r["failure"]:
            lines.append(f"| {r['size']} | {r['params_m']} | {r['scale']} | {r['stage']} | failed: {r['failure']} "
                         "| | | | | | |")
            continue
        lines.append("| " + " | ".join(cell(r[k]) for k in (
            "size", "params_m", "scale", "stage", "seconds", "peak_gib", "peak_over_fp32", "seconds_vs_smaller",
            "peak_vs_smaller", "seconds_vs_scale1", "peak_vs_scale1")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    parser.add_argument("--scales", default="1,2", help="comma-separated data scales (integers >= 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the throw-away folders go (default: a "
                        "temporary folder; the 1b size needs about 25 GB of disk)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param over the benchmark's (YAML value), e.g. distill.batch_size=1; repeatable")
    args = parser.parse_args(argv)
    try:
        apply_overrides({}, args.overrides)  # refused here, by name, before an hour of work
    except ParamsError as error:
        parser.error(str(error))
    chosen = {s.strip() for s in args.sizes.split(",") if s.strip()}
    unknown = sorted(chosen - set(SIZES))
    if unknown or not chosen:
        parser.error(f"--sizes: unknown size(s) {unknown or args.sizes!r}; choose from {list(SIZES)}")
    sizes = [size for size in SIZES if size in chosen]  # smallest first: "vs smaller" is the next smaller
    try:
        scales = [int(s) for s in args.scales.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--scales: integers >= 1 separated by commas (got {args.scales!r})")
    if not scales or min(scales) < 1:
        parser.error(f"--scales: integers >= 1 separated by commas (got {args.scales!r})")
    scales = sorted(set(scales))  # the first is the one "vs scale" divides by
    with tempfile.TemporaryDirectory(prefix="snn-scale-", dir=args.workdir) as work:
        rows = measure(sizes, scales, Path(work), progress=BENCH_DIR / "scale.partial.csv", extra=args.overrides)
    add_ratios(rows, sizes, scales)
    print(table(rows, scales[0]))
    with (BENCH_DIR / "scale.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (BENCH_DIR / "scale.partial.csv").unlink(missing_ok=True)
    print(f"rows -> {BENCH_DIR / 'scale.csv'}")
    return 1 if any(r["failure"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Render dvc.yaml of the root pipeline and of every pipeline that mirrors it.

The pipelines under pipelines/ (smoke, smollm2, gemma3-long) run the same seven
commands as the root, from two folders down; only their params.yaml differ.
Run `python pipelines/render_dvc.py` from the repository root after changing a stage.
"""
from pathlib import Path

MIRRORS = {
    "smoke": "The smoke pipeline: the same seven commands on a tiny random teacher and a slice of the corpus.\n"
             "# Run from this folder: `dvc repro` (CI runs it through `make test`).",
    "smollm2": "SmolLM2-135M-Instruct (Llama family) through the same seven stages: `dvc repro` in this folder.",
    "gemma3-long": "Gemma 3 270M with the longer recovery schedule (GPU-sized; hours on a CPU): `dvc repro` here.",
}


def stages(src: str) -> str:
    return f"""stages:
  download-teacher:
    cmd: snn-research download-teacher
    deps:
      - {src}/stages/download_teacher.py
      - {src}/teacher.py
    params:
      - teacher
      - seed
      - paths.teacher
    outs:
      - ${{paths.teacher}}
  split:
    cmd: snn-research split
    deps:
      - {src}/stages/split.py
      - {src}/data.py
      - ${{paths.teacher}}
    params:
      - data
      - seed
      - paths.teacher
      - paths.splits
    outs:
      - ${{paths.splits}}
  calibrate:
    cmd: snn-research calibrate
    deps:
      - {src}/stages/calibrate.py
      - {src}/conversion/calibrator.py
      - ${{paths.teacher}}
      - ${{paths.splits}}
    params:
      - calibrate
      - paths.teacher
      - paths.splits
      - paths.calibration
    outs:
      - ${{paths.calibration}}
  convert:
    cmd: snn-research convert
    deps:
      - {src}/stages/convert.py
      - {src}/conversion/ann_to_snn_converter.py
      - {src}/models/hybrid_transformer.py
      - {src}/hybrid
      - ${{paths.teacher}}
      - ${{paths.calibration}}
    params:
      - convert
      - seed
      - paths.teacher
      - paths.calibration
      - paths.converted
      - paths.conversion_report
    outs:
      - ${{paths.converted}}
      - ${{paths.conversion_report}}/conversion_metadata.json
      - ${{paths.conversion_report}}/thresholds.safetensors
  distill:
    cmd: snn-research distill
    deps:
      - {src}/stages/distill.py
      - {src}/stages/training_common.py
      - {src}/training
      - {src}/hybrid
      - {src}/models/hybrid_transformer.py
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.converted}}
    params:
      - distill
      - seed
      - energy
      - paths.teacher
      - paths.splits
      - paths.converted
      - paths.distilled
      - paths.checkpoints
      - paths.plots
    outs:
      - ${{paths.distilled}}
      - ${{paths.plots}}/distill_train.csv:
          cache: false
      - ${{paths.plots}}/distill_val.csv:
          cache: false
      - ${{paths.plots}}/distill_layerwise.csv:
          cache: false
  finetune:
    cmd: snn-research finetune
    deps:
      - {src}/stages/finetune.py
      - {src}/stages/training_common.py
      - {src}/training
      - {src}/hybrid
      - {src}/models/hybrid_transformer.py
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.distilled}}
    params:
      - finetune
      - seed
      - energy
      - paths.teacher
      - paths.splits
      - paths.distilled
      - paths.finetuned
      - paths.checkpoints
      - paths.plots
    outs:
      - ${{paths.finetuned}}
      - ${{paths.plots}}/finetune_train.csv:
          cache: false
      - ${{paths.plots}}/finetune_val.csv:
          cache: false
  evaluate:
    cmd: snn-research evaluate
    deps:
      - {src}/stages/evaluate.py
      - {src}/evaluation
      - ${{paths.teacher}}
      - ${{paths.splits}}
      - ${{paths.calibration}}
      - ${{paths.converted}}
      - ${{paths.distilled}}
      - ${{paths.finetuned}}
    params:
      - evaluate
      - seed
      - energy.e_mac_pj
      - energy.e_ac_pj
      - paths
    outs:
      - ${{paths.evaluation}}
      - ${{paths.metrics}}:
          cache: false
      - ${{paths.plots}}/layer_spike_rates.csv:
          cache: false
      - ${{paths.plots}}/layer_ffn_error.csv:
          cache: false
      - ${{paths.plots}}/layers.png:
          cache: false

metrics:
  - ${{paths.metrics}}

plots:
  - ${{paths.plots}}/distill_train.csv:
      x: step
      y: train_loss
      title: distill - training loss
  - ${{paths.plots}}/distill_val.csv:
      x: step
      y: [kl_to_teacher, ppl]
      title: distill - validation
  - ${{paths.plots}}/distill_layerwise.csv:
      x: layer
      y: [loss_before, loss_after, stream_error]
      title: distill - layer-wise stage
  - ${{paths.plots}}/finetune_train.csv:
      x: step
      y: train_loss
      title: finetune - training loss
  - ${{paths.plots}}/finetune_val.csv:
      x: step
      y: ppl
      title: finetune - validation perplexity
  - ${{paths.plots}}/layer_ffn_error.csv:
      x: layer
      title: FFN output error per layer
  - ${{paths.plots}}/layer_spike_rates.csv:
      x: layer
      title: spike rate per layer and site
  - ${{paths.plots}}/layers.png
"""


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    header = ("# The seven-stage pipeline on the default teacher (Gemma 3 270M): `dvc repro`.\n"
              "# Paths come from params.yaml (paths.*); each stage's deps list its own code, its params the keys it reads.\n")
    (root / "dvc.yaml").write_text(header + stages("src/snn_research"))
    for name, text in MIRRORS.items():
        folder = root / "pipelines" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dvc.yaml").write_text(f"# {text}\n" + stages("../../src/snn_research"))


if __name__ == "__main__":
    main()

"""What goes wrong in real runs: a killed stage, a diverging loss, repeated runs, unsafe files, a dead tracker."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_support import (
    REPO,
    STAGES,
    assert_clean_failure,
    copy_pipeline,
    invoke,
    prepare,
    run_stages,
    set_dotted,
    tiny_params,
    write_params,
)

from snn_research.artifacts import verify_folder
from snn_research.conversion.ann_to_snn_converter import load_hybrid
from snn_research.teacher import obtain_teacher
from snn_research.training.loop import LoopSettings, TrainingDiverged, train

CHECKPOINT = Path("models/.checkpoints/distill/loop/progress.json")
# long enough to be killed in the middle, checkpointed every other step
LONG_DISTILL = {"distill.steps": 24, "distill.checkpoint_every": 2, "distill.eval_every": 4,
                "distill.layerwise.steps_per_layer": 1}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """download-teacher, split, calibrate and convert have run (random:gemma3); distill is next."""
    params = set_dotted(tiny_params(), LONG_DISTILL)
    return prepare(tmp_path_factory.mktemp("converted"), params, ("download-teacher", "split", "calibrate", "convert"))


def distill_process(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "snn_research", "distill", "-p", "params.yaml"], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_tensors(path: Path, other: Path) -> None:
    import safetensors.torch

    mine, theirs = safetensors.torch.load_file(str(path)), safetensors.torch.load_file(str(other))
    assert sorted(mine) == sorted(theirs)
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert different == [], f"{path} and {other} differ in {different[:4]}"


# --- (a) a killed stage resumes and ends exactly where an uninterrupted run ends ---------------------------------


@pytest.mark.slow
def test_killed_distill_resumes_to_the_uninterrupted_result(converted, tmp_path, monkeypatch):
    killed = copy_pipeline(converted, tmp_path / "killed")
    process = distill_process(killed)
    deadline = time.monotonic() + 300
    while not (killed / CHECKPOINT).is_file():
        assert process.poll() is None, f"distill ended before its first checkpoint:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    assert process.poll() is None, "distill finished before it could be killed; give it more steps"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    distilled = killed / "models" / "distilled"
    if distilled.exists():  # a kill can never leave a half-written output: what is there verifies
        verify_folder(distilled, "distill")
    checkpoint_step = json.loads((killed / CHECKPOINT).read_text())["step"]
    assert 2 <= checkpoint_step < 24

    rerun = distill_process(killed)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    resumed, _ = verify_folder(distilled, "distill")
    assert resumed.summary["resumed_from"] is not None and resumed.summary["resumed_from"] >= checkpoint_step
    assert not [p.name for p in distilled.parent.iterdir() if p.name.startswith(".distilled")], "temporary left"
    assert not (killed / "models" / ".checkpoints" / "distill").exists()

    straight = copy_pipeline(converted, tmp_path / "straight")
    monkeypatch.chdir(straight)
    run_stages("distill")
    uninterrupted, _ = verify_folder(straight / "models" / "distilled", "distill")
    assert uninterrupted.summary["resumed_from"] is None

    # bit-identical: the same validation history, final metrics and weights
    history = json.loads((distilled / "history.json").read_text())
    assert history == json.loads((straight / "models" / "distilled" / "history.json").read_text())
    assert len(history["history"]) == 24 // 4
    assert resumed.summary["final_val"] == uninterrupted.summary["final_val"]
    assert resumed.summary["best_step"] == uninterrupted.summary["best_step"]
    assert_same_tensors(distilled / "model.safetensors", straight / "models" / "distilled" / "model.safetensors")


# --- (b) a diverging loss stops the run with the step, keeps the checkpoint, writes no model ---------------------


def nan_after(calls: int, function):
    """``function``, but returning NaN from call number ``calls`` (0-based) on."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        value = function(*args, **kwargs)
        count["n"] += 1
        return value * float("nan") if count["n"] > calls else value

    return wrapped


def loop_settings(**changes) -> LoopSettings:
    values = {"steps": 6, "batch_size": 2, "lr": 1e-3, "threshold_lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 0,
              "grad_clip": 1.0, "eval_every": 2, "checkpoint_every": 2, "seed": 0, "time_steps": 8}
    return LoopSettings(**{**values, **changes})


def test_nan_loss_raises_with_the_step_and_keeps_the_checkpoint(converted, tmp_path):
    model = load_hybrid(converted / "models" / "converted")
    blocks = torch.randint(3, 200, (6, 16), generator=torch.Generator().manual_seed(0))

    def mean_square(model, batch):
        return model(input_ids=batch, use_cache=False).logits.pow(2).mean()

    loss = nan_after(3, mean_square)

    def loss_fn(model, batch, *step):
        return loss(model, batch), {}

    def validate(model):
        with torch.no_grad():
            return {"objective": float(mean_square(model, blocks[:2]))}

    with pytest.raises(TrainingDiverged, match=r"^step 3: training loss is nan; stopped, last checkpoint kept"):
        train(model, blocks, loss_fn, validate, loop_settings(), tmp_path / "ckpt", "fingerprint")
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["step"] == 2 and progress["fingerprint"] == "fingerprint"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "best.safetensors", "optimizer.pt", "progress.json", "trainable.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # and nothing else written


def test_nan_gradient_raises_with_the_step(converted, tmp_path):
    model = load_hybrid(converted / "models" / "converted")
    blocks = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(model, batch, *step):
        # sqrt at 0: the loss is a finite 0, its gradient is not
        return torch.sqrt(0.0 * model(input_ids=batch, use_cache=False).logits.sum()), {}

    with pytest.raises(TrainingDiverged, match=r"^step 0: gradient norm is (nan|inf)"):
        train(model, blocks, loss_fn, lambda m: {"objective": 0.0}, loop_settings(), tmp_path / "ckpt", "fp")
    assert not (tmp_path / "ckpt").exists()


def test_diverging_distill_exits_1_and_keeps_its_checkpoint(converted, tmp_path, monkeypatch):
    import snn_research.stages.distill as distill_stage

    work = copy_pipeline(converted, tmp_path / "work")
    monkeypatch.chdir(work)
    write_params(set_dotted(tiny_params(), {**LONG_DISTILL, "distill.steps": 8}))
    monkeypatch.setattr(distill_stage, "distillation_kl", nan_after(5, distill_stage.distillation_kl))

    result = invoke("distill")

    assert_clean_failure(result, 1)
    assert "error in distill: step 5: training loss is nan; stopped, last checkpoint kept" in result.output
    assert json.loads((work / CHECKPOINT).read_text())["step"] == 4
    assert not (work / "models" / "distilled").exists()
    assert not [p for p in (work / "models").iterdir() if p.name.startswith(".distilled")]


# --- (c) the same params give byte-identical metrics --------------------------------------------------------------

QUICK = {"distill.layerwise.steps_per_layer": 1, "distill.steps": 2, "distill.eval_every": 1, "finetune.steps": 2,
         "finetune.eval_every": 1, "evaluate.max_blocks": 2, "evaluate.batch_size": 2, "evaluate.timing": False}


@pytest.mark.parametrize("encoder", ["if", "rate"])
def test_pipeline_metrics_are_byte_identical_across_runs(encoder, tmp_path):
    params = set_dotted(tiny_params(), {**QUICK, "convert.encoder": encoder})
    first = prepare(tmp_path / "first", params, STAGES)
    second = prepare(tmp_path / "second", params, STAGES)
    metrics = (first / "reports" / "metrics.json").read_bytes()
    assert metrics == (second / "reports" / "metrics.json").read_bytes()
    assert json.loads(metrics)["converted"]["spike_rate"] > 0
    for folder in ("models/teacher", "data/splits", "reports/calibration"):
        assert verify_folder(first / folder)[0].files == verify_folder(second / folder)[0].files, folder
    for folder in ("models/converted", "models/distilled", "models/finetuned"):
        for name in ("model.safetensors", "hybrid.json", "thresholds.safetensors", "manifest.json"):
            assert (first / folder / name).read_bytes() == (second / folder / name).read_bytes(), f"{folder}/{name}"
    assert json.loads((first / "models/converted/hybrid.json").read_text())["plan"]["encoder"] == encoder


@pytest.mark.slow
def test_smoke_pipeline_metrics_are_byte_identical_across_two_runs(tmp_path):
    """pipelines/smoke/params.yaml as it is (tracking off: it changes no output), run twice from scratch."""
    import yaml

    params = yaml.safe_load((REPO / "pipelines" / "smoke" / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    runs = [prepare(tmp_path / name, params, STAGES) for name in ("first", "second")]
    metrics = [(folder / "reports" / "metrics.json").read_bytes() for folder in runs]
    assert metrics[0] == metrics[1]
    assert json.loads(metrics[0])["finetuned"]["spike_rate"] > 0


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_saving_the_same_hybrid_twice_gives_the_same_bytes(family, tmp_path):
    """safetensors orders its header metadata by a hash map seeded anew for every map: saves must not vary."""
    from conftest import tiny_model

    from snn_research.conversion.ann_to_snn_converter import load_weights, save_weights
    from snn_research.models.hybrid_transformer import HybridPlan, hybridize

    model = tiny_model(family)
    hybridize(model, HybridPlan(time_steps=4))
    paths = [tmp_path / f"save{i}.safetensors" for i in range(12)]  # a broken order survives 12 saves 1 in 2048
    for path in paths:
        save_weights(model, path)
    assert len({path.read_bytes() for path in paths}) == 1
    import safetensors

    with safetensors.safe_open(str(paths[0]), framework="pt") as handle:
        tied = json.loads(handle.metadata()["tied"])
    assert tied == ({"model.embed_tokens.weight": "lm_head.weight"} if family == "gemma3" else {})
    again = tiny_model(family, seed=1)
    hybridize(again, HybridPlan(time_steps=4))
    load_weights(again, paths[0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


# --- (d) nothing unsafe is ever loaded ---------------------------------------------------------------------------


def source_calls():
    for path in sorted((REPO / "src" / "snn_research").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(REPO), node


def test_torch_load_always_uses_weights_only():
    loads = []
    for path, call in source_calls():
        if ast.unparse(call.func) == "torch.load":
            keywords = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in keywords, f"{path}:{call.lineno}: torch.load without weights_only=True"
            value = keywords["weights_only"]
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"
            loads.append(path)
    assert loads, "expected the training loop's optimizer checkpoint to use torch.load"


def test_remote_code_is_never_trusted():
    for path, call in source_calls():
        for keyword in call.keywords:
            if keyword.arg == "trust_remote_code":
                assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, \
                    f"{path}:{call.lineno}: trust_remote_code={ast.unparse(keyword.value)}"
    for path in (REPO / "src").rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


@pytest.fixture
def no_weight_reads(monkeypatch):
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the path was checked")

    for owner, name in ((AutoModelForCausalLM, "from_pretrained"), (AutoTokenizer, "from_pretrained"),
                        (safetensors.torch, "load_file"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


def test_path_source_that_is_a_file_is_refused(tmp_path, no_weight_reads):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really")
    with pytest.raises(ValueError, match=r"model\.safetensors: teacher path is not a folder"):
        obtain_teacher(f"path:{weights}")


def test_path_source_that_is_not_a_model_folder_is_refused(tmp_path, no_weight_reads):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"no config\.json \(and not exactly one \.gguf file\)"):
        obtain_teacher(f"path:{tmp_path}")
    with pytest.raises(ValueError, match=r"teacher path is not a folder"):
        obtain_teacher(f"path:{tmp_path / 'missing'}")


# --- (e) a dead tracking server costs no result ----------------------------------------------------------------


@pytest.fixture
def dead_tracker(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    return "http://127.0.0.1:9"  # the discard port: nothing listens


@pytest.mark.parametrize(("strict", "exit_code"), [(False, 0), (True, 3)])
def test_unreachable_tracking_server_still_writes_outputs(workdir, dead_tracker, strict, exit_code):
    params = set_dotted(tiny_params(), {"tracking.enabled": True, "tracking.uri": dead_tracker,
                                        "tracking.strict": strict})
    write_params(params)

    started = time.monotonic()
    result = invoke("download-teacher")

    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert "MLflow tracking failed" in result.output
    assert "the stage's outputs are still written" in result.output
    manifest, _ = verify_folder(workdir / "models" / "teacher", "download-teacher")
    assert manifest.summary["source"] == "random:gemma3"
    assert ("tracking failed and tracking.strict is set" in result.output) is strict
    assert time.monotonic() - started < 60
    assert "seconds" not in manifest.summary  # a DVC output never records time: MLflow gets it

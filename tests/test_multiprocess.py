"""Two processes on the CPU (gloo), launched as a user would with `accelerate launch`: distill (layer-wise and
end-to-end) and finetune split each batch over the ranks, only rank 0 writes outputs and MLflow records, and
the result matches a one-process run.

The per-layer FFN MSE (``distill.ffn_mse_weight``) is off here: it is a ratio of batch means, and each rank
takes it over its own half, which is not the whole batch's ratio (0.7 % apart on this model's first step).
The energy budget is off too: its hinge is taken per half. The KL and the cross-entropy are means over equal
halves, so the mean over the ranks is the one-process loss; the layer-wise stream loss is a ratio of means
whose token weights make it nearly one (its figures agree to 1e-5 below).

Tolerance: the ranks average per-shard means where one process takes one mean over the batch, so the sums
are ordered differently (float32 rounding, about 1e-7 relative per operation). Measured on this model, the
trained weights of the two runs differ by at most 2.4e-7 (one or two float32 ulps of a weight near 1-2),
and by 1e-6 of how far training moved them (as norms over all weights). The weights are held to
``WEIGHT_ROUNDING`` (about 12x that worst case) and to ``MOVEMENT_ROUNDING`` of the movement. A real
divergence is far outside both: a rank whose gradients are not averaged (or both ranks on the same half)
leaves weights 0.07 apart, 0.99 of the movement; gradients averaged then halved again (a loss scaled twice
by the world size, which Adam nearly absorbs) leaves them 2e-4 (distill) and 1e-3 (finetune) apart, 5e-4
and 3e-3 of the movement. (The validation metrics are compared at 1e-3 relative.) Adam can, in principle,
turn a rounding-level difference of a near-zero gradient into a different step of up to its lr; on this
model no weight does.

Because Adam nearly absorbs a gradient's scale, the averaging itself is pinned exactly, apart from training:
two gloo processes (``torch.multiprocessing``) run ``Shard.average_gradients`` on known per-rank gradients,
in float32 and bfloat16, with a gradient that one rank lacks and one that no rank has, under the default
bucket size (one all-reduce) and a 64-byte one (several), and each rank's result must equal the mean of
the two ranks' gradients computed here, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing
from pipeline_support import copy_pipeline, inside, prepare, run_stages, set_dotted, tiny_params, write_params

from snn_research.artifacts import verify_folder
from snn_research.costs import read_costs
from snn_research.devices import BUCKET_BYTES
from snn_research.stages.training_common import VAL_KL

SETTINGS = {"convert.time_steps": 2, "energy.ffn_budget": None, "distill.curriculum.start_time_steps": None,
            "distill.lr": 1e-4, "distill.batch_size": 2, "distill.steps": 4, "distill.layerwise.blocks": 4,
            "distill.layerwise.steps_per_layer": 3, "finetune.batch_size": 2, "finetune.steps": 4,
            "finetune.lr": 1e-4, "distill.ffn_mse_weight": 0.0}
WEIGHT_ROUNDING = 3e-6  # largest |one-process - two-process| of a trained weight (module docstring)
MOVEMENT_ROUNDING = 1e-5  # the same, as norms over all weights, relative to the training's movement


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(folder: Path, stage: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "snn_research", stage, "-p", "params.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # mlflow.set_tracking_uri in an earlier test of this process exports MLFLOW_TRACKING_URI, which would
    # override the params' store
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same converted pipeline trained by one process (in-process CLI) and by two (accelerate launch)."""
    params = set_dotted(tiny_params(), SETTINGS)
    converted = prepare(tmp_path_factory.mktemp("converted"), params, ("download-teacher", "split", "calibrate",
                                                                       "convert"))
    one = copy_pipeline(converted, tmp_path_factory.mktemp("one"))
    with inside(one):
        run_stages("distill", "finetune")
    two = copy_pipeline(converted, tmp_path_factory.mktemp("two"))
    tracked = set_dotted(params, {"tracking.enabled": True, "tracking.uri": f"sqlite:///{two / 'mlflow.db'}",
                                  "tracking.strict": True})
    write_params(tracked, two / "params.yaml")
    outputs = {}
    for stage in ("distill", "finetune"):
        done = launch_two(two, stage)
        assert done.returncode == 0, f"{stage} under two processes failed:\n{done.stdout}\n{done.stderr}"
        outputs[stage] = done.stdout + done.stderr
    return one, two, outputs


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def norm(tensors: dict[str, torch.Tensor]) -> float:
    """The Euclidean norm of all the tensors together."""
    return sum(float(t.double().square().sum()) for t in tensors.values()) ** 0.5


@pytest.mark.parametrize("stage,folder", [("distill", "distilled"), ("finetune", "finetuned")])
def test_two_processes_train_what_one_does(runs, stage, folder):
    one, two, _ = runs
    converted = tensors(one / "models" / "converted")
    mine, theirs = tensors(one / "models" / folder), tensors(two / "models" / folder)
    assert sorted(mine) == sorted(theirs)
    moved = [name for name in mine if not torch.equal(mine[name], converted[name])]
    assert moved, "training changed nothing: the comparison would be empty"
    worst = max(float((mine[name] - theirs[name]).abs().max()) for name in mine)
    assert worst <= WEIGHT_ROUNDING, f"{stage}: weights differ by up to {worst:.3g}, more than float32 rounding"
    apart = norm({name: mine[name] - theirs[name] for name in mine})
    travelled = norm({name: mine[name] - converted[name] for name in moved})
    assert travelled > 1e3 * WEIGHT_ROUNDING  # training moved the weights far more than the tolerance
    assert apart <= MOVEMENT_ROUNDING * travelled, (
        f"{stage}: the runs are {apart / travelled:.3g} of the training's movement apart")
    a = verify_folder(one / "models" / folder, stage)[0].summary["final_val"]
    b = verify_folder(two / "models" / folder, stage)[0].summary["final_val"]
    key = VAL_KL if stage == "distill" else "ppl"
    assert b[key] == pytest.approx(a[key], rel=1e-3)


def test_each_rank_trains_on_its_half_of_every_batch(runs):
    one, two, _ = runs
    a = json.loads((one / "models" / "distilled" / "history.json").read_text())
    b = json.loads((two / "models" / "distilled" / "history.json").read_text())
    # layer-wise: the same blocks, losses and stream errors, up to rounding
    for row_a, row_b in zip(a["layerwise"], b["layerwise"], strict=True):
        for key in ("loss_before", "loss_after", "stream_error"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-5), (row_a["layer"], key)
    # the first end-to-end step starts from the same state: the mean of the two halves' losses is the
    # one-process loss of the whole batch
    assert b["train_losses"][0][1] == pytest.approx(a["train_losses"][0][1], rel=1e-4)  # a small KL: a difference
    # of two near-equal sums, so its relative rounding error is larger than theirs


def test_only_rank_zero_writes_and_tracks(runs):
    import mlflow

    _, two, outputs = runs
    assert outputs["distill"].count("distill: done in") == 1, outputs["distill"]
    assert not [p for p in (two / "models" / ".checkpoints").rglob("*") if p.is_file()], "checkpoints left behind"
    mlflow.set_tracking_uri(f"sqlite:///{two / 'mlflow.db'}")
    runs_by_stage = mlflow.search_runs(search_all_experiments=True, filter_string="tags.role = 'stage'",
                                       output_format="list")
    assert sorted(run.data.tags["stage"] for run in runs_by_stage) == ["distill", "finetune"]
    # one cost per stage (rank 0's), the launch's process count in it; the stages before ran in one process
    processes = {cost.name: cost.processes for cost in read_costs(two / "reports" / "timings")}
    assert processes == {"download-teacher": 1, "split": 1, "calibrate": 1, "convert": 1, "distill": 2, "finetune": 2}


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(runs, tmp_path):
    _, two, _ = runs
    work = copy_pipeline(two, tmp_path / "odd")
    shutil.rmtree(work / "models" / "distilled")
    params = set_dotted(tiny_params(), {**SETTINGS, "distill.batch_size": 3})
    write_params(params, work / "params.yaml")
    done = launch_two(work, "distill")
    assert done.returncode != 0
    assert "distill.batch_size: 3 does not split evenly over 2 processes" in done.stdout + done.stderr
    assert not (work / "models" / "distilled").exists()


def test_a_one_process_stage_refuses_a_multi_process_launch(runs, tmp_path):
    _, two, _ = runs
    work = copy_pipeline(two, tmp_path / "eval")
    done = launch_two(work, "calibrate")
    assert done.returncode != 0
    assert "calibrate runs in one process, but this launch has 2" in done.stdout + done.stderr


# (shape, dtype) of each trained tensor in the averaging test; which ranks lack a gradient are in ABSENT
GRADIENTS = [((3, 4), torch.float32), ((5,), torch.bfloat16), ((2, 2), torch.float32), ((7,), torch.float32),
             ((40,), torch.float32), ((6,), torch.bfloat16)]
ABSENT = {2: {1}, 3: {0, 1}}  # tensor 2: rank 1 has no gradient; tensor 3: no rank has one


def rank_gradients(rank: int) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients in the averaging test (None where it has none)."""
    generator = torch.Generator().manual_seed(rank)
    gradients = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in GRADIENTS]
    return [None if rank in ABSENT.get(index, ()) else g for index, g in enumerate(gradients)]


def average_on_rank(rank: int, port: int, folder: str) -> None:
    """One rank of two: average its gradients (and a loss and its parts) under two bucket sizes."""
    from snn_research import devices

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for bucket_bytes in (devices.BUCKET_BYTES, 64):
            devices.BUCKET_BYTES = bucket_bytes
            params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in GRADIENTS]
            for param, gradient in zip(params, rank_gradients(rank)):
                param.grad = gradient
            figures = devices.Shard(rank, 2).average_gradients(params, torch.tensor([rank + 1.0, 10.0 * rank]))
            results[bucket_bytes] = {"gradients": [p.grad for p in params], "figures": figures}
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_bucketed_averaging_gives_each_rank_the_mean_of_the_ranks_gradients(tmp_path):
    torch.multiprocessing.spawn(average_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [rank_gradients(0), rank_gradients(1)]
    expected = []
    for index, (shape, dtype) in enumerate(GRADIENTS):
        if index in ABSENT and ABSENT[index] == {0, 1}:
            expected.append(None)  # as in one process: the optimizer skips it
            continue
        zeros = torch.zeros(shape, dtype=dtype)
        first, second = (zeros if g[index] is None else g[index] for g in ranks)
        expected.append((first + second) / 2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sorted(results) == sorted({BUCKET_BYTES, 64})
        for bucket_bytes, result in results.items():
            assert torch.equal(result["figures"], torch.tensor([1.5, 5.0])), (rank, bucket_bytes)
            for index, (got, want) in enumerate(zip(result["gradients"], expected, strict=True)):
                if want is None:
                    assert got is None, (rank, bucket_bytes, index)
                    continue
                assert got.dtype == want.dtype and torch.equal(got, want), (rank, bucket_bytes, index)

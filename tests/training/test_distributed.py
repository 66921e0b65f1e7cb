"""The train stage as a process: killed with SIGKILL mid-training it resumes to the same result, and under
torchrun with two CPU processes (gloo) it completes with one set of outputs. Subprocesses, so marked slow."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    PROJECT_ROOT,
    copy_project,
    free_port,
    run_tool,
    start_tool,
    tiny_dvc_project,
    train_params,
)

from pipeline.stages import train
from pipeline.training import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
TIMING_KEYS = {"train_seconds", "images_per_s"}


def _write(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


def _summaries(output: str) -> list[dict]:
    return [
        json.loads(line[line.index("{") :]) for line in output.splitlines() if line.startswith("train: done")
    ]


def _train_cli(params_file: Path, *launcher: str) -> subprocess.Popen:
    command = [sys.executable, *launcher, "-m", "pipeline", "train", "--params", str(params_file)]
    return subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# `python -m pipeline train` that stops for good right after its `after`-th checkpoint and says so with a
# marker file, so the test kills it at a known point however fast or loaded the machine is.
_STOP_AFTER_CHECKPOINT = """
import time
from pipeline.__main__ import app
from pipeline.training import checkpoint
save, saves = checkpoint.save, []
def save_then_stop(path, state):
    save(path, state)
    saves.append(path)
    if len(saves) == {after}:
        open({marker!r}, "w").close()
        time.sleep(3600)
checkpoint.save = save_then_stop
app(["train", "--params", {params!r}])
"""


def _stopped_after_checkpoint(params_file: Path, after: int, tmp_path: Path) -> subprocess.Popen:
    """The train command, stopped (not ended) right after writing its `after`-th checkpoint."""
    marker, log = tmp_path / f"checkpoint-{after}-written", tmp_path / "stopped.log"
    code = _STOP_AFTER_CHECKPOINT.format(after=after, marker=str(marker), params=str(params_file))
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"train did not reach checkpoint {after}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process


def _metrics(params) -> dict:
    return {
        k: v for k, v in json.loads(params.paths.metrics("train").read_text()).items() if k not in TIMING_KEYS
    }


def test_sigkill_mid_training_then_rerun_resumes_and_ends_exactly_like_an_uninterrupted_run(tmp_path):
    run = {"train": {"strategy": "progressive", "epochs": 8, "progressive_head_epochs": 2, "ema_decay": 0.5,
                     "checkpoint_every_s": 0,  # a checkpoint after every epoch
                     "augment": {"auto_augment": "trivial", "mixup_alpha": 0.2}}}  # fmt: skip
    killed = train_params(tmp_path, paths={"metrics_dir": str(tmp_path / "killed")}, **run)
    ckpt = killed.paths.checkpoint_dir / checkpoint.CHECKPOINT_NAME
    # Killed after epoch 3: past the two head-only epochs, in the first fine-tuning epoch's phase.
    process = _stopped_after_checkpoint(_write(killed, tmp_path / "params.yaml"), 3, tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert torch.load(ckpt, weights_only=True)["fit"]["epoch"] == 3
    assert not killed.paths.metrics("train").exists(), "not killed mid-training"

    rerun = _train_cli(tmp_path / "params.yaml")
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    (summary,) = _summaries(output)
    assert summary["resumed_from_epoch"] == 3

    ref = tmp_path / "ref"
    paths = {
        "metrics_dir": ref,
        "checkpoint_dir": ref / "ck",
        "model": ref / "model.pt",
        "live_dir": ref / "live",
    }
    reference = train_params(tmp_path, paths={k: str(v) for k, v in paths.items()}, **run)
    train.run(reference)
    assert _metrics(killed) == _metrics(reference)
    resumed_model = torch.load(killed.paths.model, weights_only=True)["state_dict"]
    reference_model = torch.load(reference.paths.model, weights_only=True)["state_dict"]
    assert all(torch.equal(resumed_model[k], reference_model[k]) for k in reference_model)
    curves = [
        (p.paths.live_dir / "plots/metrics/val/acc.tsv").read_text().splitlines() for p in (killed, reference)
    ]
    assert [line.split("\t")[1:] for line in curves[0]] == [line.split("\t")[1:] for line in curves[1]]


def test_two_process_ddp_on_cpu_completes_and_writes_one_set_of_outputs(tmp_path):
    params = train_params(
        tmp_path, train={"strategy": "progressive", "epochs": 2, "progressive_head_epochs": 1}
    )
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    process = _train_cli(_write(params, tmp_path / "params.yaml"), *launcher)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output

    summaries = _summaries(output)
    assert len(summaries) == 2 and all(s["world_size"] == 2 for s in summaries)
    assert output.count("epoch 2/2 ") == 1, output  # only rank 0 reports and writes
    out = params.paths.model.parent
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "dvclive", "metrics", "model.pt"]
    assert [p.name for p in params.paths.checkpoint_dir.iterdir()] == [checkpoint.CHECKPOINT_NAME]
    history = torch.load(params.paths.checkpoint_dir / checkpoint.CHECKPOINT_NAME, weights_only=True)["fit"][
        "history"
    ]
    assert [record["images"] for record in history] == [
        18,
        18,
    ]  # both ranks' shards summed: all 18 train images
    assert json.loads(params.paths.metrics("train").read_text())["epochs_run"] == 2


def _torchrun(script: str, tmp_path: Path, *args: str) -> str:
    """`script` as 2 CPU processes under torchrun (this checkout's `pipeline` imported); their output."""
    path = tmp_path / "script.py"
    path.write_text(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    run = {"env": env, "capture_output": True, "text": True, "timeout": 240, "cwd": tmp_path}
    done = subprocess.run([*command, *args], **run)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# Rank 0 never reaches the barrier (it waits until rank 1 has given up, at most 150 s): rank 1 must give up
# after the timeout it was set up with, not torch's default 30 minutes.
_LATE_RANK = """
import os, sys, time
from pipeline.training import distributed
env, _ = distributed.setup("cpu", timeout_min=float(sys.argv[1]))
gave_up = "gave-up"
if env.rank == 0:
    deadline = time.monotonic() + 150
    while not os.path.exists(gave_up) and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)
start = time.monotonic()
try:
    distributed.barrier(env)
    print("rank 1: barrier passed", flush=True)
except Exception as exc:
    print(f"rank 1: gave up after {time.monotonic() - start:.1f} s: {type(exc).__name__}", flush=True)
open(gave_up, "w").close()
os._exit(0)
"""


def test_the_process_group_timeout_is_the_one_asked_for(tmp_path):
    output = _torchrun(_LATE_RANK, tmp_path, "0.05")  # 3 s
    waited = re.findall(r"rank 1: gave up after ([\d.]+) s", output)
    assert waited and 2.5 <= float(waited[0]) < 60, output


# Rank 0 sees a checkpoint; rank 1, as on another machine without shared storage, sees an empty folder.
_CHECKPOINT_ON_RANK_0_ONLY = """
import sys
from pathlib import Path
from pipeline.training import checkpoint, distributed
env, _ = distributed.setup("cpu")
folder = Path(sys.argv[1] if env.rank == 0 else sys.argv[2])
state = checkpoint.load_for_every_rank(folder / checkpoint.CHECKPOINT_NAME, "run-1", env)
print(f"rank {env.rank}: epoch {None if state is None else int(state['fit']['epoch'])}", flush=True)
distributed.teardown(env)
"""


def test_every_rank_resumes_from_the_checkpoint_only_rank_0_can_read(tmp_path):
    (tmp_path / "node0").mkdir(), (tmp_path / "node1").mkdir()
    state = {"fingerprint": "run-1", "fit": {"epoch": torch.tensor(4)}}
    checkpoint.save(tmp_path / "node0" / checkpoint.CHECKPOINT_NAME, state)
    output = _torchrun(_CHECKPOINT_ON_RANK_0_ONLY, tmp_path, *(str(tmp_path / f"node{i}") for i in (0, 1)))
    assert "rank 0: epoch 4" in output and "rank 1: epoch 4" in output, output


def _tiny_project(root: Path) -> Path:
    """This project's dvc.yaml, code and params (made tiny: 3 classes x 16 images, timm's test_efficientnet,
    2 epochs of which 1 head-only) in a git+DVC repo, nothing run yet."""
    return tiny_dvc_project(root, train={"epochs": 2, "progressive_head_epochs": 1})


def _train_outputs(project: Path) -> dict:
    """What the train stage leaves, in form: its files, the metric keys, epochs logged, images trained on per
    epoch (summed over the processes: every train image, padded to a multiple of the process count as
    DistributedSampler does), the model's classes and tensor shapes."""
    files = {
        folder: sorted(path.relative_to(project).as_posix() for path in (project / folder).rglob("*"))
        for folder in ("models", "dvclive")
    }
    curve = (project / "dvclive/plots/metrics/val/acc.tsv").read_text().splitlines()
    saved = torch.load(project / "models/checkpoints" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    trained = torch.load(project / "models/model.pt", weights_only=True)
    shapes = {name: tuple(tensor.shape) for name, tensor in trained["state_dict"].items()}
    return {
        **files,
        "metric keys": sorted(json.loads((project / "metrics/train.json").read_text())),
        "epochs logged": len(curve) - 1,
        "images per epoch": [record["images"] for record in saved["fit"]["history"]],
        "model": (trained["class_names"], shapes),
    }


def test_nproc_per_node_makes_dvc_repro_train_with_two_processes_and_the_same_outputs(tmp_path):
    project = _tiny_project(tmp_path / "project")
    run_tool(project, "dvc", "repro", "train")
    one_process = _train_outputs(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["nproc_per_node"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    output = run_tool(project, "dvc", "repro", "train")
    assert re.findall(r"Running stage '([\w-]+)'", output) == ["train"], output
    assert "train: starting 2 processes" in output, output
    assert [s["world_size"] for s in _summaries(output) if "world_size" in s] == [2, 2], output
    two_processes = _train_outputs(project)
    train_images = int(one_process.pop("images per epoch")[0])
    assert two_processes.pop("images per epoch") == [2 * math.ceil(train_images / 2)] * 2
    assert two_processes == one_process
    assert not list(project.glob(".train-params-*")), "the launched processes' params file is left"
    assert json.loads(run_tool(project, "dvc", "status", "train", "--json")) == {}  # train and upstream


def test_a_failure_in_the_launched_processes_is_one_line_without_a_traceback(tmp_path):
    params = train_params(tmp_path, train={"nproc_per_node": 2}).to_dict()
    params["paths"]["splits"] = "missing.csv"  # relative to the working folder
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "pipeline", "train", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    expected = r"train: the 2 training processes under torch.distributed.run stopped: rank [01] failed first "
    assert re.fullmatch(expected + r"\(exit code 1\); the messages above say why", lines[-1]), done.stderr
    each = "train: missing.csv: splits table not found; run the split stage first (dvc repro split)"
    assert lines.count(each) == 2, done.stderr  # one from each process
    assert "Traceback" not in done.stdout + done.stderr
    assert not list(tmp_path.glob(".train-params-*"))


def test_two_nodes_each_with_its_own_disk_train_as_one_run_equal_to_a_single_process(tmp_path):
    # Two machines on 127.0.0.1, one process each, meeting by torchrun's c10d rendezvous (gloo); each has its
    # own copy of the project (its own disk). Node 0 runs `dvc repro train`, node 1 only the stage command.
    # No dropout, and val loss picks the saved epoch (the fine-tuned last one: random weights learn little).
    project = tiny_dvc_project(
        tmp_path / "node0",
        model={"drop_rate": 0.0},
        split={"method": "stratified", "train": 0.75, "val": 0.125, "test": 0.125},  # 36 train: even
        train={
            "epochs": 2,
            "progressive_head_epochs": 1,
            "batch_size": 4,
            "early_stopping_metric": "val_loss",
        },
    )
    run_tool(project, "dvc", "repro", "split")
    other = copy_project(project, tmp_path / "node1")  # what `dvc pull` would give the second machine
    single = copy_project(project, tmp_path / "single")
    params = yaml.safe_load((single / "params.yaml").read_text())
    params["train"]["batch_size"] = 8  # the same effective batch as 2 processes of 4
    (single / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rendezvous = {
        "PET_NNODES": "2",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "PET_RDZV_ID": "two-nodes",
    }
    dvc = [sys.executable, "-m", "dvc", "repro", "train"]
    stage = [sys.executable, "-m", "pipeline", "train"]
    nodes = [
        start_tool(project, dvc, tmp_path / "node0.log", **rendezvous, PET_NODE_RANK="0"),
        start_tool(other, stage, tmp_path / "node1.log", **rendezvous, PET_NODE_RANK="1"),
    ]
    run_tool(single, "dvc", "repro", "train")
    for node, log in zip(nodes, ("node0.log", "node1.log"), strict=True):
        assert node.wait(timeout=300) == 0, (tmp_path / log).read_text()[-3000:]

    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert all([s["world_size"] for s in _summaries(log) if "world_size" in s] == [2] for log in logs), logs
    models = [
        torch.load(p / "models/model.pt", weights_only=True)["state_dict"] for p in (project, other, single)
    ]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # DDP: the same bits everywhere
    assert max((models[0][k].float() - models[2][k].float()).abs().max().item() for k in models[0]) < 1e-4
    for folder in (project, other):  # each machine built its own caches and features
        assert any((folder / "data/cache").glob("features-*")), folder
    figures = [json.loads((p / "metrics/train.json").read_text()) for p in (project, single)]
    assert figures[0]["best_epoch"] == figures[1]["best_epoch"] == 2  # saved after the fine-tuning epoch
    assert figures[0]["final_train_loss"] == pytest.approx(figures[1]["final_train_loss"], abs=1e-5)
    assert json.loads(run_tool(project, "dvc", "status", "train", "--json")) == {}  # DVC saw the run

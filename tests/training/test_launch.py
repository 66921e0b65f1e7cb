"""training/distributed and checkpoint, the decisions (no process group): ranks from torchrun's environment,
the process group's options (timeout included), how many processes the train stage starts and how, and what
a checkpoint key or a cache key depends on. The same code in real processes: test_distributed.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_params

from pipeline.config import Params
from pipeline.data.loader import CachedImages
from pipeline.errors import ParamsError, PipelineError
from pipeline.training import checkpoint, distributed
from pipeline.training.distributed import Dist
from pipeline.training.features import features_key

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}


def test_ranks_come_from_torchruns_environment():
    assert Dist.from_env({}) == Dist(0, 1, 0) and not Dist.from_env({}).enabled
    env = Dist.from_env(TORCHRUN)
    assert env == Dist(rank=5, world_size=8, local_rank=1)
    assert env.enabled and not env.is_main and not env.is_local_main
    assert Dist(rank=4, world_size=8, local_rank=0).is_local_main  # node 1's cache builder


def test_the_process_group_gets_the_timeout_from_params():
    env = Dist(rank=1, world_size=2, local_rank=1)
    options = distributed.process_group_options(env, torch.device("cpu"), timeout_min=90)
    assert options == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": timedelta(minutes=90)}
    assert distributed.process_group_options(env, torch.device("cuda", 1), 0.5)["backend"] == "nccl"


@pytest.mark.parametrize(
    ("spec", "gpus", "device", "expected"),
    [
        (1, 4, "auto", 1),
        (2, 0, "auto", 2),  # CPU processes (gloo)
        ("auto", 0, "auto", 1),
        ("auto", 4, "auto", 4),  # one per GPU
        ("auto", 4, "cuda", 4),
        ("auto", 4, "cpu", 1),  # a CPU run on a GPU machine: one process, not four
        ("auto", 4, "cuda:2", 1),  # the one GPU asked for
    ],
)
def test_processes_per_machine(spec, gpus, device, expected):
    assert distributed.resolve_nproc(spec, gpus, device) == expected


@pytest.mark.parametrize("value", [0, -2, True, "two", 1.5])
def test_a_process_count_that_is_not_auto_or_a_positive_integer_is_refused_naming_the_key(value):
    with pytest.raises(ParamsError, match="train.nproc_per_node"):
        Params.from_dict({"train": {"nproc_per_node": value}})


def test_only_a_process_that_torchrun_did_not_start_launches_it():
    assert distributed.under_launcher(TORCHRUN) and not distributed.under_launcher({"PATH": "/bin"})


@pytest.mark.parametrize(
    ("nodes", "several"), [(None, False), ("1", False), ("1:1", False), ("2", True), ("1:4", True)]
)
def test_torchruns_node_count_says_when_one_process_per_machine_still_needs_the_launcher(nodes, several):
    # one process on each of two machines: the stage must start torchrun to meet the other machine
    assert distributed.several_nodes({} if nodes is None else {"PET_NNODES": nodes}) is several


def test_one_machine_launches_standalone_several_read_the_rendezvous_from_the_environment():
    one = distributed.launcher_args(2, Path("p.yaml"), {})
    assert one == ["--standalone", "--nproc_per_node=2", "-m", "pipeline", "train", "--params", "p.yaml"]
    several = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "node0", "PET_MASTER_PORT": "29"}
    command = distributed.launcher_args(4, Path("p.yaml"), several)
    assert "--standalone" not in command and "--nproc_per_node=4" in command
    assert distributed.launcher_args(2, Path("p"), {"PET_NNODES": "1"})[0] == "--standalone"
    assert distributed.launcher_args(1, Path("p"), {"PET_NNODES": "1:2"})[0] == "--nproc_per_node=1"
    with pytest.raises(PipelineError, match="train.nproc_per_node"):
        distributed.launcher_args(0, Path("p.yaml"), {})


def test_launch_and_timeout_params_do_not_orphan_a_checkpoint_but_the_device_does(tmp_path):
    """A run resumed with more patience or `auto` for the same process count is the same run."""
    base = train_params(tmp_path)
    splits = base.paths.splits

    def fingerprint(params: Params, world_size: int) -> str:
        return checkpoint.fingerprint(params.base, params.model, params.train, splits, world_size)

    same = fingerprint(base, world_size=2)
    for change in ({"dist_timeout_min": 600}, {"nproc_per_node": "auto"}, {"nproc_per_node": 2}):
        assert fingerprint(train_params(tmp_path, train=change), 2) == same, change
    assert fingerprint(base, world_size=1) != same
    assert fingerprint(train_params(tmp_path, train={"device": "cuda"}), 2) != same


def test_a_single_process_reads_its_own_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"fingerprint": "f", "epoch": torch.tensor(3)})
    assert checkpoint.load_for_every_rank(path, "f", Dist())["epoch"] == 3
    assert checkpoint.load_for_every_rank(path, "other", Dist()) is None


def test_features_made_on_another_device_or_in_another_precision_are_not_reused(tmp_path):
    images = CachedImages(tmp_path / "train-abc.u8", np.zeros(2), "Normalize(mean=0.5)", seed=0)  # not opened
    key = features_key(images, "weights", "fp32", True, "cpu")
    assert key == features_key(images, "weights", "fp32", True, "cpu")
    others = [
        features_key(images, "weights", "bf16", True, "cpu"),
        features_key(images, "weights", "fp32", True, "cuda:NVIDIA A100-SXM4-80GB"),
        features_key(images, "weights", "fp32", True, "cuda:Tesla V100-SXM2-16GB"),
        features_key(images, "weights", "fp32", False, "cpu"),
        features_key(images, "other weights", "fp32", True, "cpu"),
    ]
    assert len({key, *others}) == 6

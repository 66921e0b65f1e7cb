"""DistributedDataParallel under `torchrun`: read the launcher's environment, join the process group (nccl
on GPUs, gloo on CPU), sum metrics across ranks, let one process per machine write (the same outputs on every
machine's disk; rank 0's checkpoint is the one every rank resumes from). Without torchrun it is all a no-op.

The train stage starts torchrun itself when `train.nproc_per_node` asks for more than one process
(`launch_command`); a stage started by torchrun (by hand or by itself) never starts it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import PipelineError
from pipeline.training.precision import resolve_device

T = TypeVar("T")
DEFAULT_TIMEOUT_MIN = 60.0


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Dist:
        """The ranks torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); one process when they are absent."""
        return cls(
            rank=int(environ.get("RANK", 0)),
            world_size=int(environ.get("WORLD_SIZE", 1)),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes checkpoints, the model, metrics and logs."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The process that builds on-disk caches on its machine (the others wait, then read them), and
        writes the stage's outputs and checkpoints there: DDP keeps every process's weights equal to the bit,
        so each machine gets the same model on its own disk, and `dvc repro` may run on any of them, whichever
        rank the rendezvous gave it (c10d assigns ranks by host name, not by PET_NODE_RANK)."""
        return self.local_rank == 0


def setup(device_spec: str, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> tuple[Dist, torch.device]:
    """This process's rank and device; joins the process group when launched by torchrun with >1 process.
    `timeout_min` bounds every collective, the barriers included: long enough for the local main process
    to build the image and feature caches while the others wait."""
    env = Dist.from_env(os.environ)
    device = resolve_device(device_spec, env.local_rank, env.world_size)
    if device.type == "cuda":  # the current device: where NCCL, the CUDA RNG state and caching act
        torch.cuda.set_device(device)
    if env.enabled and not dist.is_initialized():
        dist.init_process_group(**process_group_options(env, device, timeout_min))
    return env, device


def process_group_options(env: Dist, device: torch.device, timeout_min: float) -> dict[str, Any]:
    """`init_process_group`'s arguments: nccl between GPUs, gloo between CPU processes."""
    return {
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "rank": env.rank,
        "world_size": env.world_size,
        "timeout": timedelta(minutes=timeout_min),
    }


def teardown(env: Dist) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Dist) -> None:
    if env.enabled:
        dist.barrier()


def all_sum(env: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (float64/int64 sums keep counts exact)."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(env: Dist, value: T) -> T:
    """Rank 0's `value` on every rank: what rank 0 read from its disk (e.g. the resumable checkpoint), which
    the other machines of a multi-node run may not see. Pickled between our own processes only."""
    if not env.enabled:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module: nn.Module, env: Dist, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require grad; re-wrap whenever that set changes."""
    if not env.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_nproc(spec: int | str, gpu_count: int, device_spec: str) -> int:
    """Processes to start on this machine: `auto` = one per visible GPU when the device spec lets each
    process take its own (auto, cuda), else one (a CPU run, a machine without GPUs, an explicit cuda:N)."""
    if spec != "auto":
        return int(spec)
    return max(gpu_count, 1) if device_spec in ("auto", "cuda") else 1


def several_nodes(environ: Mapping[str, str]) -> bool:
    """True when torchrun's environment describes more than one machine (PET_NNODES: `2`, or `1:4` for an
    elastic range), so the stage must start torchrun even for one process on this machine."""
    return environ.get("PET_NNODES", "1").split(":")[-1] not in ("", "1")


def under_launcher(environ: Mapping[str, str]) -> bool:
    """True in a process that torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in environ


def launcher_args(nproc: int, params_file: Path, environ: Mapping[str, str]) -> list[str]:
    """torchrun's arguments for `python -m pipeline train` as `nproc` processes on this machine.

    One machine: `--standalone` (a rendezvous on a free local port). Several: torchrun reads the rendezvous
    from the environment (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT or PET_RDZV_ENDPOINT),
    set the same on every machine but for the node rank.
    """
    if nproc < 1:
        raise PipelineError(f"train.nproc_per_node: expected auto or a positive integer, got {nproc}")
    rendezvous = [] if several_nodes(environ) else ["--standalone"]
    return [*rendezvous, f"--nproc_per_node={nproc}", "-m", "pipeline", "train", "--params", str(params_file)]


def launch(nproc: int, params_file: Path) -> None:
    """`launcher_args` run by torchrun's launcher in this process, which waits for the training processes;
    a failure is one line (each process has printed its own message), not torchrun's traceback."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    saved = dict(os.environ)  # torchrun sets OMP_NUM_THREADS for its processes in its own environment
    try:
        torchrun.run(torchrun.parse_args(launcher_args(nproc, params_file, os.environ)))
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()  # the others may only have been stopped because of it
        raise PipelineError(
            f"the {nproc} training processes under torch.distributed.run stopped: rank {rank} failed first "
            f"(exit code {first.exitcode}); the messages above say why"
        ) from None
    except RendezvousError as exc:
        raise PipelineError(
            f"torch.distributed.run could not bring the processes together ({exc}); check the PET_* "
            "rendezvous variables (docs/params.md, GPU)"
        ) from None
    finally:
        os.environ.clear()
        os.environ.update(saved)

"""DistributedDataParallel under `torchrun`: read the launcher's environment, join the process group (nccl
on GPUs, gloo on CPU), sum metrics across ranks, let only rank 0 write. Without torchrun it is all a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.training.precision import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes checkpoints, the model, metrics and logs."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The process that builds on-disk caches on its machine (the others wait, then read them)."""
        return self.local_rank == 0


def setup(device_spec: str) -> tuple[Dist, torch.device]:
    """This process's rank and device; joins the process group when launched by torchrun with >1 process."""
    env = Dist(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = resolve_device(device_spec, env.local_rank)
    if env.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size
        )
    return env, device


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


def wrap(module: nn.Module, env: Dist, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require grad; re-wrap whenever that set changes."""
    if not env.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

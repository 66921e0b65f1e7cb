"""Optimizer and learning-rate schedule factories.

The schedule is per optimizer step: each phase of a strategy (e.g. progressive's head-only epochs, then the
fine-tuning epochs) gets its own linear warm-up and cosine decay, so unfreezing starts gently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import TrainParams

# fused=True: one kernel per step for all tensors (CPU and CUDA); on a 2-core CPU, AdamW's step on lite0 takes
# 4 ms fused against 22 ms with the default per-tensor loop.
_OPTIMIZERS: dict[str, Callable[[list[dict], TrainParams], Optimizer]] = {
    "adamw": lambda groups, p: torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay, fused=True),
    "sgd": lambda groups, p: torch.optim.SGD(
        groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0, weight_decay=p.weight_decay, fused=True
    ),
}


def build_optimizer(groups: list[dict], params: TrainParams) -> Optimizer:
    """`groups` from freezing.param_groups: each group's lr is params.lr times its `lr_scale`."""
    for group in groups:
        group["lr"] = params.lr * group["lr_scale"]
    return _OPTIMIZERS[params.optimizer](groups, params)


def lr_factor(step: int, phases: Sequence[int], warmup_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step`; `phases` are consecutive phase lengths in steps."""
    start = 0
    for index, length in enumerate(phases):
        if step < start + length or index == len(phases) - 1:
            local, warmup = step - start, min(warmup_steps, length)
            if local < warmup:
                return (local + 1) / (warmup + 1)
            progress = min(1.0, (local - warmup) / max(1, length - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        start += length
    return 0.0


def build_scheduler(
    optimizer: Optimizer, phase_epochs: Sequence[int], steps_per_epoch: int, warmup_epochs: float
) -> LambdaLR:
    """LambdaLR stepped once per optimizer step over phases of `phase_epochs` epochs each."""
    phases = [max(1, epochs * steps_per_epoch) for epochs in phase_epochs]
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: lr_factor(step, phases, warmup_steps))

"""The optimizer story in one place: parameter groups (no weight decay on norms and biases, the head at
`head_lr_mult` times the lr), the optimizer, the per-step lr schedule and the lrs it sets.

The schedule is per optimizer step: each phase of a strategy (e.g. progressive's head-only epochs, then the
fine-tuning epochs) gets its own linear warm-up, then `train.schedule`: cosine decay to 0, cosine with warm
restarts (SGDR), or step decay at milestones; so unfreezing starts gently whatever the shape. Under
`train.time_limit_min` the rest of the schedule is compressed into the epochs that fit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import TrainParams
from pipeline.models import ImageClassifier

# fused=True: one kernel per step for all tensors (CPU and CUDA); on a 2-core CPU, AdamW's step on lite0 takes
# 4 ms fused against 22 ms with the default per-tensor loop.
_OPTIMIZERS: dict[str, Callable[[list[dict], TrainParams], Optimizer]] = {
    "adamw": lambda groups, p: torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay, fused=True),
    "sgd": lambda groups, p: torch.optim.SGD(
        groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0, weight_decay=p.weight_decay, fused=True
    ),
}


def build_optimizer(model: ImageClassifier, params: TrainParams) -> Optimizer:
    """`params.optimizer` over groups backbone/head x decay/no-decay; a group's lr is `params.lr` times its
    `lr_scale` (1 for the backbone, `params.head_lr_mult` for the head)."""
    groups = _param_groups(model, params.weight_decay, params.head_lr_mult)
    optimizer = _OPTIMIZERS[params.optimizer](groups, params)
    set_lr(optimizer, params.lr)
    return optimizer


def _param_groups(model: ImageClassifier, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """1-d tensors (norm scales, biases) and the backbone's `no_weight_decay()` names get no weight decay."""
    groups = []
    for part, lr_scale in ((model.backbone, 1.0), (model.head, head_lr_mult)):
        skip = part.no_weight_decay() if hasattr(part, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, param in part.named_parameters():
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    return [group for group in groups if group["params"]]


def current_lrs(optimizer: Optimizer, head_lr_mult: float) -> dict[str, float]:
    """The optimizer's lrs now: the backbone's (`lr`), the head's (`lr_head`) and `lr_trained`, which is the
    backbone's when any of it trains, else the head's (head-only epochs train nothing at `lr`)."""
    groups = optimizer.param_groups
    by_scale = {group["lr_scale"]: group["lr"] for group in groups}
    trained = {group["lr_scale"] for group in groups if any(p.requires_grad for p in group["params"])}
    lr, lr_head = by_scale[1.0], by_scale[head_lr_mult]
    return {"lr": lr, "lr_head": lr_head, "lr_trained": lr if 1.0 in trained else lr_head}


# A schedule's shape after the warm-up: (step since the phase started, steps after the warm-up, warm-up steps)
# -> multiplier of the base lr.
Shape = Callable[[float, int, int], float]


def _cosine(local: float, length: int, warmup: int) -> float:
    """Half a cosine from 1 at the end of the warm-up to 0 at the end of the phase."""
    progress = min(1.0, (local - warmup) / max(1, length))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(local: float, length: int, warmup: int) -> float:
    """A straight line from 1 at the end of the warm-up to 0 at the end of the phase."""
    return max(0.0, 1.0 - (local - warmup) / max(1, length))


def _cosine_restarts(period: int, mult: float) -> Shape:
    """SGDR (Loshchilov & Hutter 2017): cosine cycles of `period` steps, each `mult` times the last."""

    def shape(local: float, length: int, warmup: int) -> float:
        position, cycle = local - warmup, float(max(1, period))
        while position >= cycle:
            position, cycle = position - cycle, cycle * mult
        return 0.5 * (1.0 + math.cos(math.pi * position / cycle))

    return shape


def _step(milestones: Sequence[int], gamma: float) -> Shape:
    """StepLR/MultiStepLR: times `gamma` at each milestone (steps since the phase started)."""
    return lambda local, length, warmup: gamma ** sum(local >= m for m in milestones)


def schedule_shape(params: TrainParams, steps_per_epoch: int) -> Shape:
    """`params.schedule` with its epochs turned into optimizer steps."""
    if params.schedule == "cosine_restarts":
        return _cosine_restarts(round(params.restart_epochs * steps_per_epoch), params.restart_mult)
    if params.schedule == "step":
        return _step([round(m * steps_per_epoch) for m in params.step_milestones], params.step_gamma)
    return _linear if params.schedule == "linear" else _cosine


def lr_factor(step: float, phases: Sequence[int], warmup_steps: int, shape: Shape = _cosine) -> float:
    """Multiplier of the base lr at optimizer step `step`; `phases` are consecutive phase lengths in steps.
    Each phase warms up linearly over `warmup_steps` (at most its length), then follows `shape`."""
    start = 0
    for index, length in enumerate(phases):
        if step < start + length or index == len(phases) - 1:
            local, warmup = step - start, min(warmup_steps, length)
            if local < warmup:
                return (local + 1) / (warmup + 1)
            return shape(local, length - warmup, warmup)
        start += length
    return 0.0


def build_scheduler(
    optimizer: Optimizer, epoch_phases: Sequence[int], steps_per_epoch: int, params: TrainParams
) -> LambdaLR:
    """LambdaLR stepped once per optimizer step; `epoch_phases` holds each epoch's phase (consecutive)."""
    return LambdaLR(optimizer, schedule_factor(epoch_phases, steps_per_epoch, params))


def schedule_factor(
    epoch_phases: Sequence[int], steps_per_epoch: int, params: TrainParams
) -> Callable[[float], float]:
    """Optimizer step -> multiplier of the base lr, for the epochs of `epoch_phases`."""
    epochs = Counter(epoch_phases)  # phase -> its number of epochs
    phases = [max(1, epochs[phase] * steps_per_epoch) for phase in sorted(epochs)]
    warmup_steps = round(params.warmup_epochs * steps_per_epoch)
    shape = schedule_shape(params, steps_per_epoch)
    return lambda step: lr_factor(step, phases, warmup_steps, shape)


def compressed(
    factor: Callable[[float], float], start: int, end: int, new_end: int
) -> Callable[[float], float]:
    """`factor` with its steps from `start` to `end` squeezed (or stretched) into `start` to `new_end`: the
    lr goes on from where it is and follows the same curve (cosine, restarts, steps) to the same end, sooner.
    `train.time_limit_min` uses it when fewer (or more) epochs fit than were planned."""
    scale = (end - start) / max(1, new_end - start)
    return lambda step: factor(step if step < start else start + (step - start) * scale)


def scaled(factor: Callable[[float], float], start: int, by: float) -> Callable[[float], float]:
    """`factor` times `by` from step `start` on (`train.on_overfit: restore`)."""
    return lambda step: factor(step) * (by if step >= start else 1.0)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Every group at `lr` times its `lr_scale` (at the start, and along the lr finder's ramp; the scheduler
    scales them from there)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]

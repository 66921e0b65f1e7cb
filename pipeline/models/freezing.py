"""Which parameters train when: block groups, the four strategies as per-epoch plans, frozen BatchNorm. How
they train (parameter groups, weight decay, lrs) is pipeline.training.optim."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from pipeline.models import ImageClassifier


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains."""

    phase: int  # lr schedule phase; each phase has its own warm-up and cosine decay
    groups: int  # backbone block groups trained, counted from the output end (0 = head only)
    on_features: bool  # head-only epochs train on cached backbone features instead of images


def block_groups(backbone: nn.Module) -> list[list[str]]:
    """Backbone parameter names in block groups from input to output (timm's coarse grouping: stem, stages,
    final conv/norm with the last stage); models without a group matcher use their top-level children."""
    if hasattr(backbone, "group_matcher"):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [grouped[key] for key in sorted(grouped)]
    children = (
        [f"{name}.{p}" for p, _ in child.named_parameters()] for name, child in backbone.named_children()
    )
    return [names for names in children if names]


@dataclass(frozen=True)
class Freezing:
    """What trains when, by the `train` keys of the same names. A key left out is neutral (every group, no
    head-only epochs, no later unfreezing), not the `train` section's default."""

    strategy: str  # linear_probe | partial | full | progressive
    epochs: int
    trainable_blocks: int | None = None  # block groups trained, from the top; None = all
    progressive_head_epochs: int = 0  # progressive: epochs of the head alone on cached features, first
    progressive_unfreeze_every: int = 0  # progressive: epochs between unfreezing one more group; 0 = never


def _linear_probe(freezing: Freezing, num_groups: int) -> list[EpochPlan]:
    return [EpochPlan(0, 0, True)] * freezing.epochs


def _top_groups(freezing: Freezing, num_groups: int) -> int:
    """`trainable_blocks` groups from the top (None: all of them)."""
    blocks = freezing.trainable_blocks
    return num_groups if blocks is None else min(blocks, num_groups)


def _partial(freezing: Freezing, num_groups: int) -> list[EpochPlan]:
    return [EpochPlan(0, _top_groups(freezing, num_groups), False)] * freezing.epochs


def _full(freezing: Freezing, num_groups: int) -> list[EpochPlan]:
    return [EpochPlan(0, num_groups, False)] * freezing.epochs


def _progressive(freezing: Freezing, num_groups: int) -> list[EpochPlan]:
    """fastai-style: the head alone on cached features, then the top `trainable_blocks` groups, one more group
    every `progressive_unfreeze_every` epochs (0: no more)."""
    head_epochs = min(freezing.progressive_head_epochs, freezing.epochs)
    phase, first, every = (
        (1 if head_epochs else 0),
        _top_groups(freezing, num_groups),
        freezing.progressive_unfreeze_every,
    )
    plans = [EpochPlan(0, 0, True)] * head_epochs
    for j in range(freezing.epochs - head_epochs):
        groups = first if every == 0 else min(num_groups, first + j // every)
        plans.append(EpochPlan(phase, groups, False))
    return plans


STRATEGIES: dict[str, Callable[[Freezing, int], list[EpochPlan]]] = {
    "linear_probe": _linear_probe,
    "partial": _partial,
    "full": _full,
    "progressive": _progressive,
}


def plan_epochs(freezing: Freezing, num_groups: int) -> list[EpochPlan]:
    """One plan per epoch for `freezing.strategy`."""
    return STRATEGIES[freezing.strategy](freezing, num_groups)


def set_trainable(model: ImageClassifier, groups: list[list[str]], trainable_groups: int) -> None:
    """The head and the last `trainable_groups` backbone groups train; everything else is frozen."""
    trainable = (
        {name for group in groups[len(groups) - trainable_groups :] for name in group}
        if trainable_groups
        else set()
    )
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(name in trainable)
    model.head.requires_grad_(True)


def train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), except frozen parts (their dropout/drop-path and BatchNorm statistics stay fixed) and,
    with `freeze_bn`, every BatchNorm: small fine-tuning batches would wreck the pretrained statistics."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif freeze_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()

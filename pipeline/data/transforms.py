"""Transforms on cached uint8 tensors (3, side, side): augmentation for training, center crop for evaluation.

Both end in the backbone's normalisation, taken from its data config (`resolve_data_config`), so the
preprocessing is defined once. Evaluation is CenterCrop(size) of the cache, which equals pipeline.preprocess.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from pipeline.config import AugmentParams

_AUTO_AUGMENT: dict[str, Callable[[v2.InterpolationMode], list[v2.Transform]]] = {
    "none": lambda interpolation: [],
    "trivial": lambda interpolation: [v2.TrivialAugmentWide(interpolation=interpolation)],
    "randaugment": lambda interpolation: [v2.RandAugment(interpolation=interpolation)],
}


def build_transforms(data_config: dict[str, Any], augment: AugmentParams, train: bool) -> v2.Transform:
    """uint8 (3, side, side) -> normalised float32 (3, size, size); random only when `train`."""
    size = int(data_config["input_size"][-1])
    interpolation = v2.InterpolationMode(data_config["interpolation"])
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data_config["mean"], data_config["std"])]
    if not train:
        return v2.Compose([v2.CenterCrop(size), *normalize])
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            size, scale=(augment.scale_min, 1.0), interpolation=interpolation, antialias=True
        )
    ]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.color_jitter > 0:
        strength = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += _AUTO_AUGMENT[augment.auto_augment](v2.InterpolationMode.BILINEAR)
    steps += normalize
    if augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing, value=0.0))
    return v2.Compose(steps)


class Resized:
    """The train transform at other crop sizes (progressive resizing), each built on first use."""

    def __init__(self, data_config: dict[str, Any], augment: AugmentParams):
        self.data_config, self.augment = data_config, augment
        self._built: dict[int, v2.Transform] = {}

    def __call__(self, size: int) -> v2.Transform:
        if size not in self._built:
            config = {**self.data_config, "input_size": [3, size, size]}
            self._built[size] = build_transforms(config, self.augment, train=True)
        return self._built[size]


def build_batch_mix(augment: AugmentParams, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a whole batch (one of them at random when both are on); None when both are off.

    Returns soft targets (B, K), which the cross-entropy loss accepts directly.
    """
    mixers: list[v2.Transform] = []
    if augment.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
    if augment.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

"""Training objective: cross-entropy with label smoothing and optional class weights from the train split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

# Cui et al., "Class-Balanced Loss Based on Effective Number of Samples" (CVPR 2019): their usual beta.
EFFECTIVE_NUMBER_BETA = 0.999

_WEIGHTS: dict[str, Callable[[np.ndarray], np.ndarray | None]] = {
    "none": lambda counts: None,
    "inverse": lambda counts: 1.0 / counts,
    "effective": lambda counts: (1.0 - EFFECTIVE_NUMBER_BETA) / (1.0 - EFFECTIVE_NUMBER_BETA**counts),
}


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """Per-class loss weights (mean 1 over classes) from the train labels; None for `none`."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)
    weights = _WEIGHTS[mode](counts)
    if weights is None:
        return None
    return torch.as_tensor(weights * num_classes / weights.sum(), dtype=torch.float32)


def build_criterion(weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
    """Accepts class indices (B,) or soft targets (B, K) from MixUp/CutMix."""
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

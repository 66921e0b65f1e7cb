"""Stratified sampling of items by class."""

from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` items drawn at random with each class in its share of `labels` (all if n >= len)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Each item's position within its (shuffled) class as a fraction of the class size; taking the smallest
    # fractions first walks through all classes at the same pace, so every prefix is stratified.
    position = np.empty(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = order[np.argsort(position[order], kind="stable")][:n]
    return np.sort(chosen)

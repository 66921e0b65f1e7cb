"""Each epoch's batches: augmented images from the uint8 cache, or backbone features for head-only epochs.

The features are (N, C) float16 memmaps (`training.features`): each batch's rows are read and made float32
on their own, so a head-only epoch over a million images holds one batch, never the 5 GB float32 set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.loader import EpochSampler
from pipeline.data.shards import release

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class EpochData:
    """The train and val loaders, and the same images as backbone features (computed on first use)."""

    def __init__(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        features: Callable[[], tuple[np.ndarray, np.ndarray]],
        labels: tuple[torch.Tensor, torch.Tensor],
        image_size: int,
    ):
        self.train_loader, self.val_loader, self.image_size = train_loader, val_loader, image_size
        self._features_fn, self._features = features, None
        self.labels = labels  # (train, val) int64 label tensors, for the feature batches

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) (N, C) features, computed on first use (never, when resuming past the head-only
        epochs)."""
        if self._features is None:
            self._features = self._features_fn()
        return self._features

    def train(self, epoch: int, on_features: bool, size: int | None = None) -> tuple[Batches, int]:
        """This epoch's training batches and their number; `size`: their crop size, when not `image_size`
        (progressive resizing)."""
        sampler: EpochSampler = self.train_loader.sampler
        sampler.set_epoch(epoch, None if size == self.image_size else size)
        if not on_features:
            return self.train_loader, len(self.train_loader)
        features, batches = self.features()[0], list(sampler.index_batches(self.train_loader.batch_size))
        return _feature_batches(features, self.labels[0], batches), len(batches)

    def val(self, on_features: bool) -> tuple[Batches, int]:
        """The validation batches and their number: the val loader's from images; from features, batches of
        at least twice the train batch (no backbone activations to hold, so the CPU's small image batches
        would only add per-batch overhead: a million images' val pass of 1,000 classes took 17 s an epoch in
        batches of 16)."""
        if not on_features:
            return self.val_loader, len(self.val_loader)
        sampler: EpochSampler = self.val_loader.sampler
        size = max(self.val_loader.batch_size, 2 * self.train_loader.batch_size)
        batches = list(sampler.index_batches(size))
        return _feature_batches(self.features()[1], self.labels[1], batches), len(batches)


def _feature_batches(
    features: np.ndarray, labels: torch.Tensor, batches: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(B, C) float32 features and (B,) labels of each batch of indices, read out of the (N, C) array (a
    memmap's pages unmapped after each batch: random batches would map the whole file over an epoch)."""
    for indices in batches:
        rows = np.array(features[indices.numpy()], dtype=np.float32)
        release(features)
        yield torch.from_numpy(rows), labels[indices]

"""Training data: the train and val splits, datasets over the uint8 cache, epoch-seeded samplers, DataLoader
factory.

Randomness is a pure function of (seed, epoch, index): the sampler's order comes from (seed, epoch) and each
item's augmentation from (seed, epoch, index). So results do not depend on the number of workers, on
persistent workers keeping their RNG across epochs, or on whether a run was resumed; DDP ranks take disjoint
shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.cache import CachedSet, identity, open_cache
from pipeline.data.labels import SINGLE, LabelSets, multi_hot
from pipeline.data.splits import read_splits_table
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class SplitRows:
    """One split: image files, their identities (relative path + sha256) and labels (class indices)."""

    paths: list[str]
    identities: list[str]
    labels: np.ndarray  # (N,) int64 class indices; a multilabel task's (N, K) float32 multi-hot rows


@dataclass(frozen=True)
class Splits:
    class_names: list[str]  # sorted unique labels of the whole table: index = class id
    train: SplitRows
    val: SplitRows


def read_splits(splits_csv: Path, data_root: Path, sets: LabelSets = SINGLE) -> Splits:
    """The train and val rows of the split stage's table; class order is the sorted unique labels over all
    splits. A multilabel task's (`sets`) labels are (N, K) float32 multi-hot rows."""
    table = read_splits_table(splits_csv)
    class_names = sets.names(table["label"])
    index, root = {name: i for i, name in enumerate(class_names)}, os.fspath(data_root)

    def targets(cells: pd.Series) -> np.ndarray:
        if not sets.multilabel:
            return cells.map(index).to_numpy(dtype=np.int64)
        return multi_hot(sets.exploded(cells), len(cells), class_names, np.float32)

    def rows(name: str) -> SplitRows:
        part = table[table["split"] == name]
        if part.empty:
            raise PipelineError(f"{splits_csv}: no '{name}' rows; training needs train and val images")
        return SplitRows(
            paths=[os.path.join(root, p) for p in part["path"]],  # 0.3 s for a million; Path: 16 s
            identities=[identity(p, sha) for p, sha in zip(part["path"], part["sha256"], strict=True)],
            labels=targets(part["label"]),
        )

    return Splits(class_names, rows("train"), rows("val"))


def _target(labels: np.ndarray, index: int) -> int | torch.Tensor:
    """An image's class index, or its (K,) multi-hot row (a multilabel task's)."""
    return torch.from_numpy(labels[index]) if labels.ndim == 2 else int(labels[index])


class CachedImages(Dataset):
    """Items of the uint8 cache, transformed; keys are (epoch, index) so augmentation is reproducible.

    A transform without randomness (`random=False`: evaluation's center crop and normalisation) is applied
    to a whole batch at once, which costs a tenth of applying it image by image (0.03 vs 0.27 s per 1,000).
    """

    def __init__(
        self,
        cache_file: Path,
        labels: np.ndarray,
        transform: Callable,
        seed: int,
        *,
        random: bool = True,
        resized: Callable[[int], Callable] | None = None,
    ):
        self.cache_file, self.labels, self.transform, self.seed = Path(cache_file), labels, transform, seed
        self.random, self.resized = random, resized  # resized(size): the transform at another crop size
        self._array: CachedSet | None = None  # opened lazily, in each worker: see __getstate__

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """`key`: (epoch, index), or (epoch, index, size) in an epoch of progressive resizing."""
        epoch, index, *size = key
        image = torch.from_numpy(np.array(self._cache()[index]))  # (3, side, side) uint8, out of its shard
        transform = self.resized(size[0]) if size and self.resized is not None else self.transform
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue GPU seeding, costing 1 ms an image.
            torch.default_generator.manual_seed(_item_seed(self.seed, epoch, index))
            return transform(image), _target(self.labels, index)

    def __getitems__(self, keys: list[tuple[int, ...]]) -> list[tuple[torch.Tensor, int]]:
        """The DataLoader's batch fetch (it calls this instead of indexing item by item when it exists)."""
        if self.random:
            return [self[key] for key in keys]
        indices = [key[1] for key in keys]
        images = self.transform(torch.from_numpy(self._cache()[indices]))  # a copy of just these squares
        targets = self.labels[indices]
        targets = torch.from_numpy(targets).unbind(0) if targets.ndim == 2 else targets.tolist()
        return list(zip(images.unbind(0), targets, strict=True))

    def _cache(self) -> CachedSet:
        if self._array is None:
            self._array = open_cache(self.cache_file)
        return self._array

    def __getstate__(self) -> dict:
        """What a DataLoader worker receives: the set is opened again there, not pickled with its index."""
        return {**self.__dict__, "_array": None}


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's (epoch, index) keys: a permutation or class-balanced draw, seeded by (seed, epoch).

    Training order is padded to a multiple of the world size (as DistributedSampler does); evaluation order
    (shuffle=False) is split without padding, so summed metrics count every image exactly once.
    """

    def __init__(
        self,
        labels: np.ndarray,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        balanced: bool = False,
    ):
        self.labels, self.seed, self.rank, self.world_size = labels, seed, rank, world_size
        self.shuffle, self.balanced, self.epoch = shuffle or balanced, balanced, 0
        self.size: int | None = None

    def set_epoch(self, epoch: int, size: int | None = None) -> None:
        """The epoch to draw for and, under progressive resizing, its crop size, which the keys carry to the
        dataset (in a DataLoader worker too: a persistent one never sees the sampler change)."""
        self.epoch, self.size = epoch, size

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)[self.rank :: self.world_size]
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, -1))
        total = -(-n // self.world_size) * self.world_size
        if self.balanced:  # each class drawn equally often, with replacement
            counts = np.bincount(self.labels)
            weights = torch.as_tensor(1.0 / counts[self.labels], dtype=torch.float64)
            order = torch.multinomial(weights, total, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
            order = torch.cat([order, order[: total - n]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        sized = () if self.size is None else (self.size,)
        return iter([(self.epoch, int(i), *sized) for i in self._order()])

    def __len__(self) -> int:
        n = len(self.labels)
        return -(-n // self.world_size) if self.shuffle else len(range(self.rank, n, self.world_size))

    def index_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches of plain indices, for data already in memory (cached features)."""
        order = self._order()
        return iter(order.split(batch_size))


def resolve_workers(requested: int | None, device: torch.device, world_size: int = 1) -> int:
    """None = a default for the machine: none on CPU (workers would take cores from the model; decoding is
    already cached), else up to 8 per GPU process from the cores left."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // world_size - 1))


def resolve_eval_batch_size(requested: int | None, train_batch_size: int, device: torch.device) -> int:
    """None = a default for the machine: twice the train batch on GPU (no activations kept for backward),
    16 on CPU, where bigger batches are slower: glibc gives each buffer over 32 MiB fresh pages from the
    kernel, so each layer of a big batch pays page faults (lite0, 160 px, bf16: 16 runs 430 img/s, 64 300)."""
    if requested is not None:
        return requested
    return 16 if device.type == "cpu" else 2 * train_batch_size


@dataclass(frozen=True)
class Loading:
    """How a DataLoader fetches batches (`train.num_workers`, `pin_memory`, `persistent_workers`): how fast
    data arrives, never which data."""

    num_workers: int | None  # None: a default for the machine (resolve_workers)
    pin_memory: bool  # on CUDA only
    persistent_workers: bool  # with workers only


def build_loader(
    dataset: Dataset, sampler: EpochSampler, batch_size: int, loading: Loading, device: torch.device
) -> DataLoader:
    workers = resolve_workers(loading.num_workers, device, sampler.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=loading.pin_memory and device.type == "cuda",
        persistent_workers=loading.persistent_workers and workers > 0,
        # Its own generator: creating an iterator must not draw from the global RNG (saved in checkpoints).
        generator=torch.Generator().manual_seed(0),
    )


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index + 1]).generate_state(1, dtype=np.uint64)[0] >> 1)

"""data/epochs: head-only epochs read their batches out of the (N, C) float16 feature memmaps, one batch of
float32 rows at a time, in the sampler's order."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.epochs import EpochData
from pipeline.data.loader import EpochSampler


def _memmap(path, rows: np.ndarray) -> np.ndarray:
    np.save(path, rows)
    return np.load(path, mmap_mode="r")


def test_feature_batches_are_float32_rows_of_the_memmaps_in_the_samplers_order(tmp_path):
    rng = np.random.default_rng(0)
    train_rows, val_rows = (
        rng.normal(size=(10, 4)).astype(np.float16),
        rng.normal(size=(3, 4)).astype(np.float16),
    )
    features = (_memmap(tmp_path / "train.npy", train_rows), _memmap(tmp_path / "val.npy", val_rows))
    labels = (torch.arange(10), torch.arange(3))
    sampler = EpochSampler(labels[0].numpy(), seed=0)
    val_sampler = EpochSampler(labels[1].numpy(), seed=0, shuffle=False)
    loaders = (
        DataLoader(range(10), batch_size=4, sampler=sampler),
        DataLoader(range(3), 2, sampler=val_sampler),
    )
    data = EpochData(*loaders, lambda: features, labels, 32)

    batches, count = data.train(epoch=1, on_features=True)
    batches = list(batches)
    assert count == len(batches) == 3
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 4)
        torch.testing.assert_close(x, torch.from_numpy(train_rows[y.numpy()].astype(np.float32)))
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))  # a permutation
    val, count = data.val(on_features=True)  # twice the train batch: [[0, 1], [2]] in the image loader's 2
    assert [y.tolist() for _, y in val] == [[0, 1, 2]] and count == 1


def test_feature_val_batches_are_twice_the_train_batch_or_the_val_loaders_if_larger(tmp_path):
    rows = np.zeros((20, 4), np.float16)
    features = (_memmap(tmp_path / "train.npy", rows), _memmap(tmp_path / "val.npy", rows))
    labels = (torch.arange(20), torch.arange(20))
    for train_batch, val_batch, expected in ((3, 2, [6, 6, 6, 2]), (3, 8, [8, 8, 4])):
        loaders = (
            DataLoader(range(20), train_batch, sampler=EpochSampler(labels[0].numpy(), seed=0)),
            DataLoader(range(20), val_batch, sampler=EpochSampler(labels[1].numpy(), seed=0, shuffle=False)),
        )
        val, count = EpochData(*loaders, lambda: features, labels, 32).val(on_features=True)
        assert [len(y) for _, y in val] == expected and count == len(expected)

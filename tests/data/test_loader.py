"""data/loader: the epoch samplers (balanced, sharded between ranks) and the DataLoader factory."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from pipeline.data.loader import EpochSampler, Loading, build_loader


def test_balanced_sampler_draws_classes_equally_and_is_seeded_by_epoch():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(labels, seed=3, balanced=True)
    draws = np.concatenate([labels[[i for _, i in sampler]] for sampler.epoch in range(20)])
    assert 0.45 < draws.mean() < 0.55
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler) and list(sampler) != list(
        EpochSampler(labels, seed=3, balanced=True)
    )


def test_sharded_samplers_split_the_data_between_ranks():
    labels = np.arange(10) % 2
    train = [sorted(i for _, i in EpochSampler(labels, 0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(shard) == 4 for shard in train) and set().union(*train) == set(range(10))
    val = [[i for _, i in EpochSampler(labels, 0, rank=r, world_size=3, shuffle=False)] for r in range(3)]
    assert sorted(sum(val, [])) == list(range(10))  # evaluation counts every image exactly once


def test_the_loader_pins_memory_only_on_cuda_and_keeps_workers_only_when_there_are_some():
    labels = np.arange(6) % 2
    sampler = EpochSampler(labels, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = build_loader([], sampler, 4, Loading(None, pin_memory=True, persistent_workers=True), cpu)
    assert (default.num_workers, default.pin_memory, default.persistent_workers) == (0, False, False)
    two = build_loader([], sampler, 4, Loading(2, pin_memory=True, persistent_workers=True), cuda)
    assert (two.num_workers, two.pin_memory, two.persistent_workers) == (2, True, True)
    assert not build_loader(
        [], sampler, 4, Loading(2, pin_memory=False, persistent_workers=False), cuda
    ).pin_memory


def test_progressive_resizing_reaches_persistent_workers_through_the_sampler_keys(tmp_path):
    """The crop size travels in each key, so a persistent DataLoader worker (its own copy of the dataset,
    made when it started) trains each epoch at the size set in the main process."""
    from helpers import make_image

    from pipeline.config import AugmentParams
    from pipeline.data.cache import build_cache
    from pipeline.data.loader import CachedImages
    from pipeline.data.transforms import Resized, build_transforms

    config = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875}
    config.update(mean=[0.5] * 3, std=[0.5] * 3)
    files = [make_image(tmp_path / f"{i}.png", i % 2, seed=i) for i in range(4)]
    cache_file = build_cache(files, [f"{i}" for i in range(4)], config, tmp_path / "cache", workers=1)
    augment = AugmentParams()
    train = build_transforms(config, augment, True)
    dataset = CachedImages(cache_file, np.arange(4) % 2, train, 0, resized=Resized(config, augment))
    worker_copy = pickle.loads(pickle.dumps(dataset))  # what a worker holds from its start on
    sampler = EpochSampler(np.arange(4) % 2, 0)
    shapes = []
    for epoch, size in enumerate([16, None, 24]):
        sampler.set_epoch(epoch, size)
        shapes.append({tuple(x.shape[-2:]) for x, _ in worker_copy.__getitems__(list(sampler))})
    assert shapes == [{(16, 16)}, {(32, 32)}, {(24, 24)}]

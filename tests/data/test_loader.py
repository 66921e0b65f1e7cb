"""data/loader: the epoch samplers (balanced, sharded between ranks)."""

from __future__ import annotations

import numpy as np

from pipeline.data.loader import EpochSampler


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

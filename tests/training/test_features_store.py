"""training/features: the on-disk feature store at scale. Finished chunks survive a kill and a rerun computes
only the rest; an image in two sets runs through the backbone once; each set comes back as a float16 memmap
built a block at a time, never as an (N, C) float32 copy."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data import cache, shards
from pipeline.data.loader import CachedImages
from pipeline.training import features
from pipeline.training.distributed import Dist
from pipeline.training.precision import Precision

CONFIG = {"input_size": [3, 8, 8], "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3}
CPU = Precision(torch.device("cpu"), None)


class Scale:
    """The eval transform's stand-in: uint8 batch -> float in [0, 1]; its repr is part of the store's key."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.float() / 255

    def __repr__(self) -> str:
        return "Scale()"


class Counting(nn.Module):
    """A tiny backbone (B, 3, 8, 8) -> (B, channels) that counts the images it sees and fails, as a kill
    would, once `fail_after` images have been seen."""

    def __init__(self, channels: int = 16, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen, self.fail_after = 0, fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.seen + len(x) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.seen += len(x)
        return self.net(x)


@pytest.fixture(autouse=True)
def _no_folding(monkeypatch):
    """The backbone itself, so its counter sees every forward (folding would run a copy)."""
    monkeypatch.setattr(features, "inference_copy", lambda backbone, probe: backbone)


def _images(tmp_path: Path, numbers: list[int], monkeypatch) -> CachedImages:
    """A cache of distinct fake images, image i's pixels depending on i only, whatever set holds it."""

    def load(path: Path, config: dict) -> np.ndarray:
        i = int(path.stem)
        return np.random.default_rng(i).integers(0, 256, (3, 8, 8), dtype=np.uint8)

    monkeypatch.setattr(cache, "_load", load)
    paths = [tmp_path / f"{i}.png" for i in numbers]
    built = cache.build_cache(
        paths, [f"{i}.png:sha{i}" for i in numbers], CONFIG, tmp_path / "cache", workers=1
    )
    return CachedImages(built, np.zeros(len(numbers), np.int64), Scale(), seed=0, random=False)


def _features(backbone: nn.Module, sets: list[CachedImages], tmp_path: Path, batch_size: int = 4) -> list:
    return features.backbone_features(backbone, sets, batch_size, CPU, False, tmp_path / "cache", Dist())


def _shards(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("features-*/*.keys.npy"))


def test_a_kill_keeps_the_finished_chunks_and_a_rerun_computes_only_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "CHUNK", 8)
    images = _images(tmp_path, list(range(30)), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _features(Counting(fail_after=20), [images], tmp_path)  # dies in the third chunk
    assert len(_shards(tmp_path)) == 2

    backbone = Counting()
    (got,) = _features(backbone, [images], tmp_path)
    assert backbone.seen == 30 - 16 and len(_shards(tmp_path)) == 4  # chunks 3 and 4 (8 + 6 images)

    fresh = Counting()
    (expected,) = _features(fresh, [images], tmp_path / "fresh")
    assert fresh.seen == 30
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    again = Counting()
    _features(again, [images], tmp_path)
    assert again.seen == 0


def test_an_image_in_two_sets_runs_through_the_backbone_once(tmp_path, monkeypatch):
    first = _images(tmp_path, [0, 1, 2, 3, 4, 5], monkeypatch)
    second = _images(tmp_path, [9, 4, 3, 8, 7, 7], monkeypatch)  # 4 and 3 in both; 7 twice
    backbone = Counting()
    a, b = _features(backbone, [first, second], tmp_path)
    assert backbone.seen == 9  # 0-5, then 9, 8 and 7
    assert a.shape == (6, 16) and b.shape == (6, 16)
    assert np.array_equal(a[4], b[1]) and np.array_equal(a[3], b[2]) and np.array_equal(b[4], b[5])
    with torch.no_grad():  # in the set's order, float16 of what the backbone gives
        direct = backbone.net(Scale()(torch.from_numpy(np.array(cache.open_cache(second.cache_file)))))
    np.testing.assert_allclose(np.asarray(b, np.float32), direct.numpy(), rtol=2**-11, atol=1e-6)


def test_a_large_set_is_a_float16_memmap_built_in_bounded_memory(tmp_path, monkeypatch):
    """20,000 x 256 features: 20 MB as the float32 tensor the store used to stack; here the shards and the set
    are written a block at a time, so the peak is a chunk and a gather block, whatever N."""
    n, channels = 20_000, 256
    monkeypatch.setattr(features, "CHUNK", 2048)
    monkeypatch.setattr(shards, "_GATHER_BYTES", 2**20)
    images = _images(tmp_path, list(range(n)), monkeypatch)
    tracemalloc.start()
    try:
        (got,) = _features(Counting(channels), [images], tmp_path, batch_size=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(got, np.memmap) and got.dtype == np.float16 and got.shape == (n, channels)
    assert not got.flags.writeable
    assert peak < 8 * 2**20, peak / 2**20  # MiB: the digests, one chunk, one block (float32 set: 20)


def test_features_out_of_float16_range_are_an_error_not_infinities(tmp_path, monkeypatch):
    images = _images(tmp_path, [0, 1], monkeypatch)
    backbone = Counting()
    with torch.no_grad():
        backbone.net[0].bias.fill_(1e6)
    with pytest.raises(features.PipelineError, match="float16"):
        _features(backbone, [images], tmp_path)
    assert _shards(tmp_path) == []


def test_a_store_of_another_version_is_never_read(tmp_path, monkeypatch):
    images = CachedImages(tmp_path / "x.npy", np.zeros(2), Scale(), seed=0)  # not opened
    key = features.features_key(images, "weights", "fp32", False, "cpu")
    monkeypatch.setattr(features, "STORE_VERSION", features.STORE_VERSION - 1)  # the torch .pt shards
    assert features.features_key(images, "weights", "fp32", False, "cpu") != key

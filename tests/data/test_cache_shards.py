"""The image cache's content-addressed shards: a kill keeps the finished shards and a rerun decodes only the
rest; an image in two sets is decoded once; sets are read out of memory-mapped shards, and a dataset sent to a
DataLoader worker carries no pixels; random reads hold only what they read (no memory map grows the RSS)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import mapped_bytes
from torch import nn

from pipeline.data import cache, shards
from pipeline.data.loader import CachedImages
from pipeline.errors import PipelineError

CONFIG = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875}
SQUARE = 3 * 36 * 36  # bytes of one cached square at CONFIG


def _square(path: Path) -> np.ndarray:
    """Image `<i>.png`'s fake square: its pixels depend on i only."""
    return np.random.default_rng(int(path.stem)).integers(0, 256, (3, 36, 36), dtype=np.uint8)


class Decoder:
    """`cache._load`'s stand-in: counts the images it decodes; fails, as a kill would, after `fail_after`."""

    def __init__(self, fail_after: int | None = None):
        self.decoded: list[str] = []
        self.fail_after = fail_after

    def __call__(self, path: Path, config: dict) -> np.ndarray:
        if self.fail_after is not None and len(self.decoded) == self.fail_after:
            raise PipelineError(f"{path}: killed")
        self.decoded.append(path.stem)
        return _square(path)


def _build(tmp_path: Path, numbers: list[int], decoder: Decoder, monkeypatch) -> Path:
    monkeypatch.setattr(cache, "_load", decoder)
    paths = [tmp_path / f"{i}.png" for i in numbers]
    return cache.build_cache(
        paths, [f"{i}.png:sha{i}" for i in numbers], CONFIG, tmp_path / "cache", workers=1
    )


def _shards(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("images-*/*.keys.npy"))


def test_a_kill_keeps_the_finished_shards_and_a_rerun_decodes_only_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_SHARD_BYTES", 4 * SQUARE)  # 4 images a shard
    with pytest.raises(PipelineError, match="killed"):
        _build(tmp_path, list(range(14)), Decoder(fail_after=9), monkeypatch)  # dies in the third shard
    assert len(_shards(tmp_path)) == 2

    decoder = Decoder()
    built = _build(tmp_path, list(range(14)), decoder, monkeypatch)
    assert decoder.decoded == [str(i) for i in range(8, 14)] and len(_shards(tmp_path)) == 4
    array = cache.open_cache(built)
    assert array.shape == (14, 3, 36, 36)
    assert all(np.array_equal(array[i], _square(Path(f"{i}.png"))) for i in range(14))


def test_an_image_in_two_sets_is_decoded_once(tmp_path, monkeypatch):
    decoder = Decoder()
    first = cache.open_cache(_build(tmp_path, [0, 1, 2, 3, 4, 5], decoder, monkeypatch))
    second = cache.open_cache(_build(tmp_path, [9, 4, 3, 8, 7, 7], decoder, monkeypatch))  # 4, 3 in both
    assert sorted(decoder.decoded, key=int) == ["0", "1", "2", "3", "4", "5", "7", "8", "9"]
    assert np.array_equal(second[1], first[4]) and np.array_equal(second[4], second[5])
    assert np.array_equal(second[[2, 0]], np.stack([_square(Path("3.png")), _square(Path("9.png"))]))
    assert first.keys[3] == second.keys[2]  # the feature store keys them the same way


def test_a_set_is_read_by_index_and_workers_get_no_pixels(tmp_path, monkeypatch):
    n = 1_000
    monkeypatch.setattr(cache, "_SHARD_BYTES", 400 * SQUARE)
    built = _build(tmp_path, list(range(n)), Decoder(), monkeypatch)
    array = cache.open_cache(built)
    assert np.array_equal(array[-1], _square(Path(f"{n - 1}.png")))
    assert np.array_equal(array[398:401], np.stack([_square(Path(f"{i}.png")) for i in (398, 399, 400)]))
    labels = np.zeros(n, np.int64)
    images = CachedImages(built, labels, nn.Identity(), seed=0, random=False)
    assert len(images.__getitems__([(0, 1), (0, 800)])) == 2  # opened here: its index and two shards' files
    sent = pickle.dumps(images)  # what a DataLoader worker receives: it opens the set again
    assert len(sent) < labels.nbytes + 2_000, len(sent)  # the set's index (24 KB here) stays behind
    assert pickle.loads(sent)[(0, 800)][0].shape == (3, 36, 36)
    assert len(pickle.dumps(array)) < 25 * n + 2_000  # a set alone travels without its shards' pixels


def test_the_store_skips_a_half_written_shard_and_finds_rows_by_key(tmp_path):
    store = shards.ShardStore(tmp_path / "store")
    keys = shards.digests(["a", "b", "c"])
    store.add(keys, np.arange(6, dtype=np.int16).reshape(3, 2))
    (tmp_path / "store" / "orphan.rows.npy").write_bytes(b"killed before its keys were written")
    reopened = shards.ShardStore(tmp_path / "store")
    assert reopened.names == store.names and len(reopened) == 3
    shard, row = reopened.locate(shards.digests(["c", "x", "a"]))
    assert shard.tolist() == [0, -1, 0] and row[[0, 2]].tolist() == [2, 0]
    assert reopened.missing(shards.digests(["x", "a", "y", "x"])).tolist() == [0, 2]


def test_a_set_is_saved_a_block_at_a_time_whatever_the_shard(tmp_path, monkeypatch):
    """One shard of 20,000 x 256 float16 (10 MB) saved in reverse order: 1 MB blocks, not the shard's 10 MB
    at once."""
    import tracemalloc

    n = 20_000
    monkeypatch.setattr(shards, "_GATHER_BYTES", 2**20)
    store = shards.ShardStore(tmp_path / "store")
    keys = shards.digests(str(i) for i in range(n))
    with store.write(keys, (256,), np.float16) as rows:
        rows[:] = np.arange(n, dtype=np.float16)[:, None]
    tracemalloc.start()
    try:
        store.save(tmp_path / "set.npy", *store.locate(keys[::-1]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    saved = np.load(tmp_path / "set.npy", mmap_mode="r")
    assert saved.shape == (n, 256) and saved.dtype == np.float16
    assert (
        np.array_equal(saved[:, 0], np.arange(n, dtype=np.float16)[::-1]) and (saved[5] == saved[5, 0]).all()
    )
    assert peak < 3 * 2**20, peak / 2**20  # MiB


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssFile from /proc")
def test_random_reads_hold_only_the_squares_read(tmp_path, monkeypatch):
    """Through a memmap, the kernel maps 64 KB around each page a read faults in: 500 random squares of a
    20 MB cache (in the page cache, just written) mapped most of it."""
    n = 5_000
    built = _build(tmp_path, list(range(n)), Decoder(), monkeypatch)
    array = cache.open_cache(built)
    before = _rss_file()
    for indices in np.random.default_rng(0).permutation(n)[:500].reshape(20, 25):
        array[np.sort(indices)]
    assert _rss_file() - before < 2 * 2**20, (_rss_file() - before) / 2**20  # MiB (500 squares: 1.9)


def _rss_file() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssFile"))


def test_release_unmaps_a_memmaps_pages_and_keeps_what_was_written(tmp_path):
    path = tmp_path / "rows.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(64, 2**20))  # 64 MiB
    rows[:] = 7
    assert mapped_bytes(path) > 60 * 2**20

    shards.release(rows[10:20])  # a view releases the whole mapping

    assert mapped_bytes(path) < 2**20
    assert rows[63, -1] == 7  # read back from the page cache
    del rows
    assert (np.load(path)[:, ::4096] == 7).all()  # what was written reached the file
    shards.release(np.zeros(3), [1, 2])  # nothing mapped: nothing to do

"""Audit at scale: the approximate near-duplicate search (faiss HNSW graphs, memory-mapped float16 embeddings
and uint8 thumbnails; what runs above checks.ANN_ABOVE images) finds what comparing all pairs finds on
planted data, and its memory does not grow with all the thumbnails or embeddings as float32.

Random data with planted copies; `ann_above=0` forces the approximate path on a few hundred images.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import AuditParams
from pipeline.stages.audit import checks

_CLUMP = 40  # near-identical embeddings: each has more alike others than the graph returns at first


def _planted(n: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """Random embeddings and 48 px thumbnails with copies planted: embeddings alike enough on their own, a
    noisy embedding whose pixels are the same, a mirrored thumbnail under another embedding, and a clump of
    near-identical embeddings; returns the pairs that must share a group."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, channels)).astype(np.float32)
    thumbs = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    planted = set()
    for source in range(0, n - _CLUMP - 10, 10):
        kind = (source // 10) % 3
        if kind == 0:  # cosine about 0.99
            embeddings[source + 1] = embeddings[source] + 0.15 * rng.standard_normal(channels)
        elif kind == 1:  # cosine about 0.7, the same pixels brightened
            embeddings[source + 1] = embeddings[source] + rng.standard_normal(channels)
            thumbs[source + 1] = np.clip(thumbs[source].astype(np.int16) + 9, 0, 255)
        else:  # an unrelated embedding, the picture mirrored
            thumbs[source + 1] = thumbs[source][:, ::-1]
        planted.add((source, source + 1))
    clump = np.arange(n - _CLUMP, n)
    embeddings[clump] = embeddings[clump[0]] + 0.05 * rng.standard_normal((_CLUMP, channels))
    planted |= {(int(i), int(j)) for i in clump for j in clump if i < j}
    return embeddings, thumbs, planted


def _tuples(pairs: checks.Pairs) -> set[tuple[int, int]]:
    return set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))


@pytest.mark.parametrize("channels", [96, 1280], ids=["no-projection", "principal-axes"])
def test_the_approximate_search_finds_the_same_pairs_and_groups_as_comparing_all_pairs(channels):
    embeddings, thumbs, planted = _planted(200, channels)
    audit = AuditParams(neighbours=2)
    exact = checks.near_duplicates(embeddings, thumbs, audit, ann_above=10**9)
    approximate = checks.near_duplicates(embeddings, thumbs, audit, ann_above=0)
    assert planted <= _tuples(exact)  # the data is what it says
    assert _tuples(approximate) == _tuples(exact)  # the clump's 780 pairs too: asked again for more
    assert np.allclose(approximate.similarity, exact.similarity, atol=2e-3)  # float16 embeddings
    assert np.array_equal(approximate.correlation, exact.correlation, equal_nan=True)
    keys = [f"{k:04d}" for k in range(len(embeddings))]
    assert checks.group_ids(keys, approximate) == checks.group_ids(keys, exact)


def test_the_approximate_pixel_search_finds_each_images_mirrored_copy():
    _, thumbs, _ = _planted(400, 8)
    mirrored = {(k, k + 1) for k in range(20, 350, 30)}  # the third kind of planted copy
    exact, approximate = (_tuples(checks.pixel_nearest(thumbs, above)) for above in (10**9, 0))
    assert mirrored <= exact and mirrored <= approximate
    assert len(approximate & exact) >= 0.9 * len(exact)  # random pixels: no structure for the graph to use


def _peak_bytes(n: int, tmp_path: Path, channels: int = 1280) -> int:
    """Peak bytes numpy allocates while the approximate candidate search runs on n images read from
    memory-mapped files (the mapped pages themselves are not allocations)."""
    embeddings, thumbs, _ = _planted(n, channels)
    files = [tmp_path / f"{name}-{n}.npy" for name in ("embeddings", "thumbs")]
    np.save(files[0], embeddings.astype(np.float16))
    np.save(files[1], thumbs)
    del embeddings, thumbs
    embeddings, thumbs = (np.load(path, mmap_mode="r") for path in files)
    tracemalloc.start()
    try:
        unit = checks.unit_embeddings(embeddings, tmp_path)
        alike, candidates = checks.candidate_pairs(unit, thumbs, AuditParams(), ann_above=0)
        checks.verified(unit, thumbs, alike, candidates.where(np.arange(len(candidates)) < 50), 0.995)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_approximate_search_never_holds_all_thumbnails_or_embeddings_as_float32(tmp_path, monkeypatch):
    # Small fixed buffers, so that what grows with the number of images stands out at a test's size.
    monkeypatch.setattr(checks, "_BLOCK", 256)
    monkeypatch.setattr(checks, "_ANN_BLOCK", 64)
    monkeypatch.setattr(checks, "_ANN_SAMPLE", 500)
    small, large = 1000, 4000
    _peak_bytes(200, tmp_path)  # imports (scipy.linalg, faiss) allocate too: once, before measuring
    growth = -_peak_bytes(small, tmp_path) + _peak_bytes(large, tmp_path)
    added = large - small  # as float32, their thumbnails are 28 MB, their embeddings 15 MB
    assert growth < 0.25 * added * 1280 * 4, f"{growth / 2**20:.1f} MiB"

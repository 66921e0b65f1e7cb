"""The audit's statistics on backbone embeddings: near-duplicate groups, likely label errors, drift.

Pure functions on arrays and image files; scikit-learn and cleanlab do the statistics, faiss the approximate
nearest-neighbour search of large sets; this module only wires them, and compares candidate near-duplicates
pixel by pixel.

How the near-duplicate search grows (benchmarks/audit_scale.py): up to ANN_ABOVE images it compares every
pair (blocked matrix products, time n^2); above, each image's neighbours come from HNSW graphs (faiss), one
over the embeddings projected on their first principal axes (then re-ranked by their exact cosine), one over
the 12 px thumbnails, so time grows as about n log n; the centred embeddings (float16) and the thumbnails
(uint8) then live in memory-mapped temporary files, read a block at a time.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pipeline.calibration import fit_temperature, softmax
from pipeline.config import AuditParams
from pipeline.data.shards import BLOCK_ROWS, release, spans
from pipeline.progress import progress
from pipeline.serving.unknown import normalize

_BLOCK = 2048  # rows of the similarity matrix computed at a time: (2048, N) float32
# Up to this many images every pair is compared, above it neighbours are approximate (faiss HNSW graphs), so
# small sets keep their exact results. Comparing all pairs of 20,000 took 35 s and 1.1 GB on 2 busy cores, the
# graphs 19 s and 0.2 GB (benchmarks/results/audit_scale.json); from 50,000 on all pairs no longer pays.
ANN_ABOVE = 20_000
_ANN_BLOCK = 1024  # images searched and re-ranked at a time: (1024, 16, C) float32 gathered
_ANN_AXES = 64  # principal axes the embeddings are projected on for the graph (then made unit length)
_ANN_SAMPLE = 20_000  # images the axes are fitted on (a fixed draw)
_ANN_WANTED = 16  # neighbours the graph returns per image, re-ranked by their exact cosine
# The most alike others one image is asked for (16, then 64, then 256 while all returned are alike). Groups
# chain, so a clump needs no more to stay one group; all its pairs would cost clump-size squared (100,000
# scale images: 1,634 queries for 1,024 and 6 for 4,096; a million, 15 minutes for this search alone).
_ALIKE_MOST = 256
_HNSW_LINKS, _HNSW_BUILD, _HNSW_SEARCH = 32, 40, 64  # faiss's M, efConstruction, efSearch
_PIXEL_LINKS, _PIXEL_SEARCH = 16, 64  # the same for the 12 px thumbnails' graph (one nearest wanted)


@dataclass(frozen=True)
class Pair:
    first: int
    second: int
    similarity: float  # cosine of the two (centred) embeddings
    correlation: float | None  # best aligned pixel correlation (see aligned_correlation); None: not needed


@dataclass(frozen=True)
class Pairs:
    """Pairs of images as arrays, each pair once, first < second, sorted by (first, second)."""

    first: np.ndarray  # (P,) int64
    second: np.ndarray  # (P,) int64
    similarity: np.ndarray  # (P,) float32, cosine of the two (centred) embeddings; NaN: not computed
    correlation: np.ndarray  # (P,) float32, best aligned pixel correlation; NaN: not needed
    _COLUMNS: ClassVar[tuple[str, ...]] = ("first", "second", "similarity", "correlation")

    @classmethod
    def of(cls, first: Any, second: Any, similarity: Any = np.nan, correlation: Any = np.nan) -> Pairs:
        """The pairs (i, j), given either way round: each once (its first occurrence), none of an image with
        itself."""
        first, second = (np.asarray(side, dtype=np.int64).ravel() for side in (first, second))
        values = [
            np.broadcast_to(np.asarray(v, dtype=np.float32).ravel(), first.shape)
            for v in (similarity, correlation)
        ]
        low, high = np.minimum(first, second), np.maximum(first, second)
        order = np.lexsort((high, low))  # stable: a pair's first occurrence comes first
        low, high = low[order], high[order]
        new = np.ones(len(low), dtype=bool)
        new[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
        keep = new & (low != high)
        return cls(low[keep], high[keep], *(v[order][keep] for v in values))

    @classmethod
    def empty(cls) -> Pairs:
        return cls.of([], [])

    @classmethod
    def joined(cls, parts: Sequence[Pairs]) -> Pairs:
        """The pairs of all `parts`, each once (its first occurrence in `parts` order), sorted by one int64
        key a pair: beside the parts about 38 bytes a pair, output included. `of` on their columns
        concatenated took 74, the audit's peak at a million images (3.8 GB at the end of the embedding
        search, whose clumps of alike images gave 13 million pairs)."""
        parts = [part for part in parts if len(part)]
        if not parts:
            return cls.empty()
        n = max(int(part.second.max()) for part in parts) + 1
        keys = np.concatenate([part.keys(n) for part in parts])
        order = np.argsort(keys, kind="stable")  # stable: a pair's first occurrence comes first
        keys = keys[order]
        new = np.ones(len(keys), dtype=bool)
        new[1:] = keys[1:] != keys[:-1]
        keys, order = keys[new], order[new]
        values = (np.concatenate([getattr(part, name) for part in parts])[order] for name in cls._COLUMNS[2:])
        return cls(keys // n, keys % n, *values)

    def __len__(self) -> int:
        return len(self.first)

    def __iter__(self) -> Iterator[Pair]:
        """Each pair as a Pair: for reading a few (use the arrays for many)."""
        columns = (getattr(self, name).tolist() for name in self._COLUMNS)
        for i, j, similarity, correlation in zip(*columns, strict=True):
            yield Pair(i, j, similarity, None if math.isnan(correlation) else correlation)

    def where(self, mask: np.ndarray) -> Pairs:
        return Pairs(*(getattr(self, name)[mask] for name in self._COLUMNS))

    def keys(self, n: int) -> np.ndarray:
        """(P,) int64 first * n + second for `n` images: one sortable number per pair."""
        return self.first * n + self.second


def _tracked(n: int, size: int, desc: str) -> Iterator[tuple[int, int]]:
    """spans(n, size), logging progress (pipeline.progress) as each is done: a long pass never looks hung."""
    with progress(desc, n, "img") as bar:
        for start, stop in spans(n, size):
            yield start, stop
            bar.update(stop - start)


def _rows(array: Any, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of an array or memory-mapped file, as float32."""
    return read_rows(array, slice(start, stop))


def read_rows(array: Any, index: Any, dtype: Any = np.float32) -> np.ndarray:
    """array[index] as `dtype`, a copy in memory; a memory-mapped array's pages are then unmapped from this
    process (shards.release), so passes over a million rows leave no gigabytes of file pages in its RSS.

    A list of rows is read _GATHER_ROWS at a time, released after each: the kernel maps the whole page-cache
    folio around each row a read faults in (up to 2 MB for a file written in order), so 1,024 random rows of
    a million unit embeddings (2,560 bytes each) mapped 1.36 GB at once; the re-ranking threads' gathers took
    the audit at a million images to 4.3-4.6 GB of RSS."""
    if isinstance(index, np.ndarray) and index.ndim == 1 and len(index) > _GATHER_ROWS:
        rows = np.empty((len(index), *array.shape[1:]), dtype=dtype)
        for start, stop in spans(len(index), _GATHER_ROWS):
            rows[start:stop] = read_rows(array, index[start:stop], dtype)
        return rows
    rows = np.array(array[index], dtype=dtype)
    release(array)
    return rows


_GATHER_ROWS = 64  # at most 128 MB of file pages mapped by a read of scattered rows (no slower than 1,024)


def _centred(embeddings: np.ndarray) -> np.ndarray:
    """Unit embeddings centred on their mean: pooled post-ReLU features share a large common part that makes
    any two images look alike (random block patterns at 0.96-0.98; on Fashion-MNIST centring halved the other
    pairs at equal recall)."""
    return normalize(embeddings - embeddings.mean(axis=0))


def unit_embeddings(embeddings: Any, folder: Path | None = None) -> np.ndarray:
    """The centred unit embeddings (_centred): (N, C) float32 in memory; or with `folder`, float16 in a
    memory-mapped file there, made a block at a time (a million 1,280-d: 2.6 GB on disk, never 5 GB of float32
    at once). `embeddings` may itself be memory-mapped, in any float type."""
    if folder is None:
        return _centred(np.asarray(embeddings))
    n, channels = embeddings.shape
    total = sum(read_rows(embeddings, slice(a, b), np.float64).sum(axis=0) for a, b in spans(n, _BLOCK))
    mean = (total / n).astype(np.float32)
    unit = np.lib.format.open_memmap(folder / "unit.npy", mode="w+", dtype=np.float16, shape=(n, channels))
    for start, stop in spans(n, _BLOCK):
        unit[start:stop] = normalize(_rows(embeddings, start, stop) - mean)
        release(unit)
    return unit


def similar_pairs(
    embeddings: np.ndarray, threshold: float, neighbours: int, ann_above: int = ANN_ABOVE
) -> tuple[Pairs, Pairs]:
    """The pairs whose centred embeddings' cosine is at least `threshold`, and each image with its
    `neighbours` most similar others. An altered copy is its original's nearest neighbour even where the
    cosine itself is low (a JPEG of a 28 px image: 0.45-0.91), so the second set is ranked, not thresholded.
    Up to `ann_above` images from all pairs (exact); above, approximate (_ann_similar)."""
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        unit = unit_embeddings(embeddings, Path(tmp) if len(embeddings) > ann_above else None)
        return _similar(unit, threshold, neighbours, ann_above)


def _similar(unit: np.ndarray, threshold: float, neighbours: int, ann_above: int) -> tuple[Pairs, Pairs]:
    count = min(neighbours, len(unit) - 1)
    search = _ann_similar if len(unit) > ann_above else _exact_similar
    return search(unit, threshold, count)


def _exact_similar(unit: np.ndarray, threshold: float, count: int) -> tuple[Pairs, Pairs]:
    """similar_pairs from the cosines of all pairs, a block of rows at a time."""
    alike, nearest = [], []
    for start in range(0, len(unit), _BLOCK):
        block = unit[start : start + _BLOCK] @ unit.T  # (B, N)
        rows = np.arange(len(block))
        block[rows, rows + start] = -np.inf  # no image is its own pair or neighbour
        found_rows, cols = np.nonzero(block >= threshold)
        keep = cols > found_rows + start
        found_rows, cols = found_rows[keep], cols[keep]
        alike.append(Pairs.of(found_rows + start, cols, block[found_rows, cols]))
        if count >= 1:
            tops = np.argpartition(-block, count - 1, axis=1)[:, :count]  # (B, count)
            top_values = np.take_along_axis(block, tops, axis=1)
            nearest.append(Pairs.of(np.repeat(rows + start, count), tops, top_values))
    return Pairs.joined(alike), Pairs.joined(nearest or [Pairs.empty()])


def _ann_similar(unit: np.ndarray, threshold: float, count: int) -> tuple[Pairs, Pairs]:
    """similar_pairs from each image's _ANN_WANTED nearest in an HNSW graph over the embeddings projected on
    their principal axes, re-ranked by their exact cosine: its `count` first, and those at least `threshold`
    alike (asked again for 4x as many while every one returned is, up to _ALIKE_MOST: enough to chain a
    clump of alike images into one group, not all its pairs)."""
    n = len(unit)
    axes = _principal_axes(unit, _ANN_AXES)

    def project(rows: np.ndarray) -> np.ndarray:
        return normalize(rows if axes is None else rows @ axes)

    index = _graph((project(_rows(unit, a, b)) for a, b in spans(n, _ANN_BLOCK)), _HNSW_LINKS, n, "embedding")

    def block(start: int, stop: int) -> tuple[Pairs, Pairs]:
        ids, wanted = np.arange(start, stop), min(n, max(_ANN_WANTED, count + 1))
        queries = _rows(unit, start, stop)
        sims, cols = _reranked(index, unit, ids, queries, project(queries), wanted)
        found = sims[:, :count] > -np.inf
        nearest = Pairs.of(
            np.repeat(ids, count)[found.ravel()], cols[:, :count][found], sims[:, :count][found]
        )
        alike = []
        while len(ids):
            hit = sims >= threshold
            alike.append(Pairs.of(np.broadcast_to(ids[:, None], hit.shape)[hit], cols[hit], sims[hit]))
            full = hit.sum(axis=1) >= wanted - 1  # every other image returned is alike: there may be more
            if wanted >= min(n, _ALIKE_MOST) or not full.any():
                break
            ids, queries, wanted = ids[full], queries[full], min(n, _ALIKE_MOST, 4 * wanted)
            sims, cols = _reranked(index, unit, ids, queries, project(queries), wanted)
        return Pairs.joined(alike), nearest  # once: each round asked again for those the last one found

    blocks = _in_threads(n, "audit embedding neighbours", block)
    return Pairs.joined([alike for alike, _ in blocks]), Pairs.joined([nearest for _, nearest in blocks])


def _in_threads(n: int, desc: str, work: Callable[[int, int], Any]) -> list[Any]:
    """[work(start, stop) for each _ANN_BLOCK of `n` images] `_on_threads`, faiss on one thread in each (it
    releases the GIL; a graph answers concurrent searches). Searching a million images' graph a block at a
    time on faiss's own threads left a core idle while numpy re-ranked."""
    import faiss

    blocks, threads = spans(n, _ANN_BLOCK), faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _on_threads(blocks, [stop - start for start, stop in blocks], desc, lambda span: work(*span))
    finally:
        faiss.omp_set_num_threads(threads)


def _on_threads(
    tasks: Sequence[Any], sizes: Sequence[int], desc: str, work: Callable[[Any], Any]
) -> list[Any]:
    """[work(task) for task in tasks] on a thread per core, BLAS on one thread in each (numpy's products
    release the GIL; OpenBLAS's own threads on small products waited on each other); progress logged by the
    tasks' `sizes` (images)."""
    from threadpoolctl import threadpool_limits

    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        progress(desc, int(sum(sizes)), "img") as bar,
    ):
        results = []
        for size, result in zip(sizes, pool.map(work, tasks), strict=True):
            results.append(result)
            bar.update(size)
    return results


def _reranked(
    index: Any, unit: np.ndarray, ids: np.ndarray, queries: np.ndarray, projected: np.ndarray, wanted: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B, wanted) exact cosines of the `wanted` images the graph returns for each query, most alike first,
    and those images; -inf and -1 for the query itself and for none. A few queries at a time when many are
    wanted: at most (_ANN_BLOCK * _ANN_WANTED, C) embeddings gathered at once."""
    import faiss

    search = faiss.SearchParametersHNSW(efSearch=max(_HNSW_SEARCH, wanted))
    sims, cols = np.empty((len(ids), wanted), np.float32), np.empty((len(ids), wanted), np.int64)
    for a, b in spans(len(ids), max(1, _ANN_BLOCK * _ANN_WANTED // wanted)):
        _, found = index.search(np.ascontiguousarray(projected[a:b]), wanted, params=search)  # -1: none
        missing = (found < 0) | (found == ids[a:b, None])
        found = np.where(missing, ids[a:b, None], found)
        gathered = read_rows(unit, found.ravel()).reshape(*found.shape, -1)
        values = np.matmul(gathered, queries[a:b, :, None])[..., 0]
        values[missing] = -np.inf
        order = np.argsort(-values, axis=1, kind="stable")
        sims[a:b] = np.take_along_axis(values, order, axis=1)
        cols[a:b] = np.take_along_axis(np.where(missing, -1, found), order, axis=1)
    return sims, cols


def _principal_axes(unit: np.ndarray, dims: int) -> np.ndarray | None:
    """(C, dims) float32, the axes that keep most of the embeddings' energy (eigenvectors of the second
    moment of a fixed draw of _ANN_SAMPLE of them); None when they have `dims` dimensions or fewer."""
    from scipy.linalg import eigh

    n, channels = unit.shape
    if channels <= dims:
        return None
    rows = np.sort(np.random.default_rng(0).choice(n, min(n, _ANN_SAMPLE), replace=False))
    sample = read_rows(unit, rows)
    # only the largest: 0.6 s for 1,280 channels, where numpy's full float32 eigh took 13 s on 2 busy cores
    _, vectors = eigh(sample.T @ sample, subset_by_index=[channels - dims, channels - 1])  # ascending
    return np.ascontiguousarray(vectors[:, ::-1], dtype=np.float32)


def _graph(blocks: Iterable[np.ndarray], links: int, total: int, desc: str) -> Any:
    """An HNSW graph (faiss, inner product; `links`: its M) over the rows of `blocks`, built on one thread:
    the same graph on every run (several threads insert in a varying order; on 2 busy cores one was no
    slower)."""
    import faiss

    index, threads = None, faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with progress(f"audit {desc} graph", total, "img") as bar:
            for block in blocks:
                if index is None:
                    index = faiss.IndexHNSWFlat(block.shape[1], links, faiss.METRIC_INNER_PRODUCT)
                    index.hnsw.efConstruction = _HNSW_BUILD
                    _reserve(index, total, links)
                index.add(np.ascontiguousarray(block, dtype=np.float32))
                bar.update(len(block))
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def _reserve(index: Any, total: int, links: int) -> None:
    """Room in an empty HNSW graph for `total` rows: faiss grows its vectors and links by doubling as blocks
    arrive, so near the end a million images' graph was up to three times its size at once (+1.2 GB at
    the audit's peak); a std::vector keeps its capacity when shrunk back. Links: 2 * `links` per image at
    the lowest level, `links` at each level above, which 1 in `links - 1` images reach on average."""
    import faiss

    storage = faiss.downcast_index(index.storage)
    for vector, size in (
        (storage.codes, total * storage.code_size),
        (index.hnsw.neighbors, total * (2 * links + 2)),
    ):
        vector.resize(size)
        vector.resize(0)


# Pixel comparison: grey thumbnails, lightly blurred so resampling differences do not count; one image may be
# a crop of the other (or of its mirror image) down to 1 / 1.2 = 83% of each side, at any position.
_THUMB = 48
_BLUR = 0.7  # px, Gaussian sigma at _THUMB
_ZOOMS = tuple(round(1.0 + 0.02 * k, 2) for k in range(11))  # 1.00 .. 1.20
_PIXEL_SIDE = 12  # pixel_nearest compares thumbnails shrunk to 12 x 12 (4 x 4 boxes)
_PIXEL_TASK_BYTES = 32 * 2**20  # a task's windows, or its templates, at most (aligned_correlation)


def thumbnail(path: Path) -> np.ndarray:
    """The image as a (_THUMB, _THUMB) uint8 grey array, EXIF-oriented and lightly blurred."""
    from PIL import ImageFilter

    from pipeline.data.images import open_reduced

    image = open_reduced(path, _THUMB).convert("L").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(_BLUR)), dtype=np.uint8)


def thumbnails(files: Sequence[Path], folder: Path | None = None) -> np.ndarray:
    """(N, _THUMB, _THUMB) uint8 thumbnails of `files`: in memory; or with `folder`, in a memory-mapped file
    there (2.3 GB for a million)."""
    shape = (len(files), _THUMB, _THUMB)
    if folder is None:
        thumbs = np.empty(shape, dtype=np.uint8)
    else:
        thumbs = np.lib.format.open_memmap(folder / "thumbs.npy", mode="w+", dtype=np.uint8, shape=shape)

    def fill(span: tuple[int, int]) -> None:
        for k in range(*span):
            thumbs[k] = thumbnail(files[k])

    # PIL releases the GIL while decoding and resizing: a thread per core, a few hundred images per task.
    tasks = spans(len(files), 256)
    with (
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        progress("audit thumbnails", len(files), "img") as bar,
    ):
        for (start, stop), _ in zip(tasks, pool.map(fill, tasks), strict=True):
            release(thumbs)
            bar.update(stop - start)
    return thumbs


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each row minus its mean, divided by its norm: a dot product of two such rows is their correlation."""
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


def _grey(thumb: np.ndarray) -> np.ndarray:
    return np.asarray(thumb, dtype=np.float32)


@functools.cache
def _resize_matrix(size: int, side: int) -> np.ndarray:
    """(side, size) float32: PIL's bilinear resize of `size` pixels to `side` as a matrix, each column the
    resize of a unit pixel, so that R @ X @ R.T is PIL's resize of a (size, size) float image X, and a batch
    of thumbnails is resized by two matrix products (the bilinear filter is separable and linear)."""
    units = np.eye(size, dtype=np.float32)
    columns = [
        np.asarray(Image.fromarray(units[k : k + 1]).resize((side, 1), Image.Resampling.BILINEAR))[0]
        for k in range(size)
    ]
    return np.stack(columns, axis=1)


def _sides(size: int) -> list[int]:
    return [round(size * zoom) for zoom in _ZOOMS]


def _window_count(size: int) -> int:
    return sum((side - size + 1) ** 2 for side in _sides(size))


def _windows(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every window of the thumbnails' side (S) in each (B, S, S) float32 thumbnail enlarged by each of
    _ZOOMS: (B, W, S ** 2) rows of pixels, and (B, W) each row's norm once its mean is taken off (a row's dot
    product with a standardised template, divided by that norm, is their correlation), from running sums
    of the enlarged pixels and their squares rather than from the rows."""
    from numpy.lib.stride_tricks import sliding_window_view

    count, size = grey.shape[0], grey.shape[1]
    rows = np.empty((count, _window_count(size), size * size), dtype=np.float32)
    norms = np.empty(rows.shape[:2], dtype=np.float32)
    start = 0
    for side in _sides(size):
        resize = _resize_matrix(size, side)
        big = resize @ grey @ resize.T  # (B, side, side)
        places = side - size + 1
        block = rows[:, start : start + places * places].reshape(count, places, places, size, size)
        block[...] = sliding_window_view(big, (size, size), axis=(1, 2))  # one copy, straight into place
        sums = _window_sums(big.astype(np.float64), size)
        squares = _window_sums(np.square(big, dtype=np.float64), size)
        centred = np.sqrt(np.maximum(squares - sums * sums / (size * size), 0.0))
        norms[:, start : start + places * places] = centred.reshape(count, -1)
        start += places * places
    return rows, np.maximum(norms, 1e-6)


def _window_sums(values: np.ndarray, size: int) -> np.ndarray:
    """(B, P, P) sums of every (size, size) window of (B, side, side) `values` (P = side - size + 1)."""
    total = np.zeros((values.shape[0], values.shape[1] + 1, values.shape[2] + 1), dtype=np.float64)
    total[:, 1:, 1:] = values.cumsum(axis=1).cumsum(axis=2)
    return (
        total[:, size:, size:] - total[:, :-size, size:] - total[:, size:, :-size] + total[:, :-size, :-size]
    )


def aligned_correlation(
    thumbs: Mapping[int, np.ndarray] | np.ndarray, pairs: Any, halved: bool = False
) -> np.ndarray:
    """(P,) float32: for each pair ((P, 2) indices into `thumbs`), the highest pixel correlation of one
    thumbnail (or its mirror image) with any window of the other one enlarged by up to 1.2x, trying both ways
    round: 1.0 for the same picture re-encoded, resized, brightened or flipped, and close to it for a crop of
    it. `halved`: on the thumbnails shrunk to half their side (2 x 2 box means), 14 times fewer window pixels.

    Each thumbnail's windows are made once, for every thumbnail it is paired with either way round, a batch
    of thumbnails at a time (_windows: the resizes are matrix products, the windows one copy) on a thread per
    core, each matrix product on one BLAS thread (OpenBLAS's own threads on such small products waited on
    each other). Thumbnails are batched by how many others they are paired with, so a thumbnail paired with
    hundreds (a plain background is many images' nearest) does not pad the others' templates. One thumbnail
    at a time, with PIL resizing each, ran at 750 thumbnails/s at half side on 2 cores (100,000 images)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    big, small = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.argsort(big, kind="stable")
    starts = np.flatnonzero(np.diff(big[order], prepend=-1))
    stops = np.append(starts[1:], len(order))
    by_count = np.argsort(stops - starts, kind="stable")  # thumbnails paired with few others first
    scores = np.empty(len(big), dtype=np.float32)
    size = _THUMB // 2 if halved else _THUMB
    row_bytes = 4 * size * size

    def gather(ids: np.ndarray) -> np.ndarray:
        if isinstance(thumbs, np.ndarray):  # memory-mapped above ANN_ABOVE images
            grey = read_rows(thumbs, ids)
        else:
            grey = _grey(np.stack([np.asarray(thumbs[k]) for k in ids.tolist()]))
        return grey.reshape(len(ids), size, 2, size, 2).mean(axis=(2, 4)) if halved else grey

    def score(task: np.ndarray) -> None:
        counts = stops[task] - starts[task]
        rows, norms = _windows(gather(big[order[starts[task]]]))
        wanted = np.zeros((len(task), int(counts.max()) * 2, size * size), dtype=np.float32)
        partners = np.concatenate([order[a:b] for a, b in zip(starts[task], stops[task], strict=True)])
        templates = gather(small[partners])
        both = np.stack([templates, templates[:, :, ::-1]], axis=1)  # (P, 2, S, S): as is, and mirrored
        standardised = _standardised(both.reshape(-1, size * size)).reshape(-1, 2, size * size)
        slots = np.concatenate([np.arange(c) for c in counts.tolist()])
        owner = np.repeat(np.arange(len(task)), counts)
        wanted[owner, 2 * slots] = standardised[:, 0]
        wanted[owner, 2 * slots + 1] = standardised[:, 1]
        best = (np.matmul(rows, wanted.transpose(0, 2, 1)) / norms[:, :, None]).max(axis=1)  # (B, 2T)
        scores[partners] = best.reshape(len(task), -1, 2).max(axis=2)[owner, slots]

    tasks = _pixel_tasks(stops - starts, by_count, _window_count(size) * row_bytes, row_bytes)
    _on_threads(
        tasks,
        [len(task) for task in tasks],
        f"audit pixel check ({'half' if halved else 'full'} side)",
        score,
    )
    return np.maximum(scores[: len(pairs)], scores[len(pairs) :])


def _pixel_tasks(counts: np.ndarray, by_count: np.ndarray, window_bytes: int, row_bytes: int) -> list:
    """Runs of `by_count` (thumbnails in order of how many others each is paired with, `counts`), each as
    long as keeps its windows (`window_bytes` a thumbnail) and its templates padded to the widest (two rows
    of `row_bytes` a partner) within _PIXEL_TASK_BYTES each; one thumbnail at least."""
    tasks, start = [], 0
    for end in range(1, len(by_count) + 1):
        if end < len(by_count):
            widest = 2 * int(counts[by_count[end]]) * row_bytes
            if (end + 1 - start) * max(window_bytes, widest) <= _PIXEL_TASK_BYTES:
                continue
        tasks.append(by_count[start:end])
        start = end
    return tasks


def _shrunk(thumbs: np.ndarray, mirrored: bool = False) -> np.ndarray:
    """(B, _PIXEL_SIDE ** 2) standardised pixels of thumbnails shrunk to _PIXEL_SIDE px (box means), or of
    their mirror images."""
    n, box = len(thumbs), _THUMB // _PIXEL_SIDE
    small = _grey(thumbs).reshape(n, _PIXEL_SIDE, box, _PIXEL_SIDE, box).mean(axis=(2, 4))
    return _standardised((small[:, :, ::-1] if mirrored else small).reshape(n, -1))


def pixel_nearest(thumbs: np.ndarray, ann_above: int = ANN_ABOVE) -> Pairs:
    """Each image with the other whose thumbnail, shrunk to _PIXEL_SIDE px, correlates most with its own or
    with its mirror image. A re-encoded, resized, brightened or mirrored copy is its original's nearest by
    pixels even where other products of its kind embed closer: of 300 JPEG copies of 28 px Fashion-MNIST
    images (five draws of audit_near_duplicates), all were their original's nearest by pixels and 272 among
    its 5 nearest embeddings. Up to `ann_above` images from all pairs (exact); above, from an HNSW graph."""
    n = len(thumbs)
    if n > ann_above:
        return _ann_pixel_nearest(thumbs)
    plain = np.concatenate([_shrunk(thumbs[a:b]) for a, b in spans(n, _BLOCK)])
    mirrored = np.concatenate([_shrunk(thumbs[a:b], mirrored=True) for a, b in spans(n, _BLOCK)])
    nearest = []
    for start in range(0, n, _BLOCK):
        rows = plain[start : start + _BLOCK]
        block = np.maximum(rows @ plain.T, rows @ mirrored.T)  # (B, N)
        block[np.arange(len(block)), np.arange(len(block)) + start] = -np.inf
        nearest.append(Pairs.of(np.arange(len(block)) + start, block.argmax(axis=1)))
    return Pairs.joined(nearest)


def _ann_pixel_nearest(thumbs: np.ndarray) -> Pairs:
    """pixel_nearest by an HNSW graph over the shrunk thumbnails: each image's two nearest by its pixels and
    by its mirror image's, the best of the four other than itself."""
    n = len(thumbs)
    import faiss

    index = _graph((_shrunk(_rows(thumbs, a, b)) for a, b in spans(n, _ANN_BLOCK)), _PIXEL_LINKS, n, "pixel")
    search = faiss.SearchParametersHNSW(efSearch=_PIXEL_SEARCH)

    def block(start: int, stop: int) -> Pairs:
        ids = np.arange(start, stop)
        found = [
            index.search(_shrunk(_rows(thumbs, start, stop), mirror), 2, params=search)
            for mirror in (False, True)
        ]
        scores, cols = (np.concatenate(side, axis=1) for side in zip(*found, strict=True))  # (B, 4)
        scores[(cols < 0) | (cols == ids[:, None])] = -np.inf
        best = scores.argmax(axis=1)
        ok = scores[ids - start, best] > -np.inf
        return Pairs.of(ids[ok], cols[ids - start, best][ok])

    return Pairs.joined(_in_threads(n, "audit pixel neighbours", block))


def near_duplicate_pairs(
    embeddings: np.ndarray, files: Sequence[Path], audit: AuditParams, ann_above: int = ANN_ABOVE
) -> Pairs:
    """Pairs whose embeddings are at least `audit.similarity` alike, and pairs whose pixels correlate at least
    `audit.pixel_correlation` once aligned (aligned_correlation) among two kinds of candidates: an image and
    one of its `audit.neighbours` nearest others by embedding, and an image and its nearest other by pixels
    (pixel_nearest). Above `ann_above` images the neighbours are approximate, and the thumbnails and centred
    embeddings are kept in memory-mapped temporary files."""
    if len(files) < 2:
        return Pairs.empty()
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        thumbs = thumbnails(files, Path(tmp) if len(files) > ann_above else None)
        return near_duplicates(embeddings, thumbs, audit, ann_above)


def near_duplicates(
    embeddings: Any, thumbs: np.ndarray, audit: AuditParams, ann_above: int = ANN_ABOVE
) -> Pairs:
    """near_duplicate_pairs of images whose thumbnails are made: (N, _THUMB, _THUMB) uint8 (`thumbnails`)."""
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        unit = unit_embeddings(embeddings, Path(tmp) if len(embeddings) > ann_above else None)
        alike, candidates = candidate_pairs(unit, thumbs, audit, ann_above)
        return verified(unit, thumbs, alike, candidates, audit.pixel_correlation)


def candidate_pairs(
    unit: np.ndarray, thumbs: np.ndarray, audit: AuditParams, ann_above: int = ANN_ABOVE
) -> tuple[Pairs, Pairs]:
    """The pairs alike enough by their centred unit embeddings (`unit_embeddings`) alone, and the others to
    compare pixel by pixel: an image and one of its `audit.neighbours` nearest by embedding or its nearest by
    pixels."""
    n = len(unit)
    alike, nearest = _similar(unit, audit.similarity, audit.neighbours, ann_above)
    keys = np.union1d(nearest.keys(n), pixel_nearest(thumbs, ann_above).keys(n))
    keys = np.setdiff1d(keys, alike.keys(n), assume_unique=True)
    return alike, Pairs.of(keys // n, keys % n)


# The pixel check runs twice: every candidate at half the thumbnail's side (14 times fewer window pixels),
# then at full side only those within this margin of the threshold. Of 1,601 copies at 0.995 or more (1,000
# altered Fashion-MNIST images: crop, resize, JPEG, brightness, mirror; 1,000 of benchmarks/scale.py's
# altered images), the half-side check was at most 0.022 below (a 90% crop); it left 37% of 13,500
# non-copies, each image's three nearest by pixels, for the full check.
_HALF_SIDE_MARGIN = 0.04


def verified(
    unit: np.ndarray, thumbs: np.ndarray, alike: Pairs, candidates: Pairs, threshold: float
) -> Pairs:
    """`alike` and those of the `candidates` whose pixels correlate at least `threshold` once aligned, with
    their cosine."""
    pairs = np.stack([candidates.first, candidates.second], axis=1)
    correlation = aligned_correlation(thumbs, pairs, halved=True)
    close = correlation >= threshold - _HALF_SIDE_MARGIN
    correlation[close] = aligned_correlation(thumbs, pairs[close])
    passed = correlation >= threshold
    first, second = candidates.first[passed], candidates.second[passed]
    flagged = Pairs.of(first, second, _cosines(unit, first, second), correlation[passed])
    return Pairs.joined([alike, flagged])


def _cosines(unit: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P,) float32 cosines of the pairs' unit embeddings, a block of pairs at a time."""
    parts = [np.empty(0, dtype=np.float32)]
    for a, b in spans(len(first), _BLOCK):
        left, right = (read_rows(unit, side[a:b]) for side in (first, second))
        parts.append(np.einsum("ij,ij->i", left, right))
    return np.concatenate(parts)


def group_ids(keys: Sequence[str], pairs: Pairs) -> list[str]:
    """Each image's group: the smallest key (sha256) among the images its pairs connect it to. Equal keys
    (identical files) are always one group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(keys)
    first_of: dict[str, int] = {}
    same = np.array([first_of.setdefault(key, i) for i, key in enumerate(keys)], dtype=np.int64)
    rows, cols = np.concatenate([np.arange(n), pairs.first]), np.concatenate([same, pairs.second])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest: dict[int, str] = {}
    for key, c in zip(keys, component.tolist(), strict=True):
        smallest[c] = min(smallest.get(c, key), key)
    return [smallest[c] for c in component.tolist()]


def probe(n: int):
    """Standardised embeddings -> logistic regression whose penalty per image is fixed: C = 15 / n. sklearn
    sums the loss over the n images, so a fixed C regularises small sets hard and large ones barely. 15 / n
    (C = 0.0025 at 6,000 images) gave the best F1 of the flagged images on 6,000 Fashion-MNIST images with 5%
    flipped labels (0.71; 0.66 at C = 0.01) and the best out-of-fold accuracy (0.87 on the clean images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=15.0 / max(n, 1), max_iter=300))


# Up to this many images the label-issue probe is scikit-learn's logistic regression; above, a linear
# discriminant computed a block of rows at a time (discriminant_probabilities). The regression's cost grows
# as images x classes x iterations and it holds the data in float64 more than once (a million images of
# 1,000 classes: some 25 GB); the discriminant's is two passes over the rows. On the three 6,000-image draws
# of audit_label_noise (5% flipped) the discriminant's flags scored F1 0.738 / 0.749 / 0.763 against the
# regression's 0.714 / 0.731 / 0.752, in 3.4 s instead of 15 s; the regression stays below, where a 1,280-d
# covariance has too few images to be estimated (the bundled sample: 1,200).
PROBE_ABOVE = 50_000
_LDA_SHRINKAGE = 0.1  # share of the within-class covariance replaced by its diagonal (see discriminant_...)
_PROBE_BLOCK = BLOCK_ROWS  # rows read, and probabilities written, at a time
_TEMPERATURE_SAMPLE = 10_000  # images whose out-of-fold logits fit the discriminant's temperature


def out_of_fold_probabilities(
    embeddings: Any, labels: np.ndarray, folds: int, seed: int, folder: Path | None = None
) -> np.ndarray:
    """(N, K) class probabilities of each image from a linear probe that never saw it (k-fold): the logistic
    regression (_probe) up to PROBE_ABOVE images, a linear discriminant above (discriminant_probabilities:
    float32, memory-mapped in `folder` when one is given)."""
    if len(labels) > PROBE_ABOVE:
        return discriminant_probabilities(embeddings, labels, folds, seed, folder=folder)
    from sklearn.model_selection import cross_val_predict

    data = np.asarray(embeddings, dtype=np.float32)
    splitter = _folds(folds, seed)
    return cross_val_predict(probe(len(labels)), data, labels, cv=splitter, method="predict_proba")


def _folds(folds: int, seed: int) -> Any:
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) int8: each image's fold in the probe's stratified k-fold split."""
    assignment = np.empty(len(labels), dtype=np.int8)
    for fold, (_, held) in enumerate(_folds(folds, seed).split(np.zeros(len(labels)), labels)):
        assignment[held] = fold
    return assignment


def discriminant_probabilities(
    embeddings: Any,
    labels: np.ndarray,
    folds: int,
    seed: int,
    shrinkage: float = _LDA_SHRINKAGE,
    folder: Path | None = None,
) -> np.ndarray:
    """(N, K) float32 out-of-fold probabilities of linear discriminant analysis: each class a Gaussian around
    its mean with one covariance shared by all classes (the within-class covariance, a `shrinkage` share of
    it replaced by its diagonal), priors from the class counts. Two passes over the rows, a block at a time:
    one sums each fold's class means and scatter (K x C and C x C per fold, however many images), one writes
    the probabilities, each fold's rows from the model of the other folds. Time grows as N x C x (C + K),
    memory as K x C and the output (memory-mapped in `folder` when given). With shrinkage 0 it is
    scikit-learn's LinearDiscriminantAnalysis(solver="lsqr") fitted on the other folds."""
    n, channels = embeddings.shape
    classes, assignment = int(labels.max()) + 1, fold_of(labels, folds, seed)
    sums, counts = np.zeros((folds, classes, channels)), np.zeros((folds, classes))
    scatter = np.zeros((folds, channels, channels))
    for start, stop in _tracked(n, _PROBE_BLOCK, "audit label probe (class statistics)"):
        rows, y, fold = (
            _rows(embeddings, start, stop).astype(np.float64),
            labels[start:stop],
            assignment[start:stop],
        )
        for k in range(folds):
            mine = fold == k
            scatter[k] += rows[mine].T @ rows[mine]
            np.add.at(counts[k], y[mine], 1)
            sums[k] += _class_sums(rows[mine], y[mine], classes)
    models = [
        _discriminant(
            sums.sum(0) - sums[k], counts.sum(0) - counts[k], scatter.sum(0) - scatter[k], shrinkage
        )
        for k in range(folds)
    ]
    temperature = _temperature(embeddings, labels, assignment, models, seed)
    if folder is None:
        out = np.empty((n, classes), dtype=np.float32)
    else:
        out = np.lib.format.open_memmap(
            folder / "probabilities.npy", mode="w+", dtype=np.float32, shape=(n, classes)
        )
    for start, stop in _tracked(n, _PROBE_BLOCK, "audit label probe (probabilities)"):
        out[start:stop] = softmax(
            _logits(embeddings, np.arange(start, stop), assignment, models), temperature
        )
        release(out)
    return out


def _logits(embeddings: Any, rows: np.ndarray, assignment: np.ndarray, models: list) -> np.ndarray:
    """(R, K) logits of `rows` (sorted), each from the model of the folds it is not in."""
    data = read_rows(embeddings, rows, np.float64)
    logits = np.empty((len(rows), models[0][1].shape[0]))
    for k, (weights, bias) in enumerate(models):
        mine = assignment[rows] == k
        logits[mine] = data[mine] @ weights + bias
    return logits


def _temperature(
    embeddings: Any, labels: np.ndarray, assignment: np.ndarray, models: list, seed: int
) -> float:
    """The temperature that makes the out-of-fold probabilities of a fixed draw of images likeliest (their
    given labels): a Gaussian model's posteriors are overconfident, and cleanlab's count of issues compares
    each image's confidence with its class's mean (uncalibrated, 913 images flagged for 300 flipped, 487
    by the logistic regression)."""
    draw = np.sort(np.random.default_rng(seed).permutation(len(labels))[:_TEMPERATURE_SAMPLE])
    logits = np.concatenate(
        [_logits(embeddings, draw[a:b], assignment, models) for a, b in spans(len(draw), _PROBE_BLOCK)]
    )
    return fit_temperature(logits, labels[draw]).temperature


def _class_sums(rows: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    """(K, C) sums of `rows` by class `y` (a sparse one-hot product: time grows with the rows, not K)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(y)), (y, np.arange(len(y)))), shape=(classes, len(y)))
    return np.asarray(onehot @ rows)


def _discriminant(
    sums: np.ndarray, counts: np.ndarray, scatter: np.ndarray, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    """(C, K) weights and (K,) biases of the discriminant whose class sums, counts and scatter (sum of x x^T)
    are given: logit_k(x) = x . S^-1 m_k - m_k . S^-1 m_k / 2 + log prior_k."""
    n = counts.sum()
    means = sums / np.maximum(counts, 1)[:, None]
    within = (scatter - (sums.T / np.maximum(counts, 1)) @ sums) / n  # sum_k prior_k cov_k
    within = (1 - shrinkage) * within + shrinkage * np.diag(np.diag(within))
    weights = np.linalg.lstsq(within, means.T, rcond=None)[0]  # as sklearn's lsqr solver
    bias = -0.5 * np.einsum("kc,ck->k", means, weights) + np.log(np.maximum(counts, 1e-12) / n)
    return weights, bias


@dataclass(frozen=True)
class LabelIssues:
    ranked: np.ndarray  # indices of the likely label errors, most likely first
    quality: (
        np.ndarray
    )  # (N,) cleanlab's label quality score: probability of the given label (self-confidence)
    suggested: np.ndarray  # (N,) class index the classifier prefers


def label_issues(labels: np.ndarray, probabilities: Any) -> LabelIssues:
    """cleanlab on out-of-sample probabilities: the images whose given label gets the lowest probability
    (self-confidence), as many as the confident joint's off-diagonal counts (`count.num_label_issues`), most
    likely first. On 6,000 Fashion-MNIST images with 5% flipped labels (seed 42) that gave F1 0.71 (precision
    0.58, recall 0.93) where filter_by="both" gave 0.61: the probe's ranking was good (its top 300 held 251
    flips) but "both" flagged 558 images; held-out draws: benchmarks/README.md.

    What cleanlab's find_label_issues(filter_by="low_self_confidence") returns, computed a block of rows at a
    time (`probabilities` may be memory-mapped: a million images of 1,000 classes are 4 GB): one pass for each
    image's self-confidence and preferred class (the per-class confident thresholds are their class means),
    one for the confident joint's off-diagonal images (cleanlab's compute_confident_joint on each block, with
    those thresholds)."""
    from cleanlab.count import compute_confident_joint
    from cleanlab.internal.constants import CONFIDENT_THRESHOLDS_LOWER_BOUND, FLOATING_POINT_COMPARISON

    n, classes = probabilities.shape
    quality, suggested = np.empty(n), np.empty(n, dtype=np.int64)
    for start, stop in spans(n, _PROBE_BLOCK):
        block = read_rows(probabilities, slice(start, stop), np.float64)
        quality[start:stop] = block[np.arange(stop - start), labels[start:stop]]
        suggested[start:stop] = block.argmax(axis=1)
    present = np.bincount(labels, minlength=classes)
    thresholds = np.where(present > 0, np.bincount(labels, quality, classes) / np.maximum(present, 1), 2.0)
    thresholds = np.clip(thresholds, CONFIDENT_THRESHOLDS_LOWER_BOUND, None)
    count = 0
    for start, stop in spans(n, _PROBE_BLOCK):
        block, given = read_rows(probabilities, slice(start, stop), np.float64), labels[start:stop]
        _, off = compute_confident_joint(given, block, thresholds=thresholds, calibrate=False,
                                         return_indices_of_off_diagonals=True)  # fmt: skip
        off = np.asarray(off, dtype=np.int64)
        bumped = block[off].copy()
        bumped[np.arange(len(off)), given[off]] += FLOATING_POINT_COMPARISON  # as cleanlab's _reduce_issues
        count += int((bumped.argmax(axis=1) != given[off]).sum())
    ranked = np.argsort(quality, kind="stable")[:count]
    return LabelIssues(ranked, quality, suggested)


def usable_folds(labels: np.ndarray, folds: int) -> int:
    """Folds every class can fill (one image of each class per fold at least); 0 when a class has one."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    return min(folds, smallest) if smallest >= 2 else 0


_DRIFT_SAMPLE = 20_000  # images of each side the drift classifier sees at most: AUC's standard error ~0.003


def two_sample_auc(embeddings: Any, old: np.ndarray, new: np.ndarray, folds: int, seed: int) -> float:
    """Cross-validated ROC AUC of a classifier telling the `new` rows of `embeddings` from the `old` ones
    (boolean masks; equal numbers of each, at most _DRIFT_SAMPLE: a million rows would be 10 GB in float64
    and the figure no better): 0.5 when they come from one distribution, towards 1 as they drift apart."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(seed)
    old_rows, new_rows = np.flatnonzero(old), np.flatnonzero(new)
    n = min(len(old_rows), len(new_rows), _DRIFT_SAMPLE)
    rows = np.concatenate([rng.permutation(old_rows)[:n], rng.permutation(new_rows)[:n]])
    order = np.argsort(rows, kind="stable")  # read a memory-mapped array in file order
    data = np.empty((2 * n, embeddings.shape[1]), dtype=np.float32)
    data[order] = read_rows(embeddings, rows[order])
    target = np.repeat([0, 1], n)
    splitter = StratifiedKFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(probe(len(target)), data, target, cv=splitter, scoring="roc_auc")))


def prior_shift(old: dict[str, int], new: dict[str, int]) -> float:
    """Total variation distance between two class distributions (0: same priors, 1: disjoint classes)."""
    classes = sorted(set(old) | set(new))
    p = np.array([old.get(c, 0) for c in classes], dtype=float)
    q = np.array([new.get(c, 0) for c in classes], dtype=float)
    return float(0.5 * np.abs(p / max(p.sum(), 1) - q / max(q.sum(), 1)).sum())

"""uint8 image cache: every image decoded and resized once, then every epoch augments from memory.

The cache holds, per image, a square of side floor(size / crop_pct) made by `preprocess.resized_square`, whose
center the eval preprocessing crops: CenterCrop(size) of the square is byte-for-byte the eval crop, whatever
the image's shape, in memory bounded by its size. Training crops and flips come from the full square;
validation is its center.
Images are decoded reduced (`images.open_reduced`: a JPEG at a smaller DCT scale, others box-reduced, by a
factor that keeps at least twice the square's side): a smaller image's crop is the eval crop exactly, a larger
one's differs by a few grey levels (4000x3000 photos: mean 0.3, at most 2).

On disk it is content-addressed: one folder per resize setting holds the square of every image ever cached
with it, each keyed by a digest of the setting and the image's identity (relative path + sha256), in shards
of `_SHARD_BYTES` written as they fill (`data.shards`), so a kill keeps every finished shard and an image is
decoded once for every set that holds it (the audit's usable images, train's split, the next run's). An
image set is a small file under `sets/`: each image's key, shard and row (24 bytes an image). Experiments that
change only training params reuse it all. Readers (DataLoader workers too) read just the squares they need.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.images import open_reduced
from pipeline.data.shards import ShardRows, ShardStore, digests
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.preprocess import resize_side, resized_square, to_rgb
from pipeline.progress import progress

log = logging.getLogger(__name__)

# Bump when the cached pixels would change for the same key inputs (4: shards; 3: a file a set).
_FORMAT_VERSION = 4
# Bytes a shard holds: what a kill can lose, and what a shard being written maps. 512 MiB: 2,700 images at
# 224 px (256 px squares), 33,000 at 64 px (73 px squares); a million at 224 px make 370 shards.
_SHARD_BYTES = 512 * 2**20


def cache_side(data_config: dict[str, Any]) -> int:
    """Side of the cached square: the eval resize target, floor(size / crop_pct)."""
    size = int(data_config["input_size"][-1])
    return max(size, resize_side(size, float(data_config["crop_pct"])))


def _settings(data_config: dict[str, Any]) -> str:
    """What makes an image's square, besides its bytes, as a key."""
    spec = {
        "size": int(data_config["input_size"][-1]),
        "side": cache_side(data_config),
        "interpolation": data_config["interpolation"],
        "version": _FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def identity(path: str, sha256: str) -> str:
    """An image's identity in the cache: its path relative to the data root and the sha256 of its bytes."""
    return f"{path}:{sha256}"


def cache_key(identities: Sequence[str], data_config: dict[str, Any]) -> str:
    """The key of an image set: its images' identities, in order, and the resize settings."""
    spec = json.dumps([_settings(data_config), list(identities)])
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def cache_path(cache_dir: Path, identities: Sequence[str], data_config: dict[str, Any]) -> Path:
    """The image set's file, for `open_cache`."""
    return _folder(cache_dir, data_config) / "sets" / f"{cache_key(identities, data_config)}.npz"


def _folder(cache_dir: Path, data_config: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"images-{_settings(data_config)}"


def cached_square(img: Image.Image, data_config: dict[str, Any]) -> np.ndarray:
    """(3, side, side) uint8 whose centered (size x size) crop equals the eval preprocessing's crop of `img`:
    RGB, or grey ("L"), which is resized as one channel then repeated, the bytes its RGB conversion gives.
    Memory is bounded by the image's size whatever its shape (`resized_square`: a 1 KB PNG of 20000 x 16 px
    took 347 MB and 0.65 s resized whole at 224 px; 1 MB and 7 ms now)."""
    size = int(data_config["input_size"][-1])
    side = resize_side(size, float(data_config["crop_pct"]))
    square = np.asarray(resized_square(img, size, side, data_config["interpolation"]), dtype=np.uint8)
    if square.ndim == 2:
        return np.repeat(square[None], 3, axis=0)
    return np.ascontiguousarray(square.transpose(2, 0, 1))


def square_of(img: Image.Image, data_config: dict[str, Any]) -> np.ndarray:
    """The cached square of `img` as `images.open_reduced(file, cache_side(data_config))` gives it."""
    return cached_square(to_rgb(img, keep_grey=True), data_config)


class Prefill:
    """Squares made elsewhere (ingest's workers make them from the decode that proves each image whole) put
    into the cache ahead of `build_cache`, which then finds them: a shard each time `_PREFILL_BYTES` of
    squares the cache lacks have arrived, and the rest on `close`. Memory: that buffer (512 MiB) at most,
    whatever the image count."""

    def __init__(self, cache_dir: Path, data_config: dict[str, Any]):
        self.store, self._settings = ShardStore(_folder(cache_dir, data_config)), _settings(data_config)
        self._keys: list[np.ndarray] = []
        self._squares: list[np.ndarray] = []
        self.added = 0

    def add(self, identities: Sequence[str], squares: np.ndarray) -> None:
        """Squares (n, 3, side, side) of the images `identities`, those the cache has already dropped."""
        keys = digests(f"{self._settings}|{name}" for name in identities)
        new = self.store.missing(keys)
        if len(new):
            self._keys.append(keys[new])
            self._squares.append(squares[new])
        if sum(block.nbytes for block in self._squares) >= _PREFILL_BYTES:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._keys:
            keys = np.concatenate(self._keys)
            unique, first = np.unique(keys, return_index=True)  # the same image listed twice: one row
            self.store.add(unique, np.concatenate(self._squares)[first])
            self.added += len(unique)
        self._keys, self._squares = [], []


# Bytes of squares `Prefill` holds before it writes a shard: as many as the build's shards hold (5,300 at
# 160 px), since a reader keeps a file open per shard: a million images at 224 px make 370 shards, which
# quarter-size shards would have made 1,480, over the usual limit of 1,024 open files.
_PREFILL_BYTES = _SHARD_BYTES


def build_cache(
    paths: Sequence[str | Path],
    identities: Sequence[str],
    data_config: dict[str, Any],
    cache_dir: Path,
    workers: int,
) -> Path:
    """Decode and resize once, into the on-disk cache, every image it lacks; returns the set's file.

    `identities`: one string per image that changes whenever its pixels do (e.g. relative path + sha256).
    """
    target = cache_path(cache_dir, identities, data_config)
    if target.is_file():
        log.info("image cache: reusing %s", target)
        return target
    store = ShardStore(_folder(cache_dir, data_config))
    keys = digests(f"{_settings(data_config)}|{identity}" for identity in identities)
    missing = store.missing(keys)
    side = cache_side(data_config)
    log.info(
        "image cache: %d of %d images to decode, %dx%d, in %s",
        len(missing),
        len(keys),
        side,
        side,
        store.folder,
    )
    if len(missing):
        _decode(store, paths, keys, missing, data_config, workers)
    _write_set(store, keys, side, target)
    return target


def _write_set(store: ShardStore, keys: np.ndarray, side: int, target: Path) -> None:
    """The set's file: each image's key, shard and row; it names only the shards it reads, from 0."""
    shard, row = store.locate(keys)
    used = np.unique(shard)
    names = np.array([store.names[i] for i in used], dtype=str)
    renumbered = np.searchsorted(used, shard).astype(np.int32)
    with atomic_path(target) as tmp, open(tmp, "wb") as file:
        np.savez(file, keys=keys, shard=renumbered, row=row, names=names, side=side)


def open_cache(path: Path) -> CachedSet:
    """An image set of the cache (N, 3, side, side) uint8, read out of memory-mapped shards; cheap, so each
    worker opens its own."""
    return CachedSet(path)


class CachedSet:
    """An image set, (N, 3, side, side) uint8, read by index out of the shards that hold it (`ShardRows`):
    `[i]`, `[indices]` and `[start:stop]` read just those squares, never the cache whole."""

    def __init__(self, path: Path):
        with np.load(path) as saved:
            self.keys = saved["keys"]  # (N,) the squares' keys: the same image has the same key in any set
            self._shard, self._row = saved["shard"], saved["row"]  # (N,) int32 each
            self._rows = ShardRows(Path(path).parent.parent, saved["names"].tolist())
            self.shape = (len(self.keys), 3, int(saved["side"]), int(saved["side"]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self[[index]][0]
        chosen = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(chosen), *self.shape[1:]), dtype=np.uint8)
        self._rows.gather(self._shard[chosen], self._row[chosen], out)
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


# Images per thread task. One task per image made a future per image, all at once (pool.map submits every
# task before the first result): a million images took 1.6 GB and 23 s in futures alone (benchmarks/scale.py).
_TASK_IMAGES = 256


def _decode(
    store: ShardStore,
    paths: Sequence[str | Path],
    keys: np.ndarray,
    missing: np.ndarray,
    data_config: dict[str, Any],
    workers: int,
) -> None:
    """The squares of images `missing` into new shards of `store`, each committed as soon as it is full."""
    side = cache_side(data_config)
    per_shard = max(1, _SHARD_BYTES // (3 * side * side))
    # PIL releases the GIL while decoding and resizing, so threads scale without pickling pixels.
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress("image cache", len(missing), "img") as bar,
    ):
        for start in range(0, len(missing), per_shard):
            chunk = missing[start : start + per_shard]
            _fill(store, keys[chunk], [paths[i] for i in chunk], data_config, pool, bar.update)


def _fill(
    store: ShardStore,
    keys: np.ndarray,
    paths: Sequence[str | Path],
    data_config: dict[str, Any],
    pool: ThreadPoolExecutor,
    done: Callable[[int], object],
) -> None:
    """One shard: the squares of `paths`, decoded by `pool`'s threads into its memmap (unmapped on return)."""
    side = cache_side(data_config)
    with store.write(keys, (3, side, side), np.uint8) as array:

        def fill(span: tuple[int, int]) -> None:
            for index in range(*span):
                array[index] = _load(paths[index], data_config)

        spans = [
            (start, min(start + _TASK_IMAGES, len(paths))) for start in range(0, len(paths), _TASK_IMAGES)
        ]
        for (start, stop), _ in zip(
            spans, pool.map(fill, spans), strict=True
        ):  # raises the first task's error
            done(stop - start)


def _load(path: str | Path, data_config: dict[str, Any]) -> np.ndarray:
    """Decoded reduced (a 4000x3000 JPEG: 24 instead of 132 ms, 0.75 instead of 144 MB of pixels) and made
    what a viewer shows as `open_rgb` makes it (`to_rgb`); grey images stay grey until resized: a third of the
    resampling work (Fashion-MNIST, 28 -> 182 px: 0.32 -> 0.13 ms per image) for the same bytes."""
    try:
        return square_of(open_reduced(path, cache_side(data_config)), data_config)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc}); re-run ingest/validate") from None

"""uint8 image cache: every image decoded and resized once, then every epoch augments from memory.

The cache holds, per image, a square of side floor(size / crop_pct) made by `preprocess.resized_square`, whose
center the eval preprocessing crops: CenterCrop(size) of the square is byte-for-byte the eval crop, whatever
the image's shape, in memory bounded by its size. Training crops and flips come from the full square;
validation is its center.
Images are decoded reduced (`images.open_reduced`: a JPEG at a smaller DCT scale, others box-reduced, by a
factor that keeps at least twice the square's side): a smaller image's crop is the eval crop exactly, a larger
one's differs by a few grey levels (4000x3000 photos: mean 0.3, at most 2).

On disk it is one `.npy` array (N, 3, side, side) keyed by the images' identities (relative path + sha256, in
order) and the resize settings, so experiments that change only training params reuse it. Workers open it as a
read-only memmap.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.images import open_reduced
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.preprocess import resize_side, resized_square, to_rgb

log = logging.getLogger(__name__)

_FORMAT_VERSION = 3  # bump when the cached pixels would change for the same key inputs


def cache_side(data_config: dict[str, Any]) -> int:
    """Side of the cached square: the eval resize target, floor(size / crop_pct)."""
    size = int(data_config["input_size"][-1])
    return max(size, resize_side(size, float(data_config["crop_pct"])))


def cache_key(identities: Sequence[str], data_config: dict[str, Any]) -> str:
    spec = {
        "images": list(identities),
        "size": int(data_config["input_size"][-1]),
        "side": cache_side(data_config),
        "interpolation": data_config["interpolation"],
        "version": _FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(cache_dir: Path, identities: Sequence[str], data_config: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"images-{cache_key(identities, data_config)}.npy"


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


def build_cache(
    paths: Sequence[Path],
    identities: Sequence[str],
    data_config: dict[str, Any],
    cache_dir: Path,
    workers: int,
) -> Path:
    """Decode and resize every image once into the on-disk cache (reused when it exists); returns its path.

    `identities`: one string per image that changes whenever its pixels do (e.g. relative path + sha256).
    """
    target = cache_path(cache_dir, identities, data_config)
    side = cache_side(data_config)
    if target.is_file():
        log.info("image cache: reusing %s", target)
        return target
    log.info("image cache: decoding %d images into %s (%dx%d)", len(paths), target, side, side)
    with atomic_path(target) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, side, side))
        _fill(array, paths, data_config, workers)
        array.flush()
    return target


def open_cache(path: Path) -> np.ndarray:
    """The cache as a read-only memmap (N, 3, side, side) uint8; cheap, so each worker opens its own."""
    return np.load(path, mmap_mode="r")


# Images per thread task. One task per image made a future per image, all at once (pool.map submits every
# task before the first result): a million images took 1.6 GB and 23 s in futures alone (benchmarks/scale.py).
_TASK_IMAGES = 256


def _fill(array: np.ndarray, paths: Sequence[Path], data_config: dict[str, Any], workers: int) -> None:
    def fill(span: tuple[int, int]) -> None:
        for index in range(*span):
            array[index] = _load(paths[index], data_config)

    spans = [(start, min(start + _TASK_IMAGES, len(paths))) for start in range(0, len(paths), _TASK_IMAGES)]
    # PIL releases the GIL while decoding and resizing, so threads scale without pickling pixels.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fill, spans):  # raises the first task's error, as before
            pass


def _load(path: Path, data_config: dict[str, Any]) -> np.ndarray:
    """Decoded reduced (a 4000x3000 JPEG: 24 instead of 132 ms, 0.75 instead of 144 MB of pixels) and made
    what a viewer shows as `open_rgb` makes it (`to_rgb`); grey images stay grey until resized: a third of the
    resampling work (Fashion-MNIST, 28 -> 182 px: 0.32 -> 0.13 ms per image) for the same bytes."""
    try:
        img = to_rgb(open_reduced(path, cache_side(data_config)), keep_grey=True)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc}); re-run ingest/validate") from None
    return cached_square(img, data_config)

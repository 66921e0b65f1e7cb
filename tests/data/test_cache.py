"""The uint8 image cache: its center crop is exactly the eval preprocessing, thin strips included (resampled
only where the square lies); it is built once and reused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_image
from PIL import Image

from pipeline.data import cache
from pipeline.data.images import open_reduced
from pipeline.errors import PipelineError
from pipeline.preprocess import open_rgb, resize_and_crop

CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
}


# 7 x 500 and 900 x 11 resize to more than 16 sides long: only the square's span is resampled
SHAPES = [(40, 40), (57, 31), (31, 57), (33, 120), (101, 64), (28, 28), (7, 500), (900, 11)]


@pytest.mark.parametrize("width,height", SHAPES)
@pytest.mark.parametrize(
    "size,crop_pct,interpolation", [(32, 0.875, "bicubic"), (33, 0.9, "bilinear"), (24, 1.0, "bicubic")]
)
def test_center_of_the_cached_square_equals_the_eval_crop(width, height, size, crop_pct, interpolation):
    rng = np.random.default_rng(width * height)
    img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    config = {**CONFIG, "input_size": [3, size, size], "crop_pct": crop_pct, "interpolation": interpolation}

    square = cache.cached_square(img, config)

    side = cache.cache_side(config)
    assert square.shape == (3, side, side) and square.dtype == np.uint8
    inner = int(round((side - size) / 2.0))  # torchvision CenterCrop's offset
    crop = square[:, inner : inner + size, inner : inner + size].transpose(1, 2, 0)
    assert np.array_equal(crop, np.asarray(resize_and_crop(img, size, crop_pct, interpolation)))


@pytest.mark.parametrize("width,height", [(28, 28), (57, 31), (31, 57), (9, 400)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
def test_grey_images_are_cached_exactly_as_their_rgb_conversion(tmp_path, width, height, interpolation):
    rng = np.random.default_rng(width + height)
    path = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), mode="L").save(path)
    config = {**CONFIG, "interpolation": interpolation}

    built = cache.build_cache([path], ["grey"], config, tmp_path / "cache", workers=1)

    assert np.array_equal(cache.open_cache(built)[0], cache.cached_square(open_rgb(path), config))


def test_cache_is_built_once_and_reused(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", i, size=40, seed=i) for i in range(5)]
    ids = [f"{p.name}:sha{i}" for i, p in enumerate(paths)]
    built = cache.build_cache(paths, ids, CONFIG, tmp_path / "cache", workers=2)
    array = cache.open_cache(built)
    assert array.shape == (5, 3, 36, 36)
    assert np.array_equal(array[3], cache.cached_square(Image.open(paths[3]).convert("RGB"), CONFIG))

    for path in paths:  # decoding again would now fail on the missing files
        path.unlink()
    assert cache.build_cache(paths, ids, CONFIG, tmp_path / "cache", workers=2) == built


def test_key_changes_with_the_images_and_the_resize_settings():
    ids = ["a.png:1", "b.png:2"]
    key = cache.cache_key(ids, CONFIG)
    assert key == cache.cache_key(list(ids), dict(CONFIG))
    assert key != cache.cache_key(["a.png:1", "b.png:3"], CONFIG)
    assert key != cache.cache_key(ids[::-1], CONFIG)
    assert key != cache.cache_key(ids, {**CONFIG, "input_size": [3, 48, 48]})
    assert key != cache.cache_key(ids, {**CONFIG, "interpolation": "bilinear"})


def test_an_undecodable_file_names_itself_and_leaves_no_cache(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(PipelineError, match="broken.png"):
        cache.build_cache([bad], ["broken.png:x"], CONFIG, tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").rglob("*.np[yz]"))


def _photo(path, width, height, **save):
    """Smooth colour waves with a little noise: a stand-in for a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [
        128 + 60 * np.sin(x / (37 + 10 * c)) * np.cos(y / (53 - 7 * c)) + 40 * np.sin((x + y) / 211)
        for c in range(3)
    ]
    noise = np.random.default_rng(width).normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(np.stack(waves, -1) + noise, 0, 255).astype(np.uint8)).save(path, **save)
    return path


@pytest.mark.parametrize(
    ("name", "size", "orientation", "decoded"),
    [
        ("photo.jpg", (1600, 1200), 1, (100, 75)),  # DCT scale 1/8, then box-reduced by 2: 75 >= 2 x 36
        ("photo.jpg", (1600, 1200), 6, (75, 100)),  # shown rotated
        ("photo.png", (1600, 1200), 1, (100, 75)),  # box-reduced by 16
        ("odd.jpg", (1600, 1201), 1, (1600, 1201)),  # no whole factor divides both sides: decoded in full
    ],
)
def test_large_images_are_decoded_reduced_by_a_factor_that_divides_both_sides(
    tmp_path, name, size, orientation, decoded
):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _photo(tmp_path / name, *size, exif=exif)

    assert open_reduced(path, cache.cache_side(CONFIG)).size == decoded


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png"])
def test_a_reduced_decode_is_cached_within_a_few_grey_levels_of_the_full_decode(tmp_path, name):
    path = _photo(tmp_path / name, 1600, 1200, quality=90)

    built = cache.open_cache(cache.build_cache([path], ["x"], CONFIG, tmp_path / "cache", workers=1))[0]

    full = cache.cached_square(open_rgb(path), CONFIG)
    difference = np.abs(built.astype(int) - full.astype(int))
    assert difference.mean() < 1.5 and difference.max() <= 8, (difference.mean(), difference.max())


def test_building_takes_no_memory_per_image_beyond_the_array(tmp_path, monkeypatch):
    """A future per image, all made before the first finished, took 1.6 GB for a million images."""
    import tracemalloc

    n = 50_000
    monkeypatch.setattr(cache, "_load", lambda path, config: np.full((3, 36, 36), 7, np.uint8))
    paths, ids = [tmp_path / f"{i}.png" for i in range(n)], [str(i) for i in range(n)]
    tracemalloc.start()
    try:
        built = cache.build_cache(paths, ids, CONFIG, tmp_path / "cache", workers=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cache.open_cache(built).shape == (n, 3, 36, 36) and (cache.open_cache(built)[-1] == 7).all()
    assert peak < 16 * 2**20, peak / 2**20  # MiB: the key's JSON and the spans (was 80: 1.6 KB an image)


def test_every_image_is_loaded_once_in_any_number_of_tasks(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(cache, "_load", lambda path, config: loaded.append(path) or np.zeros((3, 36, 36)))
    paths = [tmp_path / f"{i}.png" for i in range(cache._TASK_IMAGES * 2 + 3)]
    cache.build_cache(paths, [p.name for p in paths], CONFIG, tmp_path / "cache", workers=3)
    assert sorted(loaded) == sorted(paths)


def test_prefilled_squares_are_found_by_the_build_and_written_once(tmp_path, monkeypatch):
    """Squares put into the cache ahead of it (ingest's) are what `build_cache` reads, with no file to
    decode; a shard each time the buffer fills, a square the cache holds (or repeated) written once."""
    side = cache.cache_side(CONFIG)
    squares = np.random.default_rng(0).integers(0, 256, (10, 3, side, side), dtype=np.uint8)
    names = [f"img_{i}.png:sha{i}" for i in range(10)]
    monkeypatch.setattr(cache, "_PREFILL_BYTES", 3 * squares[0].nbytes)  # a shard every third square
    prefill = cache.Prefill(tmp_path, CONFIG)
    for start in range(0, 8, 2):
        prefill.add(names[start : start + 2], squares[start : start + 2])
    prefill.add([names[8], names[8]], squares[[8, 8]])  # the same image twice in one task
    prefill.close()
    again = cache.Prefill(tmp_path, CONFIG)
    again.add(names[:9], squares[:9])
    again.close()

    assert (prefill.added, again.added, len(again.store.names)) == (9, 0, 3)
    missing = tmp_path / "nowhere"
    built = cache.build_cache([missing / n for n in names[:9]], names[:9], CONFIG, tmp_path, workers=1)
    assert np.array_equal(cache.open_cache(built)[:], squares[:9])

"""ingest_photos: images/s of ingest + validate + the train stage's image-cache build on camera-size JPEGs,
with 2 workers, against a full-resolution decode of every image; and the peak RSS of the ingest command.

The photos are Fashion-MNIST images upscaled to 4000x3000 (bicubic), tinted and noised, saved at JPEG quality
90: about 2 MB each, so decoding one costs what a 12 MP camera photo costs. They are made once into
benchmarks/data/photos_<width>x<height>/ (git-ignored) and reused; one more file is a photo cut short, which
ingest must mark `truncated` (integrity is still proven: target `truncated_caught`).

- `reduced`, the pipeline: `ingest.run` (2 worker processes; each JPEG decoded once, to the end, at the DCT
  scale that keeps twice the cached side, and its square put into the image cache), `validate.run`, then
  `build_cache` over every usable image with 2 threads, as the train stage builds its caches (it finds every
  square there and decodes nothing).
- `decode_floor`: 2 processes that only decode every whole photo once as the cache needs it (`open_reduced`):
  the ceiling of any one-decode pipeline on this CPU (a 12 MP JPEG's entropy decoding costs 17-30 ms of CPU
  even at 1/8 scale, depending on the CPU).
- `full_resolution`, the baseline (the code before): the same three steps with every image decoded at full
  size: ingest's per-file work (hash, decode, EXIF rotation and RGB conversion of the full image) over 2
  processes, the same validate, then the cache's per-image work (full decode, RGB, resize) over 2 threads.

After an untimed warm-up, arms alternate, so a change in machine load hits both alike. Peak RSS: the ingest
stage run once more in a process of its own; the kernel's high-water mark of its largest worker.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from benchmarks._common import (
    REPO_ROOT,
    Options,
    ensure_fashion_mnist,
    machine,
    median,
    project_params,
    result,
    summary,
    target,
    timed,
    tool_env,
    workdir,
    write_params,
)
from pipeline.config import Params
from pipeline.data.cache import build_cache, cache_side, cached_square, identity
from pipeline.data.images import open_reduced
from pipeline.io import read_json
from pipeline.models import resolve_data_config
from pipeline.preprocess import open_rgb, to_rgb
from pipeline.stages import ingest, validate

NAME = "ingest_photos"
SETTINGS = {
    "full": {"images": 2000, "size": [4000, 3000], "workers": 2, "repeats": 2, "params": {}},
    # Smoke: 4 photos per class and the cut one (1 in 13) must pass validate.
    "smoke": {
        "images": 12,
        "size": [400, 300],
        "workers": 2,
        "repeats": 1,
        "params": {"validate.min_images_per_class": 1, "validate.max_bad_fraction": 0.2},
    },
}
PHOTOS_DIR = REPO_ROOT / "benchmarks" / "data"
CUT = "truncated.jpg"  # a photo cut in half, in the first class folder


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    count, size, workers = settings["images"], tuple(settings["size"]), settings["workers"]
    with workdir(opts, NAME) as root:
        source = Path(opts.data) if opts.smoke else ensure_fashion_mnist(opts.data)
        folder = (root if opts.smoke else PHOTOS_DIR) / f"photos_{size[0]}x{size[1]}"
        photos = _photos(source / "train", folder, count, size)
        overrides = {"paths.data_root": str(photos), "ingest.num_workers": workers, **settings["params"]}
        params = project_params(root, overrides)
        data_config = resolve_data_config(params.model)  # the default recipe's: lite0 at 160 px
        _reduced(params, data_config, workers)  # warm-up: page cache, imports (Great Expectations: seconds)
        runs: dict[str, list[dict[str, Any]]] = {"reduced": [], "full_resolution": []}
        floor = []
        for _ in range(settings["repeats"]):
            floor.append(_decode_floor(photos, cache_side(data_config), workers))
            runs["reduced"].append(_reduced(params, data_config, workers))
            runs["full_resolution"].append(
                _full_resolution(params, data_config, photos, root / "cache", workers)
            )
        _forget_images(params.paths.cache_dir)  # the workers decode, not reuse rows
        peak = _worker_peak_rss_mib(write_params(params, root / "params.yaml"))
        caught = _status(params, next(photos.rglob(CUT)).relative_to(photos).as_posix()) == "truncated"

    results = {arm: _aggregate(arm_runs) for arm, arm_runs in runs.items()}
    results["reduced"]["ingest_worker_peak_rss_mib"] = peak
    results["reduced"]["squares_cached_by_ingest"] = runs["reduced"][0]["squares_cached"]
    results["images"] = runs["reduced"][0]["images"]
    results["decode_floor"] = {"seconds": summary(floor), "images_per_s": results["images"] / median(floor)}
    speeds = [results[arm]["images_per_s"] for arm in ("reduced", "full_resolution", "decode_floor")]
    ratios = {
        "reduced_vs_full_resolution": speeds[0] / speeds[1],
        "reduced_vs_decode_floor": speeds[0] / speeds[2],
    }
    targets = {
        "images_per_s_2_workers": target(results["reduced"]["images_per_s"], ">=", 100),
        "ingest_worker_peak_rss_mib": target(peak, "<=", 1024),
        "truncated_caught": target(float(caught), ">=", 1),
    }
    settings.update(data=str(photos), data_config=data_config, cores=os.cpu_count())
    return result(NAME, opts, started, settings, results, ratios, targets)


def _reduced(params: Params, data_config: dict[str, Any], workers: int) -> dict[str, Any]:
    """The pipeline: the ingest and validate stages, then the image cache over every usable image."""
    load = os.getloadavg()[0]
    _forget_images(params.paths.cache_dir)
    ingest_s, _ = timed(lambda: ingest.run(params))
    validate_s, _ = timed(lambda: validate.run(params))
    paths, identities = _usable(params)
    cache_s, _ = timed(lambda: build_cache(paths, identities, data_config, params.paths.cache_dir, workers))
    squares = read_json(params.paths.details("ingest"))["squares_cached"]
    return {**_figures(len(paths), ingest_s, validate_s, cache_s, load), "squares_cached": squares}


def _decode_floor(photos: Path, side: int, workers: int) -> float:
    """Seconds `workers` processes take only to decode every whole photo once as the cache needs it
    (`open_reduced`): the least any pipeline that decodes each photo once spends, on this CPU."""
    files = sorted(str(p) for p in photos.rglob("*.jpg") if p.name != CUT)
    with multiprocessing.Pool(workers) as pool:
        seconds, _ = timed(
            lambda: pool.map(functools.partial(_open_reduced_size, side=side), files, chunksize=8)
        )
    return seconds


def _open_reduced_size(file: str, side: int) -> tuple[int, int]:
    return open_reduced(file, side).size


def _forget_images(cache_dir: Path) -> None:
    """An earlier run's ingest rows and cached squares, so each run decodes every photo; the backbone's
    preprocessing ingest remembers there stays, as in a project's every run after its first (the first
    imports timm to resolve it: 2.5 s more on a 2-core Intel Xeon)."""
    for folder in [*cache_dir.glob("ingest-*"), *cache_dir.glob("images-*")]:
        shutil.rmtree(folder)


def _full_resolution(
    params: Params, data_config: dict[str, Any], photos: Path, cache_dir: Path, workers: int
) -> dict[str, Any]:
    """The same three steps with every image decoded at full size (the pipeline's per-image work before)."""
    load = os.getloadavg()[0]
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    with multiprocessing.Pool(workers) as pool:
        ingest_s, _ = timed(lambda: pool.map(_full_inspect, files, chunksize=8))
    validate_s, _ = timed(lambda: validate.run(params))
    paths, _ = _usable(params)
    with ThreadPoolExecutor(workers) as threads:
        cache_s, _ = timed(
            lambda: list(threads.map(lambda p: cached_square(open_rgb(p), data_config), paths))
        )
    return _figures(len(paths), ingest_s, validate_s, cache_s, load)


def _full_inspect(file: str) -> str:
    """What ingest did per file before the memory budget: hash, then decode, rotate and convert in full."""
    data = Path(file).read_bytes()
    hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            to_rgb(ImageOps.exif_transpose(img))
    except OSError:
        return "truncated"
    return "ok"


def _figures(images: int, ingest_s: float, validate_s: float, cache_s: float, load: float) -> dict[str, Any]:
    return {
        "images": images,
        "ingest_seconds": ingest_s,
        "validate_seconds": validate_s,
        "cache_seconds": cache_s,
        "load_average_1min_before": round(load, 2),
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["ingest_seconds"] + r["validate_seconds"] + r["cache_seconds"] for r in runs]
    steps = ("ingest_seconds", "validate_seconds", "cache_seconds")
    return {
        "seconds": summary(totals),
        **{step: summary([r[step] for r in runs]) for step in steps},
        "images_per_s": runs[0]["images"] / median(totals),
        "load_average_1min_before": [r["load_average_1min_before"] for r in runs],
    }


def _usable(params: Params) -> tuple[list[Path], list[str]]:
    """Paths and identities (path:sha256) of the usable images, as split hands them to the train stage."""
    with params.paths.validated.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    root = params.paths.data_root
    return [root / r["path"] for r in rows], [identity(r["path"], r["sha256"]) for r in rows]


def _status(params: Params, path: str) -> str:
    with params.paths.manifest.open(newline="", encoding="utf-8") as fh:
        return next(r["status"] for r in csv.DictReader(fh) if r["path"] == path)


# The ingest stage in a process of its own; it prints the kernel's high-water mark of its largest worker, read
# once the pool has reaped them (its own figure would carry this process's, which the fork-and-exec inherits).
_WORKER_PEAK = (
    "import resource, sys; from pipeline.config import Params; from pipeline.stages import ingest; "
    "ingest.run(Params.load(sys.argv[1])); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _worker_peak_rss_mib(params_file: Path) -> float:
    """Peak RSS of the largest ingest worker, forked by the stage as under `python -m pipeline ingest`."""
    command = [sys.executable, "-c", _WORKER_PEAK, str(params_file)]
    done = subprocess.run(command, cwd=params_file.parent, env=tool_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the ingest stage exited {done.returncode}:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024


# ---------------------------------------------------------------------------------------------- photos


def _photos(source: Path, folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` photos made from the Fashion-MNIST PNGs under `source` (<class>/<file>.png, classes in turn) as
    <folder>/<class>/<n>.jpg, plus one cut short; made once, kept while the count matches."""
    marker = folder / ".made"
    if marker.is_file() and marker.read_text() == f"{count} {size}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    classes = {c.name: sorted(c.glob("*.png")) for c in sorted(source.iterdir()) if c.is_dir()}
    jobs = [
        (str(files[i // len(classes)]), str(folder / label / f"{i:05d}.jpg"), size, i)
        for i in range(count)
        for label, files in [list(classes.items())[i % len(classes)]]
    ]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(_photo, jobs, chunksize=4)
    first = Path(jobs[0][1])
    (first.parent / CUT).write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    marker.write_text(f"{count} {size}")
    return folder


def _photo(source: str, target: str, size: tuple[int, int], seed: int) -> None:
    """A grey thumbnail upscaled to `size`, tinted per channel, with noise of about 6 grey levels."""
    rng = np.random.default_rng(seed)
    grey = np.asarray(Image.open(source).convert("L").resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    tint = rng.integers(150, 256, 3, dtype=np.int16)
    pixels = (grey[..., None] * tint >> 8) + 40 + rng.integers(-10, 11, (size[1], size[0], 3), dtype=np.int16)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=90)

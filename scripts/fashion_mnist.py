"""Turn the Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`) into PNG image folders.

    python scripts/fashion_mnist.py sample                   # data/sample/<class>/<index>.png, 120 a class
    python scripts/fashion_mnist.py full --out /tmp/fmnist   # <out>/{train,test}/<class>/<index>.png, 70k

File names are the image's index in its official IDX file (train or t10k), so every PNG can be traced back.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
# Label index -> folder name, in the order of the official label ids.
CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
# Output split name -> IDX file prefix of the official split.
SPLITS = {"train": "train", "test": "t10k"}


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    if not path.is_file():
        sys.exit(
            f"{path}: not found. Install the Debian package (sudo apt-get install dataset-fashion-mnist) "
            "or pass --source <folder with the four *-ubyte.gz files>."
        )
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header_bytes)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one official split ('train' or 'test')."""
    prefix = SPLITS[split]
    labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", header_bytes=8)
    images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", header_bytes=16).reshape(-1, 28, 28)
    if len(images) != len(labels):
        sys.exit(f"{source}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def _write_pngs(job: tuple[Path, np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Write one chunk: PNG is lossless; mode L keeps the single grey channel; optimize shrinks the files."""
    root, images, labels, indices = job
    for image, label, index in zip(images, labels, indices, strict=True):
        Image.fromarray(image, mode="L").save(root / CLASS_NAMES[label] / f"{index:05d}.png", optimize=True)
    return len(indices)


def _export(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, workers: int) -> int:
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(indices)), max(1, workers * 8))
    jobs = [(root, images[c], labels[c], indices[c]) for c in chunks if len(c)]
    if workers <= 1:
        return sum(map(_write_pngs, jobs))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(_write_pngs, jobs))


def stratified_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` source indices of every class, drawn without replacement, sorted; same seed, same draw."""
    rng = np.random.default_rng(seed)
    picked = []
    for k in range(len(CLASS_NAMES)):
        members = np.flatnonzero(labels == k)
        if len(members) < per_class:
            sys.exit(f"class {CLASS_NAMES[k]} has only {len(members)} images; asked for {per_class}")
        picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _clear(folders: list[Path], force: bool) -> None:
    """Remove earlier output folders (only with --force) so no stale PNG survives a re-run."""
    existing = [f for f in folders if f.exists()]
    if existing and not force:
        sys.exit(f"{existing[0]}: already exists; pass --force to replace it")
    for folder in existing:
        shutil.rmtree(folder)


def _sample(args: argparse.Namespace) -> None:
    images, labels = load_split(args.source, "train")
    indices = stratified_indices(labels, args.per_class, args.seed)
    _clear([args.out / name for name in CLASS_NAMES], args.force)  # the hand-written README.md stays
    n = _export(args.out, images[indices], labels[indices], indices, args.workers)
    print(f"{args.out}: {n} images, {args.per_class} per class, from the train split (seed {args.seed})")


def _full(args: argparse.Namespace) -> None:
    _clear([args.out / split for split in SPLITS], args.force)
    started = time.perf_counter()
    total = 0
    for split in SPLITS:
        images, labels = load_split(args.source, split)
        total += _export(args.out / split, images, labels, np.arange(len(labels)), args.workers)
    print(f"{args.out}: {total} images in train/ and test/ in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SOURCE_DIR, help="folder of the four *-ubyte.gz")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: cores)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    modes = parser.add_subparsers(dest="mode", required=True)
    sample = modes.add_parser("sample", help="stratified subset of the train split, one folder per class")
    sample.add_argument("--out", type=Path, default=Path("data/sample"))
    sample.add_argument("--per-class", type=int, default=120)
    sample.add_argument("--seed", type=int, default=42)
    sample.set_defaults(handler=_sample)
    full = modes.add_parser("full", help="all 70,000 images as <out>/train/<class>/ and <out>/test/<class>/")
    full.add_argument("--out", type=Path, required=True)
    full.set_defaults(handler=_full)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()

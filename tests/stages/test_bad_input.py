"""Ingest + validate + split on a data root full of bad input: nothing crashes, every case is reported with
a reason, the outside symlink is refused, errors/warnings follow the params, and no source byte changes."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import data_stage_params, make_image
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import ingest, split, validate

RULES = (
    "min_images_per_class",
    "max_imbalance_ratio",
    "min_classes",
    "max_bad_fraction",
    "min_side",
    "max_pixels",
    "label_conflict",
    "split_leakage",
)
# path -> status ingest must give it (the good filler images of each class are checked separately)
EXPECTED_STATUS = {
    "shirt/truncated.jpg": "truncated",
    "shirt/zero.png": "empty_file",
    "shirt/text.jpg": "not_an_image",
    "shirt/bomb.png": "too_large",
    "shirt/outside.png": "symlink_outside_root",
    "shirt/rotated.jpg": "ok",
    "shirt/my shirt ü.png": "ok",
    "boot/cmyk.jpg": "ok",
    "boot/rgba.png": "ok",
    "boot/palette.png": "ok",
    "boot/grey16.png": "ok",
    "boot/Stiefel größe 42.png": "ok",
    "boot/tiny.png": "ok",
    "boot/big.png": "ok",
    "boot/same.png": "ok",
    "shirt/same.png": "ok",
    "single/only.png": "ok",
    "empty/": "empty_class_folder",
}


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path) -> None:
    """A valid PNG header that claims 30000 x 30000 RGB pixels (2.7 GB decoded), with almost no data."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    body = (
        _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _build_bad_dataset(root: Path, outside: Path) -> None:
    for i in range(12):
        make_image(root / "shirt" / f"good_{i:02d}.png", 0, seed=i)
        make_image(root / "boot" / f"good_{i:02d}.png", 1, seed=100 + i)
    shirt, boot = root / "shirt", root / "boot"
    Image.fromarray(_pixels(1, 32, 32)).save(shirt / "full.jpg", quality=90)
    data = (shirt / "full.jpg").read_bytes()
    (shirt / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (shirt / "full.jpg").unlink()
    (shirt / "zero.png").write_bytes(b"")
    (shirt / "text.jpg").write_text("this is not a JPEG\n")
    _bomb_png(shirt / "bomb.png")
    outside.mkdir()
    make_image(outside / "secret.png", 0, seed=999)
    os.symlink(outside / "secret.png", shirt / "outside.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 40 wide x 24 high, shown 24 x 40
    Image.fromarray(_pixels(2, 24, 40)).save(shirt / "rotated.jpg", exif=exif)
    make_image(shirt / "my shirt ü.png", 0, seed=50)
    Image.fromarray(_pixels(3, 32, 32)).convert("CMYK").save(boot / "cmyk.jpg")
    Image.fromarray(_pixels(4, 32, 32)).convert("RGBA").save(boot / "rgba.png")
    Image.fromarray(_pixels(5, 32, 32)).convert("P").save(boot / "palette.png", transparency=0)
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(boot / "grey16.png")
    make_image(boot / "Stiefel größe 42.png", 1, seed=51)
    make_image(boot / "tiny.png", 1, size=8, seed=52)
    make_image(boot / "big.png", 1, size=64, seed=53)
    make_image(boot / "same.png", 1, seed=54)
    (shirt / "same.png").write_bytes((boot / "same.png").read_bytes())  # one image under two labels
    make_image(root / "single" / "only.png", 2, seed=55)
    (root / "empty").mkdir()
    (root / ".DS_Store").write_bytes(b"\0\1")
    (shirt / ".hidden.png").write_bytes((shirt / "good_00.png").read_bytes())
    make_image(root / ".cache" / "thumb.png", 0, seed=56)
    (boot / "notes.txt").write_text("not an image extension\n")


def _tree_digest(*roots: Path) -> dict[str, str]:
    """Every entry below the roots: file bytes hashed, symlinks by target, folders by name."""
    digest = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                if path.is_symlink():
                    digest[str(path)] = "link:" + os.readlink(path)
                elif path.is_file():
                    digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    digest[str(path)] = "dir"
    return digest


@pytest.fixture
def bad_dataset(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "data", tmp_path / "outside"
    _build_bad_dataset(root, outside)
    return root, outside


def _params(tmp_path: Path, root: Path, severity: str, num_workers: int):
    return data_stage_params(
        tmp_path,
        root,
        ingest={"num_workers": num_workers, "chunksize": 4},
        validate={
            "min_images_per_class": 5,
            "max_imbalance_ratio": 4.0,
            "max_bad_fraction": 0.05,
            "min_side": 16,
            "max_pixels": 2000,  # the 64 x 64 image is over
            "severity": dict.fromkeys(RULES, severity),
        },
        split={"small_class": severity},
    )


def _check_manifest_and_quarantine(params) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False).set_index("path")
    for path, status in EXPECTED_STATUS.items():
        assert manifest.at[path, "status"] == status, path
    assert manifest.at["shirt/bomb.png", "width"] == "30000"
    assert (manifest.at["shirt/rotated.jpg", "width"], manifest.at["shirt/rotated.jpg", "height"]) == (
        "24",
        "40",
    )
    modes = {
        path: manifest.at[path, "mode"] for path in ("boot/cmyk.jpg", "boot/rgba.png", "boot/palette.png")
    }
    assert modes == {"boot/cmyk.jpg": "CMYK", "boot/rgba.png": "RGBA", "boot/palette.png": "P"}
    assert manifest.at["boot/grey16.png", "mode"].startswith("I")
    assert manifest.at["shirt/outside.png", "sha256"] == "", "the outside file must never be read"
    assert not any(".hidden" in p or ".cache" in p or ".DS_Store" in p for p in manifest.index)
    assert "boot/notes.txt" not in manifest.index
    ingest_details = read_json(params.paths.details("ingest"))
    assert ingest_details["skipped_hidden"] == 3  # .DS_Store, shirt/.hidden.png, the .cache folder
    assert ingest_details["skipped_non_image"] == 1

    quarantine = pd.read_csv(params.paths.quarantine, dtype=str, keep_default_na=False).set_index("path")
    for path, status in EXPECTED_STATUS.items():
        if status != "ok":
            assert quarantine.at[path, "reason"] == status, path
    expected_rules = {
        "boot/tiny.png": "min_side",
        "boot/big.png": "max_pixels",
        "boot/same.png": "label_conflict",
        "shirt/same.png": "label_conflict",
    }
    for path, rule in expected_rules.items():
        assert quarantine.at[path, "reason"] == rule, path
    return manifest, quarantine


def test_bad_input_with_errors_fails_after_reporting_everything(bad_dataset, tmp_path):
    root, outside = bad_dataset
    before = _tree_digest(root, outside)
    params = _params(tmp_path, root, "error", num_workers=2)

    ingest.run(params)
    with pytest.raises(PipelineError) as caught:
        validate.run(params)

    message = str(caught.value)
    for rule in ("min_images_per_class", "max_bad_fraction", "min_side", "max_pixels", "label_conflict"):
        assert f"rule {rule} failed" in message
        assert f"validate.severity.{rule}: warning" in message
    assert (
        "'single' (1)" in message and "'empty' (0)" in message and "validate.min_images_per_class" in message
    )
    assert "'boot/tiny.png' (8x8)" in message and "'boot/big.png' (64x64)" in message
    assert "'boot/same.png' (boot) = 'shirt/same.png' (shirt)" in message
    assert "rule split_leakage failed" not in message and "rule min_classes failed" not in message

    _check_manifest_and_quarantine(params)
    metrics = read_json(params.paths.metrics("validate"))
    assert metrics["errors"] == 6  # the five above + the imbalance ratio (12-ish / 1)
    assert read_json(params.paths.details("validate"))["rules"]["max_imbalance_ratio"]["passed"] is False
    assert (params.paths.reports_dir / "validate" / "class_distribution.png").is_file()
    assert (params.paths.reports_dir / "validate" / "data_docs" / "index.html").is_file()
    assert not params.paths.validated.exists()
    with pytest.raises(PipelineError, match="run `python -m pipeline validate` first"):
        split.run(params)
    assert _tree_digest(root, outside) == before


def test_bad_input_with_warnings_passes_and_quarantines(bad_dataset, tmp_path, caplog):
    root, outside = bad_dataset
    before = _tree_digest(root, outside)
    params = _params(tmp_path, root, "warning", num_workers=0)

    ingest.run(params)
    with caplog.at_level(logging.WARNING):
        summary = validate.run(params)
        split.run(params)

    _, quarantine = _check_manifest_and_quarantine(params)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for rule in ("min_images_per_class", "max_bad_fraction", "min_side", "max_pixels", "label_conflict"):
        assert f"rule {rule} (warning)" in warned
    assert "classes ['single' (1 distinct images)] are too small" in warned
    assert summary["errors"] == 0 and summary["warnings"] == 6

    validated = pd.read_csv(params.paths.validated, dtype=str, keep_default_na=False)
    assert set(validated["status"]) == {"ok"}
    assert not set(validated["path"]) & set(quarantine.index)
    splits = pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False).set_index("path")
    assert list(splits.index) == sorted(validated["path"])
    assert splits.at["single/only.png", "split"] == "train"  # too small for three splits: kept in train
    for label in ("shirt", "boot"):
        assert set(splits.loc[splits["label"] == label, "split"]) == {"train", "val", "test"}
    assert _tree_digest(root, outside) == before


def test_empty_root_is_a_clear_error(tmp_path):
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / ".hidden.png").write_bytes(b"x")
    (root / "readme.txt").write_text("hi")
    with pytest.raises(PipelineError, match=r"no image files under .*skipped 1 hidden and 1 non-image"):
        ingest.run(data_stage_params(tmp_path, root, ingest={"num_workers": 0}))


def test_single_class_is_a_clear_error_even_as_a_warning(tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        make_image(root / "cats" / f"{i}.png", 0, seed=i)
    expected = {
        "error": r"rule min_classes failed: 1 class\(es\) with usable images \['cats'\], need at least 2",
        "warning": r"only 1 class\(es\) with usable images \['cats'\]; a classifier needs at least 2",
    }
    for severity, message in expected.items():
        params = data_stage_params(
            tmp_path, root, ingest={"num_workers": 0}, validate={"severity": {"min_classes": severity}}
        )
        ingest.run(params)
        with pytest.raises(PipelineError, match=message):
            validate.run(params)

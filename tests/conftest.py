"""Shared fixtures: tiny real image folders made in tmp_path, and an isolated environment for the tools."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Params

# Tools must never phone home or write into the user's home from tests.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_image(path: Path, label_index: int, size: int = 32, seed: int = 0, mode: str = "RGB") -> Path:
    """A small image whose content depends on its class (a coloured bar at a class-specific place)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    band = (label_index * 7) % size
    pixels[band : band + max(2, size // 5), :, label_index % 3] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32) -> Path:
    """<root>/<class_k>/img_<i>.png, distinct bytes for every file."""
    for k in range(classes):
        for i in range(per_class):
            make_image(root / f"class_{k}" / f"img_{i:03d}.png", k, size=size, seed=1000 * k + i)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def data_stage_params(tmp_path: Path, data_root: Path, **sections: dict) -> Params:
    """Params for the data stages: source `data_root`, every output under tmp_path/out; `sections` override
    whole params sections (e.g. ingest={"num_workers": 0})."""
    out = tmp_path / "out"
    paths = {
        "data_root": str(data_root),
        "manifest": str(out / "manifest.csv"),
        "validated": str(out / "validated.csv"),
        "quarantine": str(out / "quarantine.csv"),
        "splits": str(out / "splits.csv"),
        "metrics_dir": str(out / "metrics"),
        "reports_dir": str(out / "reports"),
        **sections.pop("paths", {}),
    }
    return Params.from_dict({"paths": paths, **sections})

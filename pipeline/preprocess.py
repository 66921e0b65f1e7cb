"""Evaluation preprocessing in numpy + PIL only (no torch), so ONNX `predict` and the `evaluate` stage run
byte-for-byte the same steps: open (EXIF-aware, to RGB) -> resize shorter side -> center crop -> normalise.

The steps follow timm's eval transform for the backbone's data config: the shorter side is resized to
floor(size / crop_pct) with the config's interpolation, then a centered size x size crop is taken.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Image file suffixes: ingest's default (`ingest.extensions`) and what `predict` takes from folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
INTERPOLATIONS = tuple(_INTERPOLATION)  # the names a data config's `interpolation` may take


def open_rgb(path: Path | str) -> Image.Image:
    """Decode an image file fully into RGB, applying its EXIF orientation.

    Palette/LA/RGBA images are composited on white so transparent areas do not turn black; 16-bit and CMYK
    images are converted by PIL.
    """
    return to_rgb(open_oriented(path))


def open_oriented(path: Path | str) -> Image.Image:
    """Decode an image file fully in its own mode, with its EXIF orientation applied."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img)  # a loaded copy, also when nothing is rotated


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping (PIL's convert("L") clips at 255).
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        img = Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_side(size: int, crop_pct: float) -> int:
    """The shorter side before the eval crop: floor(size / crop_pct) (timm's eval transform)."""
    return math.floor(size / crop_pct)


def resize_shorter_side(img: Image.Image, side: int, interpolation: str) -> Image.Image:
    """Shorter side to `side`, aspect kept, the longer side truncated as torchvision's Resize(int) does."""
    width, height = img.size
    if width <= height:
        new_w, new_h = side, int(side * height / width)
    else:
        new_w, new_h = int(side * width / height), side
    return img.resize((new_w, new_h), _INTERPOLATION[interpolation])


def center_offset(length: int, size: int) -> int:
    """Start of a centered `size` window in `length` pixels (torchvision CenterCrop's rounding)."""
    return int(round((length - size) / 2.0))


def resize_and_crop(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> Image.Image:
    """Shorter side to floor(size / crop_pct), then a centered size x size crop (timm eval transform)."""
    img = resize_shorter_side(img, resize_side(size, crop_pct), interpolation)
    left, top = center_offset(img.width, size), center_offset(img.height, size)
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, mean: Any, std: Any) -> np.ndarray:
    """(H, W, 3) uint8 image -> (3, H, W) float32, scaled to [0, 1] then normalised per channel."""
    array = np.asarray(img, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(img: Image.Image, data_config: dict[str, Any]) -> np.ndarray:
    """One RGB PIL image -> (3, S, S) float32 model input, as the backbone's pretrained config says."""
    size = int(data_config["input_size"][-1])
    cropped = resize_and_crop(to_rgb(img), size, float(data_config["crop_pct"]), data_config["interpolation"])
    return normalize(cropped, data_config["mean"], data_config["std"])


def preprocess_file(path: Path | str, data_config: dict[str, Any]) -> np.ndarray:
    return preprocess(open_rgb(path), data_config)

"""Evaluation preprocessing in numpy + PIL only (no torch), so ONNX `predict` and the `evaluate` stage run
byte-for-byte the same steps: open (EXIF-aware, to sRGB as a viewer shows it) -> resize shorter side -> center
crop -> normalise. The training cache (pipeline.data.cache) decodes and resizes with the same functions.

The steps follow timm's eval transform for the backbone's data config: the shorter side is resized to
floor(size / crop_pct) with the config's interpolation, then a centered size x size crop is taken. Memory is
bounded by the input size whatever the image's shape (see `resized_square`).
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # imported where used: a Pillow built without littlecms still decodes (unconverted)
    from PIL.ImageCms import ImageCmsTransform

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
# Longest side, in shorter sides, of an image `resized_square` resizes whole (phone panoramas reach ~10):
# the resized image then holds at most 16 x side^2 pixels.
_MAX_ASPECT = 16
# Grey modes that hold 16 bits (PIL decodes 16-bit PGMs to I; ingest quarantines I values outside 0..65535).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# RGB primaries (x, y chromaticities, D50-adapted as ICC profiles hold them) of sRGB: a profile with the same
# primaries is sRGB for our purpose (some, e.g. Facebook's tiny "c2", do not say so in their description).
_SRGB_PRIMARIES = ((0.6484, 0.3309), (0.3212, 0.5979), (0.1559, 0.0661))


def open_rgb(path: Path | str) -> Image.Image:
    """Decode an image file fully into 8-bit sRGB as a viewer shows it (`to_rgb`), EXIF-oriented."""
    return to_rgb(open_oriented(path))


def open_oriented(path: Path | str) -> Image.Image:
    """Decode an image file fully in its own mode, with its EXIF orientation applied."""
    with Image.open(path) as img:
        ImageOps.exif_transpose(img, in_place=True)  # loads it; in place: no second copy of a 100 MP image
        return img


def to_rgb(img: Image.Image, *, keep_grey: bool = False) -> Image.Image:
    """`img` in 8-bit sRGB as a colour-managed viewer shows it on a white page: "RGB", or with `keep_grey` a
    grey image as one channel ("L": the bytes its RGB conversion repeats). `img` itself is never changed.

    Transparent pixels (an alpha band, a palette's transparent entries, a PNG colour key) are composited on
    white; 16-bit values are scaled by 255/65535, the same for every image; an embedded colour profile other
    than sRGB is converted to sRGB by littlecms (or, where it cannot be, the values are used as sRGB and
    ingest notes the image: `unconverted_profile`); CMYK without a profile is converted by PIL.
    """
    keyed = _keyed_pixels(img)  # on the values as stored: a key is one exact value
    try:
        transform = _srgb_transform(img)
    except Exception:  # littlecms refuses the profile (PyCMSError), or it is not for these colours
        transform = None
    if img.mode in _SIXTEEN_BIT:
        img = _eight_bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = _on_white(img)
    if transform is not None:
        img = transform.apply(img)  # the profile's RGB (or CMYK) -> sRGB, a new image
    if img.mode != "RGB" and not (keep_grey and img.mode == "L"):
        img = img.convert("RGB")  # convert would copy an RGB image
    if keyed is not None:
        img = img.copy()  # it may still be the caller's image
        img.paste(255 if img.mode == "L" else (255, 255, 255), mask=keyed)
    return img


def unconverted_profile(img: Image.Image) -> bool:
    """Whether `img` embeds a colour profile other than sRGB that `to_rgb` cannot convert (littlecms refuses
    it, or it is not for the image's colours), so that its values are used as sRGB."""
    try:
        _srgb_transform(img)
    except Exception:
        return True
    return False


def _on_white(img: Image.Image) -> Image.Image:
    """An image with an alpha band composited on white, as RGB."""
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # convert would copy an RGBA image
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grey to "L", value / 257 rounded (255/65535: what a viewer shows, the same for every image;
    PIL's own convert clips at 255). Mode I values outside 0..65535 (ingest quarantines them) are clipped
    first. 4 bytes a pixel of working memory, where float64 would take 8."""
    values = np.array(img, dtype=np.int32)  # a copy: the in-place steps below never touch `img`
    np.clip(values, 0, 65535, out=values)
    values += 128  # (v + 128) // 257 == round(v / 257): v / 257 is never exactly half-way
    values //= 257
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _keyed_pixels(img: Image.Image) -> Image.Image | None:
    """Mask ("1") of the pixels a PNG colour key (tRNS: one value, transparent wherever a pixel has exactly
    it) makes transparent, or None. PIL decodes a 48-bit PNG to 8 bits but keeps its 16-bit key, which is
    then compared with the 8-bit values, as ingest counts keyed pixels (a key above 255 matches none)."""
    key = img.info.get("transparency")
    if key is None or isinstance(key, bytes) or img.mode not in ("L", "RGB", *_SIXTEEN_BIT):
        return None
    hits = np.asarray(img) == np.asarray(key)
    if hits.ndim == 3:
        hits = hits.all(axis=-1)
    return Image.fromarray(hits) if hits.any() else None


def _srgb_transform(img: Image.Image) -> ImageCmsTransform | None:
    """The littlecms transform (PIL.ImageCms) of `img`'s colours from its embedded profile to sRGB, or None
    where its values are sRGB's already: no profile, an sRGB or grey one, or one that cannot be read (viewers
    then assume sRGB). Raises where littlecms cannot use the profile or it is for other colours than the
    image's (`img`'s colours are RGB once composited on white: modes RGB, RGBA, P, PA)."""
    icc = img.info.get("icc_profile")
    space = _foreign_space(icc) if icc else ""
    if not space:
        return None
    colours = "CMYK" if img.mode == "CMYK" else "RGB" if img.mode in ("RGB", "RGBA", "P", "PA") else img.mode
    if space != colours:
        raise ValueError(f"a {space} colour profile on a {img.mode} image")
    return _transform_to_srgb(icc, space)


@functools.lru_cache(maxsize=16)
def _transform_to_srgb(icc: bytes, space: str) -> ImageCmsTransform:
    """Built once per profile (2.4 ms each for a matrix profile; a camera's photos share one). littlecms
    transforms may be shared by threads: each call copies the transform's one-pixel cache."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), space, "RGB")


def _foreign_space(icc: bytes) -> str:
    """The colour space ("RGB" or "CMYK") of an ICC profile that makes pixel values mean other colours than
    sRGB's: any CMYK profile, or an RGB one whose primaries are not sRGB's; "" for others and for a profile
    that cannot be read (viewers ignore those)."""
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile
    except Exception:  # no littlecms in this Pillow, or a corrupt profile: PyCMSError, OSError, ...
        return ""
    space = profile.xcolor_space.strip()
    if space == "CMYK":
        return space
    if space != "RGB" or "srgb" in (profile.profile_description or "").lower():
        return ""
    primaries = (profile.red_primary, profile.green_primary, profile.blue_primary)
    if any(primary is None for primary in primaries):
        return space
    foreign = any(
        abs(xyY[0] - x) > 0.01 or abs(xyY[1] - y) > 0.01
        for (_, xyY), (x, y) in zip(primaries, _SRGB_PRIMARIES, strict=True)
    )
    return space if foreign else ""


def resize_side(size: int, crop_pct: float) -> int:
    """The shorter side before the eval crop: floor(size / crop_pct) (timm's eval transform)."""
    return math.floor(size / crop_pct)


def _shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    width, height = size
    return (side, int(side * height / width)) if width <= height else (int(side * width / height), side)


def center_offset(length: int, size: int) -> int:
    """Start of a centered `size` window in `length` pixels (torchvision CenterCrop's rounding)."""
    return int(round((length - size) / 2.0))


def resize_and_crop(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> Image.Image:
    """Shorter side to floor(size / crop_pct), then a centered size x size crop (timm eval transform): the
    center of `resized_square`, so the training cache (pipeline.data.cache) holds this crop byte for byte."""
    square = resized_square(img, size, resize_side(size, crop_pct), interpolation)
    inner = center_offset(square.width, size)
    return square.crop((inner, inner, inner + size, inner + size))


def resized_square(img: Image.Image, size: int, side: int, interpolation: str) -> Image.Image:
    """`img` with its shorter side resized to `side` (the longer truncated as torchvision's Resize(int) does),
    cut to the square of max(side, size) pixels whose centered size x size crop is CenterCrop(size)'s.

    Memory is bounded by the input size whatever the shape: an image whose resized longer side would exceed
    _MAX_ASPECT shorter sides (a 4 KB PNG of 1 x 1,000,000 px at size 32: 36 x 36,000,000 px, 5 GB) has only
    the square's span of that side resampled, with PIL's `box`. That is the same geometry up to the box's
    float32 rounding and the order of PIL's two passes: on smooth 24:1 images at most 2 grey levels from the
    whole resize (mean 0.04). Other images are resized whole.
    """
    square = max(side, size)
    new_w, new_h = _shorter_side_to(img.size, side)
    inner = center_offset(square, size)  # where the size x size crop starts in the square
    left, top = center_offset(new_w, size) - inner, center_offset(new_h, size) - inner
    resample = _INTERPOLATION[interpolation]
    if max(new_w, new_h) <= _MAX_ASPECT * side:
        resized = img.resize((new_w, new_h), resample)
    elif new_w > new_h:  # wide: the columns [left, left + square) of the resized image, from their source
        box = (left * img.width / new_w, 0, min((left + square) * img.width / new_w, img.width), img.height)
        resized, left = img.resize((square, new_h), resample, box=box), 0
    else:  # tall: the rows [top, top + square)
        box = (0, top * img.height / new_h, img.width, min((top + square) * img.height / new_h, img.height))
        resized, top = img.resize((new_w, square), resample, box=box), 0
    return resized.crop((left, top, left + square, top + square))


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

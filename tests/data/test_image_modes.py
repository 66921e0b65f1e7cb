"""Odd image modes through ingest's decode path: every image that decodes is either trained on as a person
would see it (the RGB that the training cache and the eval preprocessing both decode), or it gets a status
(and is quarantined), or it is used with a note that ingest reports naming the file.

Each case writes one tiny image and says what a person sees: a viewer shows transparent areas on white (the
project's rule, as a browser page does), whether an alpha band, a palette or a PNG colour key makes them so;
16-bit values scaled by 255/65535 whatever the image's brightest value, never clipped; colours converted from
their embedded profile to sRGB.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import data_stage_params, make_image
from PIL import Image, ImageCms

from pipeline.data import images
from pipeline.io import read_json
from pipeline.preprocess import open_rgb, to_rgb
from pipeline.stages import ingest, validate

SIDE = 16  # every image is 16 x 16 unless it is about the size
GREY, WHITE = (128, 128, 128), (255, 255, 255)
PINK = (230, 90, 140)


def _flat(colour: tuple[int, int, int], height: int = SIDE, width: int = SIDE) -> np.ndarray:
    return np.tile(np.asarray(colour, dtype=np.uint8), (height, width, 1))


def _halves(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    pixels = _flat(top)
    pixels[SIDE // 2 :] = bottom
    return pixels


def _save(img: Image.Image, **options) -> Callable[[Path], None]:
    return lambda path: img.save(path, **options)


def _frames(*colours: tuple[int, int, int]) -> Callable[[Path], None]:
    """An animation or multi-page file whose frames are flat colours."""
    frames = [Image.fromarray(_flat(colour)) for colour in colours]
    return lambda path: frames[0].save(path, save_all=True, append_images=frames[1:])


def _png(bit_depth: int, colour_type: int, row: bytes, key: bytes = b"") -> Callable[[Path], None]:
    """A PNG written by hand (16-bit colour PNGs, which PIL cannot write): every row the same; `key`: the
    tRNS chunk of a colour key (the value transparent, 16 bits a sample)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", SIDE, SIDE, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + (chunk(b"tRNS", key) if key else b"")
    body += chunk(b"IDAT", zlib.compress((b"\0" + row) * SIDE)) + chunk(b"IEND", b"")
    return lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _truncated_png(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # cut inside the pixel data


def _icc_profile(description: str, colorants, gamma: float | None) -> bytes:
    """A minimal ICC v2 RGB display profile: D50-adapted red, green and blue colorants (X, Y, Z each), one
    gamma for all channels (None: no tone curves, a profile littlecms cannot convert from)."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(value) -> bytes:
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in value)

    text = description.encode("ascii") + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * (4 + 4 + 2 + 1 + 67)
    curves = [] if gamma is None else [b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256))] * 3
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz((0.9642, 1.0, 0.8249))),
        *((name, xyz(value)) for name, value in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants, strict=True)),
        *zip((b"rTRC", b"gTRC", b"bTRC"), curves, strict=False),  # none without a gamma
        (b"cprt", b"text" + b"\0" * 4 + b"none\0"),
    ]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for name, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += name + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I", offset + len(data)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    return header + struct.pack(">I", len(tags)) + table + data


ADOBE_COLORANTS = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))
ADOBE_RGB = _icc_profile("Adobe RGB (1998)", ADOBE_COLORANTS, 2.2)
ADOBE_RGB_NO_CURVES = _icc_profile("Adobe RGB (1998)", ADOBE_COLORANTS, None)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
# sRGB's primaries under a name that does not say so (as Facebook's 524-byte "c2" profile does)
SRGB_UNNAMED = _icc_profile("c2", SRGB_COLORANTS, 2.2)
GREEN = (60, 160, 60)  # Adobe RGB's green is wider than sRGB's: this one is (0, 161, 46) in sRGB


def _adobe_to_srgb(colour: tuple[int, int, int]) -> tuple[int, ...]:
    """What a colour-managed viewer shows for `colour` in ADOBE_RGB, worked out by hand: undo its gamma, its
    colorants to XYZ, sRGB's colorants back (clipped to sRGB's gamut), then sRGB's tone curve."""
    linear = (np.asarray(colour) / 255) ** 2.2
    srgb = np.linalg.solve(np.transpose(SRGB_COLORANTS), np.transpose(ADOBE_COLORANTS) @ linear).clip(0, 1)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return tuple(int(value) for value in (encoded * 255).round())


def _rgba(top: tuple[int, int, int, int], bottom: tuple[int, int, int, int]) -> Image.Image:
    pixels = np.tile(np.asarray(top, dtype=np.uint8), (SIDE, SIDE, 1))
    pixels[SIDE // 2 :] = bottom
    return Image.fromarray(pixels, "RGBA")


def _palette(transparent: bytes) -> Image.Image:
    """Palette entries 0 = pink (top half) and 1 = grey (bottom half), with tRNS alphas `transparent`."""
    img = Image.fromarray(np.repeat([0, 1], SIDE * SIDE // 2).reshape(SIDE, SIDE).astype(np.uint8), "P")
    img.putpalette([*PINK, *GREY])
    img.info["transparency"] = transparent
    return img


def _keyed(key: tuple[int, int, int], everywhere: bool = False) -> Callable[[Path], None]:
    """An RGB PNG whose tRNS chunk makes `key` transparent; its top half (or every pixel) has that colour."""
    pixels = _flat(key) if everywhere else _halves(key, GREY)
    return _save(Image.fromarray(pixels), transparency=key)


def _grey16(values: np.ndarray) -> Callable[[Path], None]:
    return _save(Image.fromarray(values.astype(np.uint16)))


def _dark16(value: int) -> Callable[[Path], None]:
    """A flat 16-bit grey PNG of `value`: a viewer shows value / 257 in 8 bits, however dark the image is."""
    return _grey16(np.full((SIDE, SIDE), value))


def _plain(colour: tuple[int, int, int], **options) -> Callable[[Path], None]:
    return _save(Image.fromarray(_flat(colour)), **options)


def _left_right(left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    return _halves(left, right).transpose(1, 0, 2)


RAMP16 = np.tile(np.linspace(0, 65535, SIDE).round(), (SIDE, 1))  # black to white, left to right


@dataclass(frozen=True)
class Case:
    name: str  # file name; the suffix picks the format
    write: Callable[[Path], None]
    sees: np.ndarray | None  # what a person sees (H, W, 3); None: not used
    status: str = "ok"
    notes: tuple[str, ...] = ()
    tolerance: int = 1  # grey levels: rounding, or a JPEG's loss


CASES = [
    # 16-bit and 32-bit integer grey: scaled by 255/65535, never clipped to white (PIL's own convert clips);
    # the same scale for a dark image as for a bright one (250 once came out as 250, 260 as 1)
    Case("grey16.png", _grey16(np.full((SIDE, SIDE), 32896)), _flat(GREY)),
    Case("ramp16.png", _grey16(RAMP16), np.repeat((RAMP16 / 257).round().astype(np.uint8)[..., None], 3, 2)),
    Case("grey16.tif", _grey16(np.full((SIDE, SIDE), 32896)), _flat(GREY)),
    Case("grey16.pgm", _grey16(np.full((SIDE, SIDE), 32896)), _flat(GREY)),  # PIL: mode I
    Case("grey32.tif", _save(Image.fromarray(np.full((SIDE, SIDE), 32896, np.int32))), _flat(GREY)),
    Case("rgb48.png", _png(16, 2, struct.pack(">HHH", 32896, 32896, 32896) * SIDE), _flat(GREY)),
    Case("rgba64.png", _png(16, 6, struct.pack(">HHHH", 32896, 32896, 32896, 65535) * SIDE), _flat(GREY)),
    Case("grey_alpha16.png", _png(16, 4, struct.pack(">HH", 32896, 65535) * SIDE), _flat(GREY)),
    Case("dark16_250.png", _dark16(250), _flat((1, 1, 1)), tolerance=0),
    Case("dark16_260.png", _dark16(260), _flat((1, 1, 1)), tolerance=0),
    Case("dark16.pgm", _dark16(200), _flat((1, 1, 1)), tolerance=0),  # PIL: mode I
    # No agreed white level: float pixels (1.0 in most viewers, 255 in PIL), integers beyond 16 bits
    Case("float_0_1.tif", _save(Image.fromarray(np.full((SIDE, SIDE), 0.5, np.float32))), None,
         "ambiguous_brightness"),
    Case("float_0_65535.tif", _save(Image.fromarray(np.full((SIDE, SIDE), 32896.0, np.float32))), None,
         "ambiguous_brightness"),
    Case("float_0_255.tif", _save(Image.fromarray(np.full((SIDE, SIDE), 128.0, np.float32))), None,
         "ambiguous_brightness"),
    Case("int32_negative.tif", _save(Image.fromarray(np.full((SIDE, SIDE), -100, np.int32))), None,
         "ambiguous_brightness"),
    Case("int32_over_16_bits.tif", _save(Image.fromarray(np.full((SIDE, SIDE), 70000, np.int32))), None,
         "ambiguous_brightness"),
    # Other colour models
    Case("cmyk.jpg", _save(Image.fromarray(_flat(PINK)).convert("CMYK"), quality=95), _flat(PINK),
         tolerance=4),
    Case("cmyk.tif", _save(Image.fromarray(_flat(PINK)).convert("CMYK")), _flat(PINK)),
    Case("one_bit.png", _save(Image.fromarray(_halves((255,) * 3, (0,) * 3)[..., 0] > 0)),
         _halves(WHITE, (0, 0, 0)), tolerance=0),
    Case("grey.png", _save(Image.fromarray(_flat(GREY)[..., 0])), _flat(GREY), tolerance=0),
    # Transparency: composited on white, as a viewer shows it on a white page
    Case("rgba_half_clear.png", _save(_rgba((0, 0, 0, 0), (*PINK, 255))), _halves(WHITE, PINK)),
    Case("rgba_half_alpha.png", _save(_rgba((0, 0, 0, 128), (*PINK, 255))), _halves((127,) * 3, PINK)),
    Case("rgba_clear.png", _save(_rgba((*PINK, 0), (0, 0, 0, 0))), None, "fully_transparent"),
    Case("rgba_clear.webp", _save(_rgba((*PINK, 0), (0, 0, 0, 0)), lossless=True), None, "fully_transparent"),
    Case("grey_alpha.png", _save(Image.new("LA", (SIDE, SIDE), (128, 255))), _flat(GREY)),
    Case("palette_clear_entry.png", _save(_palette(b"\0")), _halves(WHITE, GREY)),
    Case("palette_clear_entry.gif", _save(_palette(b"\0"), transparency=0), _halves(WHITE, GREY)),
    Case("palette_all_clear.png", _save(_palette(b"\0\0")), None, "fully_transparent"),
    Case("colour_key.png", _keyed((0, 0, 0)), _halves(WHITE, GREY)),
    Case("grey_colour_key.png", _save(Image.fromarray(_halves((0,) * 3, GREY)[..., 0]), transparency=0),
         _halves(WHITE, GREY), tolerance=0),
    Case("grey16_colour_key.png", _png(16, 0, struct.pack(">H", 1000) * 8 + struct.pack(">H", 32896) * 8,
                                       key=struct.pack(">H", 1000)), _left_right(WHITE, GREY)),
    Case("colour_key_everywhere.png", _keyed((0, 0, 0), everywhere=True), None, "fully_transparent"),
    Case("colour_key_unused.png", _save(Image.fromarray(_flat(GREY)), transparency=(1, 2, 3)), _flat(GREY)),
    # Several frames: the first is used, with a note
    Case("animated.gif", _frames(GREY, PINK), _flat(GREY), notes=("first_frame",), tolerance=3),
    Case("animated.png", _frames(GREY, PINK), _flat(GREY), notes=("first_frame",)),
    Case("animated.webp", _frames(GREY, PINK), _flat(GREY), notes=("first_frame",), tolerance=3),
    Case("pages.tif", _frames(GREY, PINK), _flat(GREY), notes=("first_frame",)),
    # Colour profiles: sRGB ones are what we assume; others are converted to sRGB, or where littlecms cannot,
    # used unconverted with a note; one that cannot be read is ignored, as viewers do
    Case("srgb.png", _plain(PINK, icc_profile=SRGB), _flat(PINK)),
    Case("srgb_unnamed.png", _plain(PINK, icc_profile=SRGB_UNNAMED), _flat(PINK)),
    Case("adobe_rgb.png", _plain(GREEN, icc_profile=ADOBE_RGB), _flat(_adobe_to_srgb(GREEN))),
    Case("adobe_rgb_alpha.png", _save(_rgba((0, 0, 0, 0), (*GREEN, 255)), icc_profile=ADOBE_RGB),
         _halves(WHITE, _adobe_to_srgb(GREEN))),
    Case("adobe_rgb_no_curves.png", _plain(PINK, icc_profile=ADOBE_RGB_NO_CURVES), _flat(PINK),
         notes=("colour_profile",)),
    Case("broken_profile.png", _plain(PINK, icc_profile=b"not a profile"), _flat(PINK)),
    # Sizes: validate's min_side decides about a 1 x 1 image; a long strip decodes whole
    Case("one_pixel.png", _save(Image.fromarray(_flat(PINK, 1, 1))), _flat(PINK, 1, 1), tolerance=0),
    Case("strip.png", _save(Image.fromarray(_flat(PINK, SIDE, 200 * SIDE))), _flat(PINK, SIDE, 200 * SIDE),
         tolerance=0),
    Case("truncated.png", _truncated_png, None, "truncated"),
]  # fmt: skip


def _inspect(folder: Path, name: str) -> dict[str, object]:
    return images.inspect(str(folder), 10**8, images.Candidate(name, "odd"), max_decode_bytes=64 * images.MIB)


def _decoded(path: Path) -> dict[str, np.ndarray]:
    """The RGB pixels the pipeline decodes: for evaluation and predict (open_rgb), and for the training cache
    (open_reduced; grey stays one channel until resized, then is repeated)."""
    reduced = images.open_reduced(path, 1)  # as small as the image allows: a box reduction where it divides
    train = np.asarray(to_rgb(reduced, keep_grey=True))
    return {
        "eval": np.asarray(open_rgb(path)),
        "train": np.repeat(train[..., None], 3, 2) if train.ndim == 2 else train,
    }


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_image_is_decoded_as_a_person_sees_it_or_reported(tmp_path, case):
    case.write(tmp_path / case.name)
    row = _inspect(tmp_path, case.name)
    assert (row["status"], tuple(row.get("notes", ()))) == (case.status, case.notes), row
    if case.sees is None:
        return
    for use, pixels in _decoded(tmp_path / case.name).items():
        step = case.sees.shape[0] // pixels.shape[0]  # a reduced decode: every `step`-th pixel (flat blocks)
        expected = case.sees[::step, ::step]
        assert pixels.shape == expected.shape, use
        worst = np.abs(pixels.astype(int) - expected).max()
        assert worst <= case.tolerance, f"{use}: off by {worst} grey levels from what a person sees"


def test_ingest_and_validate_name_every_odd_image_with_its_reason(tmp_path, caplog):
    """Through the stages: the images with a status are quarantined with it as their reason, the 1 x 1
    image by validate's min_side; each kind of note is one warning naming its images and listed in full in
    ingest's details; everything else is usable."""
    root = tmp_path / "data"
    for k in range(2):
        for i in range(10):
            make_image(root / f"class_{k}" / f"good_{i}.png", k, seed=10 * k + i)
    odd = [case for case in CASES if case.name != "strip.png"]  # min_side 16 is fine; it stays usable
    for case in odd:
        case.write(root / "class_0" / case.name)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0}, validate={"max_bad_fraction": 0.9})
    with caplog.at_level(logging.WARNING):
        ingest.run(params)
        validate.run(params)

    quarantine = pd.read_csv(params.paths.quarantine, dtype=str, keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"], strict=True))
    expected = {f"class_0/{c.name}": c.status for c in odd if c.status != "ok"}
    expected["class_0/one_pixel.png"] = "min_side"
    assert reasons == expected
    notes = read_json(params.paths.details("ingest"))["notes"]
    for kind in images.NOTES:
        named = sorted(f"class_0/{c.name}" for c in odd if kind in c.notes)
        assert notes[kind] == named, kind
        warning = next(r.getMessage() for r in caplog.records if images.NOTES[kind] in r.getMessage())
        assert warning.startswith(f"ingest: {len(named)} image(s) ")
        assert all(repr(path) in warning for path in named)


def test_ingest_caches_each_usable_image_as_the_cache_build_decodes_it(tmp_path, monkeypatch):
    """Ingest's one decode gives the image cache's squares: byte for byte what the cache build decodes from
    the file, for every odd mode, a rotated JPEG and a large PNG; the build then decodes nothing."""
    from PIL import ImageOps

    from pipeline.data import cache
    from pipeline.models import resolve_data_config

    root = tmp_path / "data"
    usable = [case for case in CASES if case.status == "ok"]
    (root / "odd").mkdir(parents=True)
    for case in usable:
        case.write(root / "odd" / case.name)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated
    photo = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "odd" / "rotated.jpg", quality=90, exif=exif)
    Image.fromarray(photo).save(root / "odd" / "large.png")
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0}, model={"image_size": 32})
    ingest.run(params)

    rows = pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False).query("status == 'ok'")
    scanned = [case.name for case in usable if Path(case.name).suffix in params.ingest.extensions]
    assert sorted(rows["path"]) == sorted(f"odd/{name}" for name in [*scanned, "rotated.jpg", "large.png"])
    assert read_json(params.paths.details("ingest"))["squares_cached"] == len(rows)
    files = [root / path for path in rows["path"]]
    names = [cache.identity(path, sha) for path, sha in zip(rows["path"], rows["sha256"], strict=True)]
    config = resolve_data_config(params.model)
    decoded = cache.open_cache(cache.build_cache(files, names, config, tmp_path / "decoded", workers=1))[:]
    monkeypatch.setattr(cache, "_load", lambda *_: pytest.fail("the cache build decoded an image"))
    prefilled = cache.open_cache(cache.build_cache(files, names, config, params.paths.cache_dir, workers=1))[
        :
    ]

    for name, ours, theirs in zip(rows["path"], prefilled, decoded, strict=True):
        assert np.array_equal(ours, theirs), name
    rotated = list(rows["path"]).index("odd/rotated.jpg")
    upright = cache.cached_square(ImageOps.exif_transpose(Image.open(root / "odd/rotated.jpg")), config)
    assert np.abs(prefilled[rotated].astype(int) - upright).mean() < 2  # shown rotated, not as stored

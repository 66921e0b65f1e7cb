"""predict on images of any shape: memory bounded by the input size (a 4 KB PNG of 1 x 1,000,000 px once took
5 GB), and a file that cannot be read or does not fit costs that file one error, never the batch.

The memory checks run in a child process that measures its own peak resident memory and caps its address space
1 GiB above what it holds, so a regression fails fast with MemoryError instead of swapping the machine
(`run_child`, which tests/data/test_cache_memory.py uses too).
"""

from __future__ import annotations

import csv
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image, run_child
from PIL import Image
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.serving import predict
from pipeline.serving.predict import Predictor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, sets RLIMIT_AS")

CONFIG = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,
}

_PREPROCESS = """
from pipeline.preprocess import preprocess_file
cap_memory()
before = peak_mib()
inputs = preprocess_file(sys.argv[1], json.loads(sys.argv[2]))
print(json.dumps({"shape": inputs.shape, "mib": peak_mib() - before}))
"""

_PREDICT = """
from pipeline.serving.predict import Predictor
predictor = Predictor(sys.argv[1], precision="fp32")
predictor.predict(sys.argv[2:3])  # ONNX Runtime's threads and arenas start here, before the cap
cap_memory()
results = predictor.predict(sys.argv[2:])
print(json.dumps([[r.source, r.error, r.labels] for r in results]))
"""


def _strip(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def _gradient(path: Path, side: int) -> Path:
    """A side x side RGB PNG that compresses well (a few hundred KB for 4000 px)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (side, 1))] * 3, axis=-1)).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "pixels"),
    [
        (
            lambda path: _strip(path, 1, 1_000_000),
            1_000_000,
        ),  # whole, it would resize to 256 x 256,000,000 px
        (lambda path: _strip(path, 1_000_000, 1), 1_000_000),
        (lambda path: _gradient(path, 4000), 16_000_000),  # decoded once, not copied twice more
    ],
    ids=["1x1000000", "1000000x1", "4000x4000"],
)
def test_preprocessing_takes_one_decoded_copy_plus_a_constant_whatever_the_shape(tmp_path, make, pixels):
    image = make(tmp_path / "image.png")
    proc = run_child(_PREPROCESS, str(image), json.dumps(CONFIG))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    decoded_mib = pixels * 4 / 2**20  # PIL keeps RGB in 4 bytes a pixel
    assert result["shape"] == [3, 224, 224] and result["mib"] < decoded_mib + 32, result


def test_a_batch_with_a_4kb_png_of_1x1000000_px_predicts_every_image(exported_project, tmp_path):
    strip = _strip(tmp_path / "strip.png", 1, 1_000_000)
    assert strip.stat().st_size < 8_000
    photos = [str(make_image(tmp_path / f"photo_{k}.png", k, seed=k)) for k in range(2)]
    export = str(exported_project.paths.export_dir)
    proc = run_child(_PREDICT, export, photos[0], str(strip), photos[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert [(source, error) for source, error, _ in results] == [
        (p, None) for p in (photos[0], str(strip), photos[1])
    ]
    alone = Predictor(export, precision="fp32").predict(photos)
    assert [labels for _, _, labels in results[::2]] == [[list(pair) for pair in r.labels] for r in alone]


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB pixels (no pixel data: PIL refuses it at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_file_that_does_not_fit_in_memory_costs_one_error_line_not_the_batch(
    exported_project, tmp_path, monkeypatch
):
    photos = [str(make_image(tmp_path / f"photo_{k}.png", k, seed=k)) for k in range(2)]
    huge = str(make_image(tmp_path / "huge.png", 2))  # reads as if it were too large to decode
    bomb = str(_png_header(tmp_path / "bomb.png", 20_000, 20_000))  # 400 MP: PIL's decompression-bomb limit
    opened = predict.open_rgb

    def open_rgb(path):
        if path == huge:
            raise MemoryError()
        return opened(path)

    monkeypatch.setattr(predict, "open_rgb", open_rgb)
    args = [photos[0], huge, bomb, photos[1], "--model", str(exported_project.paths.export_dir)]
    result = CliRunner().invoke(app, ["predict", *args, "--precision", "fp32", "--format", "csv"])
    assert result.exit_code == 1 and "predict: 2 of 4 inputs failed" in result.output, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["path"] for row in rows] == [photos[0], huge, bomb, photos[1]]
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert errors[huge] == "MemoryError: the image does not fit in memory"
    assert errors[bomb].startswith("DecompressionBombError: Image size (400000000 pixels) exceeds limit")
    assert all(row["label"] for row in rows if row["path"] in photos)

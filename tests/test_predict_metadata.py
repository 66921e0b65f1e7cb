"""predict checks an export folder against its model files' metadata: a reordered labels.json, an edited
preprocess.json or a model file without the export's metadata stops it with one line (CLI and API)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from helpers import make_image
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.errors import PipelineError
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor

_FIX = "re-run the export stage (dvc repro export) or copy the whole export folder again"


@pytest.fixture
def export_copy(exported_project, tmp_path) -> Path:
    """A copy of the shared export folder (FP32 and INT8 models), free to tamper with."""
    return Path(shutil.copytree(exported_project.paths.export_dir, tmp_path / "export"))


def _edit_json(name: str, edit: Callable[[object], object]) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return tamper


def _edit_metadata(name: str, edit: Callable[[dict[str, str]], dict[str, str]]) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        model = onnx.load(str(folder / name))
        meta = edit({prop.key: prop.value for prop in model.metadata_props})
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(folder / name))

    return tamper


def _swap_first_two(names: list[str]) -> list[str]:
    return [names[1], names[0], *names[2:]]


_TAMPERED = [
    (
        _edit_json(rt.LABELS_FILE, _swap_first_two),
        "fp32",
        "labels.json: class 0 is 'class_1' (the same names in another order), but 'class_0' in model.onnx's "
        "metadata (class_names)",
    ),
    (
        _edit_json(rt.LABELS_FILE, lambda names: [*names[:2], "class_9"]),
        "fp32",
        "labels.json: class 2 is 'class_9', but 'class_2' in model.onnx's metadata (class_names)",
    ),
    (
        _edit_json(rt.PREPROCESS_FILE, lambda cfg: {**cfg, "mean": [0.5, 0.5, 0.5]}),
        "fp32",
        "preprocess.json: mean is [0.5, 0.5, 0.5] but model.onnx was exported with [0.485, 0.456, 0.406]",
    ),
    (
        _edit_json(rt.PREPROCESS_FILE, lambda cfg: {**cfg, "std": [1, 1, 1]}),
        "fp32",
        "preprocess.json: std is [1, 1, 1] but model.onnx was exported with [0.229, 0.224, 0.225]",
    ),
    (
        _edit_json(rt.PREPROCESS_FILE, lambda cfg: {**cfg, "crop_pct": 0.875}),
        "fp32",
        "preprocess.json: crop_pct is 0.875 but model.onnx was exported with 0.95",
    ),
    (
        _edit_json(rt.PREPROCESS_FILE, lambda cfg: {**cfg, "interpolation": "nearest"}),
        "fp32",
        "preprocess.json: interpolation is 'nearest' but model.onnx was exported with 'bicubic'",
    ),
    (
        _edit_metadata(rt.FP32_FILE, lambda meta: {}),
        "fp32",
        "model.onnx: no pipeline metadata (class_names, input_size, interpolation, mean, std, crop_pct)",
    ),
    (  # served FP32 here, but another CPU would serve it
        _edit_metadata(rt.INT8_FILE, lambda meta: {}),
        "fp32",
        "model.int8.onnx: no pipeline metadata",
    ),
    (
        _edit_metadata(
            rt.INT8_FILE,
            lambda m: {**m, "class_names": json.dumps(_swap_first_two(json.loads(m["class_names"])))},
        ),
        "int8",
        "labels.json: class 0 is 'class_0' (the same names in another order), but 'class_1' in "
        "model.int8.onnx's metadata (class_names)",
    ),
    (
        _edit_metadata(rt.FP32_FILE, lambda meta: {**meta, "temperature": "hot"}),
        "fp32",
        "model.onnx: metadata temperature must be a positive number, got 'hot'",
    ),
]


_CASES = ["labels-reordered", "labels-renamed", "mean", "std", "crop_pct", "interpolation", "no-metadata"]
_CASES += ["int8-no-metadata", "int8-labels-reordered", "temperature"]


@pytest.mark.parametrize(("tamper", "precision", "expected"), _TAMPERED, ids=_CASES)
def test_a_tampered_export_stops_predict_with_one_line(export_copy, tmp_path, tamper, precision, expected):
    tamper(export_copy)
    image = make_image(tmp_path / "photo.png", 1)
    with pytest.raises(PipelineError) as raised:
        Predictor(export_copy, precision=precision)
    assert expected in str(raised.value) and str(raised.value).endswith(_FIX), raised.value
    assert "\n" not in str(raised.value)

    args = ["predict", str(image), "--model", str(export_copy), "--precision", precision]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip() == f"predict: {raised.value}"


def test_a_reordered_labels_json_stops_the_cli_before_any_prediction(export_copy, tmp_path):
    """The command line, in its own process: one line on stderr, nothing on stdout, exit 2."""
    _edit_json(rt.LABELS_FILE, _swap_first_two)(export_copy)
    image = make_image(tmp_path / "photo.png", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", str(image), "--model", str(export_copy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"predict: {export_copy / rt.LABELS_FILE}: class 0 is 'class_1'"
    ) and line.endswith(_FIX)


def test_an_untouched_copy_predicts_with_either_model(export_copy, tmp_path):
    image = make_image(tmp_path / "photo.png", 1)
    for precision in ("fp32", "int8"):
        (prediction,) = Predictor(export_copy, precision=precision).predict([image])
        assert prediction.ok and prediction.labels[0][0].startswith("class_")

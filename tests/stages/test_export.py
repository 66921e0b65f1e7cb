"""export stage: self-contained folder, metadata round-trip, a parity check that catches a bad model."""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import PROJECT_ROOT, SHIP_ANY_INT8, model_project

from pipeline.config import Params
from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json
from pipeline.models import TrainedModel, load_trained
from pipeline.pages.model_card import model_card
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor, UsageError
from pipeline.stages import export, quantize
from pipeline.stages.quantize import int8, search

TEMPERATURE = 1.7  # what conftest's exported_project writes to the calibration file


def test_folder_is_complete(exported_project):
    params = exported_project
    names = sorted(p.name for p in Path(params.paths.export_dir).iterdir())
    assert names == ["labels.json", "model.int8.onnx", "model.onnx", "model_card.md", "preprocess.json"]


def test_metadata_labels_and_preprocessing_round_trip(exported_project):
    params = exported_project
    trained = load_trained(params.paths.model)
    cfg = trained.data_config
    folder = Path(params.paths.export_dir)
    assert read_json(folder / "labels.json") == trained.class_names
    assert read_json(folder / "preprocess.json") == cfg
    for file in (rt.FP32_FILE, rt.INT8_FILE):
        meta = {prop.key: prop.value for prop in onnx.load(str(folder / file)).metadata_props}
        assert json.loads(meta["class_names"]) == trained.class_names
        assert json.loads(meta["input_size"]) == list(cfg["input_size"])
        assert (
            json.loads(meta["mean"]) == pytest.approx(cfg["mean"]) and json.loads(meta["std"]) == cfg["std"]
        )
        assert meta["interpolation"] == cfg["interpolation"] and float(meta["crop_pct"]) == cfg["crop_pct"]
        assert float(meta["temperature"]) == TEMPERATURE
        assert int(meta["opset"]) == params.export.opset and meta["backbone"] == "test_efficientnet"
        decision = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)["decision"]
        assert meta["served"] == "int8" and meta["int8_format"] == decision["format"]
        assert meta["served_reason"] == decision["reason"]
        assert rt.metadata(rt.session(folder / file)) == meta  # what ONNX Runtime (and predict) reads


def test_parity_metrics_and_model_card(exported_project):
    params = exported_project
    metrics = read_json(params.paths.metrics("export"))
    assert metrics["n"] == 9 and metrics["top1_agreement"] == 1.0 and metrics["max_abs_logit_diff"] < 1e-4
    assert metrics["opset"] == 18 and metrics["served"] == "int8"
    card = (Path(params.paths.export_dir) / "model_card.md").read_text()
    report = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)
    for needed in (
        "## Data",
        "## Training",
        "## Test metrics",
        "## INT8 vs FP32",
        "## Intended use",
        "## Limits",
    ):
        assert needed in card
    assert f"| ONNX Runtime INT8 | {report['int8']['mb']:.1f} |" in card
    assert f"served by default (`predict`): **INT8**, because {report['decision']['reason']}" in card
    for candidate in report["candidates"]:
        assert f"| {candidate['format']} | {candidate['agreement']:.1%} |" in card
    assert "train.epochs: " in card and "class_0" in card


HOSTILE_NAMES = [
    "<img src=x onerror=alert(1)>",
    "cat|dog",
    "back\\",
    "[click](javascript:alert(1))",
    "![pixel](http://example.invalid/p.png)",
    "*bold* _em_ `code` ~~gone~~",
    "snake_case & <b>",
    "two\nlines",
]


def test_model_card_shows_hostile_class_names_as_text_and_keeps_its_tables(tmp_path):
    paths = Params.from_dict({"paths": {"metrics_dir": tmp_path / "m", "reports_dir": tmp_path / "r"}}).paths
    per_split = {"train": 5, "val": 2, "test": 3}
    write_json(
        paths.details("split"),
        {"per_class": {s: dict.fromkeys(HOSTILE_NAMES, n) for s, n in per_split.items()}},
    )
    cfg = {
        "input_size": [3, 32, 32],
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    trained = TrainedModel(None, HOSTILE_NAMES, cfg, {"model": {"backbone": "test_efficientnet"}})
    parity = {"n": 9, "top1_agreement": 1.0, "max_abs_logit_diff": 1e-6, "opset": 18, "fp32_mb": 0.4}
    meta = {"served": "fp32", "served_reason": "quantization is off", "temperature": "1.0"}
    card = model_card(trained, parity, meta, paths, {})

    assert "<img" not in card and "<b>" not in card
    table = [line for line in card.splitlines() if line.startswith("| ")][: 1 + len(HOSTILE_NAMES)]
    assert table[0] == "| class | train | val | test |"
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 5 for row in table)  # unescaped: 4 cells per row
    # As a Markdown viewer shows it (CommonMark + GFM tables, raw HTML on): the names as written, no tags.
    markdown_it = pytest.importorskip("markdown_it")
    shown = markdown_it.MarkdownIt("commonmark").enable("table").render(card)
    assert not re.search(r"<(img|a|b)\b", shown)  # and each name's cell holds its text only:
    written = [name.replace("\n", " ") for name in HOSTILE_NAMES]
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td[^>]*>5</td>", shown)
    assert sorted(html.unescape(cell) for cell in rows) == sorted(written)  # write_json sorts the keys
    intro = re.search(r"<p>Classifies an image into one of 8 classes: (.*)\.</p>", shown)
    assert html.unescape(intro.group(1)) == ", ".join(written)


def test_model_card_names_a_weights_file_without_the_build_machines_folder():
    from pipeline.pages.model_card import _training

    lines = "\n".join(_training({"model": {"weights": "file:/home/alice/weights/resnet.pth"}, "train": {}}))
    assert "file:resnet.pth" in lines and "/home/alice" not in lines
    assert "bundled" in "\n".join(_training({"model": {"weights": "bundled"}, "train": {}}))


def test_parity_detects_an_altered_model(exported_project, tmp_path):
    params = exported_project
    trained = load_trained(params.paths.model)
    altered = _negate_classifier(Path(params.paths.export_dir) / rt.FP32_FILE, tmp_path / "altered.onnx")
    paths, _ = read_split(params.paths.splits, params.paths.data_root, "test", trained.class_names)
    inputs = rt.load_inputs(paths, trained.data_config)

    reference = export.torch_logits(trained.model, inputs)
    check = export.parity(reference, altered, inputs)
    assert check["top1_agreement"] < 0.5 and check["max_abs_logit_diff"] > 1e-3
    shipped = Path(params.paths.export_dir) / rt.FP32_FILE
    assert export.parity(reference, shipped, inputs)["top1_agreement"] == 1


def test_stage_fails_on_an_altered_model_and_keeps_the_previous_export(exported_project, tmp_path):
    params = exported_project
    project = tmp_path / "project"
    onnx_dir = project / "onnx"
    shutil.copytree(params.paths.onnx_dir, onnx_dir)
    _negate_classifier(onnx_dir / rt.FP32_FILE, onnx_dir / rt.FP32_FILE)
    shutil.copytree(params.paths.export_dir, project / "export")
    before = (project / "export" / rt.FP32_FILE).read_bytes()
    broken = params.model_copy(
        update={
            "paths": params.paths.model_copy(
                update={
                    "onnx_dir": onnx_dir,
                    "export_dir": project / "export",
                    "metrics_dir": project / "metrics",
                }
            )
        }
    )
    with pytest.raises(PipelineError, match="export.min_top1_agreement"):
        export.run(broken)
    assert read_json(broken.paths.metrics("export"))["top1_agreement"] < 0.999
    assert (project / "export" / rt.FP32_FILE).read_bytes() == before


def test_fp32_only_skips_the_gate_and_the_export_says_so_and_predict_int8_errors(tmp_path):
    params = model_project(tmp_path, quantize={"enabled": False})
    quantized = quantize.run(params)
    assert quantized["int8_shipped"] is False and "int8_accuracy" not in quantized
    report = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)
    assert report["candidates"] == [] and report["fp32"]["batch1_ms"] > 0
    assert not (Path(params.paths.onnx_dir) / rt.INT8_FILE).exists()
    metrics = export.run(params)
    folder = Path(params.paths.export_dir)
    assert metrics["served"] == "fp32" and not (folder / rt.INT8_FILE).exists()
    assert "quantize.enabled: false" in (folder / "model_card.md").read_text()
    meta = rt.metadata(rt.session(folder / rt.FP32_FILE))
    assert meta["served"] == "fp32" and "quantize.enabled: false" in meta["served_reason"]
    assert float(meta["temperature"]) == 1.0  # no calibration file
    assert Predictor(folder).served == "fp32"
    with pytest.raises(UsageError, match="no INT8 model"):
        Predictor(folder, precision="int8")


def _build_folders(*more: Path) -> set[str]:
    """The absolute folders of this machine that torch's exporter writes into its per-node stack traces: the
    project, the virtual environment, the Python installation, torch's site-packages; and `more`. Shorter
    than 8 characters (`/usr`) they could match by chance in a few MB of weights: left out."""
    folders = {PROJECT_ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(torch.__file__).parents[1], *more}
    return {str(folder) for folder in folders if len(str(folder)) >= 8}


def test_no_file_made_from_the_onnx_export_names_a_folder_of_the_machine_that_built_it(tmp_path, monkeypatch):
    formats = list(int8.FORMATS)
    params = model_project(tmp_path, quantize={**SHIP_ANY_INT8, "formats": formats}, export={"fp16": True})
    kept: dict[str, Path] = {}  # each INT8 candidate (and search trial), copied before the stage deletes it
    quantize_onnx = search.quantize_onnx  # the name the stage's quantizer calls

    def keep_a_copy(prepared, target, *args, **kwargs):
        kept[target.name] = Path(
            shutil.copy(quantize_onnx(prepared, target, *args, **kwargs), tmp_path / f"kept_{target.name}")
        )
        return target

    monkeypatch.setattr(search, "quantize_onnx", keep_a_copy)
    quantize.run(params)
    metrics = export.run(params)
    folder = Path(params.paths.export_dir)
    assert (folder / rt.FP16_FILE).is_file() and (folder / rt.INT8_FILE).is_file()
    assert {f"{f}.onnx" for f in formats} <= set(kept)
    pages = [path for path in Path(params.paths.reports_dir).rglob("*") if path.is_file()]
    files = [*folder.iterdir(), *Path(params.paths.onnx_dir).iterdir(), *kept.values(), *pages]
    for file in files:
        data = file.read_bytes()
        assert not [path for path in _build_folders(tmp_path) if path.encode() in data], file.name
    # Stripped, the models still load and answer as PyTorch does (FP32: the export's parity check).
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_logit_diff"] < 1e-4
    inputs = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for file in files:
        if file.suffix == ".onnx":
            assert rt.logits(rt.session(file), inputs).shape == (2, 3)


def test_missing_onnx_model_names_the_stage_to_run(tmp_path):
    params = model_project(tmp_path)
    with pytest.raises(PipelineError, match="run the quantize stage first"):
        export.run(params)


def _negate_classifier(source: Path, target: Path) -> Path:
    """The same graph with the classifier weight and bias negated: logits flip sign, argmax -> argmin."""
    model = onnx.load(str(source))
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    inits = {init.name: init for init in model.graph.initializer}
    for name in gemm.input[1:3]:
        array = onnx.numpy_helper.to_array(inits[name])
        assert np.any(array)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(-array, name))
    onnx.save(model, str(target))
    return target

"""predict: ONNX Runtime only (checked in a process where torch cannot be imported), same answers as PyTorch,
per-file errors, folders / globs, output formats, exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.data.splits import read_split
from pipeline.io import read_json
from pipeline.models import load_trained
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor, format_predictions, predict_paths, served_model


@pytest.fixture(scope="module")
def project(exported_project, tmp_path_factory):
    """The shared exported tiny model; a folder of its test images (one level down) and a corrupt file."""
    params = exported_project
    root = tmp_path_factory.mktemp("predict")
    temperature = read_json(params.paths.calibration)["temperature"]
    trained = load_trained(params.paths.model)
    paths, _ = read_split(params.paths.splits, params.paths.data_root, "test", trained.class_names)
    folder = root / "inbox"
    for path in paths:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "bad.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    with torch.inference_mode():
        logits = trained.model(torch.from_numpy(rt.load_inputs(paths, trained.data_config))).numpy()
    reference = {
        str(folder / path.parent.name / path.name): (
            trained.class_names[int(row.argmax())],
            _softmax(row / temperature),
        )
        for path, row in zip(paths, logits, strict=True)
    }
    return params, folder, reference


def test_cli_runs_without_torch_matches_pytorch_and_reports_the_corrupt_file(project, tmp_path):
    params, folder, reference = project
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    assert (
        subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    )

    command = [
        sys.executable,
        "-m",
        "pipeline",
        "predict",
        str(folder),
        "--model",
        str(params.paths.export_dir),
        "--precision",
        "fp32",
    ]
    proc = subprocess.run(
        [*command, "--format", "json", "--top-k", "3"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    results = {entry["path"]: entry for entry in json.loads(proc.stdout)}
    assert set(results) == {*reference, str(folder / "bad.png")}
    assert "UnidentifiedImageError" in results[str(folder / "bad.png")]["error"]
    assert "1 of 10 inputs failed" in proc.stderr and "running FP32: asked for FP32" in proc.stderr
    for path, (label, probs) in reference.items():
        entry = results[path]
        assert entry["error"] is None and entry["predictions"][0]["label"] == label
        assert [p["probability"] for p in entry["predictions"]] == pytest.approx(
            sorted(probs, reverse=True), abs=1e-5
        )


def test_predictor_on_pil_images_and_paths_agree_with_pytorch(project):
    params, _, reference = project
    predictor = Predictor(params.paths.export_dir, precision="fp32")
    paths = sorted(reference)
    images = [Image.open(path) for path in paths]
    by_image = predictor.predict(images, top_k=2)
    by_path = predictor.predict(paths, top_k=2)
    assert [r.source for r in by_image] == [f"<image {i}>" for i in range(len(paths))]
    for image_result, path_result, path in zip(by_image, by_path, paths, strict=True):
        assert image_result.labels == path_result.labels
        assert path_result.labels[0][0] == reference[path][0]
        assert path_result.labels[0][1] >= path_result.labels[1][1]


def test_int8_model_predicts_through_the_cli(project):
    params, folder, reference = project
    args = [
        "predict",
        str(folder / "class_0"),
        "--model",
        str(params.paths.export_dir),
        "--precision",
        "int8",
        "--format",
        "csv",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sorted(row["path"] for row in rows) == sorted(p for p in reference if "class_0" in p)
    assert all(row["rank"] == "1" and row["label"] and 0 < float(row["probability"]) <= 1 for row in rows)


def test_globs_missing_paths_and_formats(project):
    params, folder, reference = project
    missing = str(folder / "nowhere.png")
    predictor = Predictor(params.paths.export_dir, precision="fp32")
    results = predict_paths([str(folder / "**" / "*.png"), missing], predictor, top_k=1)
    by_path = {r.source: r for r in results}
    assert set(by_path) == {*reference, str(folder / "bad.png"), missing}
    assert not by_path[missing].ok and "no such file" in by_path[missing].error
    assert all(by_path[path].labels[0][0] == label for path, (label, _) in reference.items())

    table = format_predictions(results, "table").splitlines()
    assert table[0].startswith("path") and len(table) == len(results) + 1
    width = max(len(r.source) for r in results)
    assert all(line[width : width + 2] == "  " and line[width + 2] != " " for line in table)  # aligned column
    assert any(line.startswith(str(folder / "bad.png")) and "ERROR" in line for line in table)
    rows = list(csv.DictReader(io.StringIO(format_predictions(results, "csv"))))
    assert {row["path"] for row in rows if row["error"]} == {str(folder / "bad.png"), missing}


def test_usage_errors_exit_2(project, tmp_path):
    params, folder, _ = project
    runner = CliRunner()
    no_model = runner.invoke(app, ["predict", str(folder), "--model", str(tmp_path / "no_export")])
    assert no_model.exit_code == 2 and "not found" in no_model.output
    (tmp_path / "empty").mkdir()
    no_images = runner.invoke(
        app, ["predict", str(tmp_path / "empty"), "--model", str(params.paths.export_dir)]
    )
    assert no_images.exit_code == 2 and "no image files" in no_images.output
    assert runner.invoke(app, ["predict"]).exit_code == 2


_U8S8 = {"served": "int8", "int8_format": "u8s8", "int8_checked_on": "a VNNI CPU", "served_reason": "passed"}


@pytest.mark.parametrize(
    ("precision", "meta", "vnni", "expected", "why"),
    [
        ("auto", _U8S8, True, "int8", "passed"),
        ("auto", _U8S8, None, "int8", "passed"),  # not x86: no int16 saturation question
        ("auto", _U8S8, False, "fp32", "this CPU has no VNNI"),
        ("auto", {**_U8S8, "int8_format": "u8s8_reduce_range"}, False, "int8", "passed"),
        ("auto", {**_U8S8, "int8_format": "u8s8_portable"}, False, "int8", "passed"),
        (
            "auto",
            {**_U8S8, "int8_format": "s8s8"},
            False,
            "fp32",
            "this CPU has no VNNI",
        ),  # ORT shifts it to u8s8
        ("auto", {"served": "fp32", "served_reason": "no INT8 format passed the gate"}, True, "fp32", "gate"),
        ("int8", _U8S8, False, "int8", "asked for INT8"),
        ("fp32", _U8S8, True, "fp32", "asked for FP32"),
    ],
)
def test_served_model_follows_the_export_and_this_cpu(project, precision, meta, vnni, expected, why):
    params, _, _ = project
    served, reason = served_model(params.paths.export_dir, precision, meta, {"vnni": vnni})
    assert served == expected and why in reason


def test_auto_serves_what_the_export_says_and_the_cli_names_it(project):
    params, folder, _ = project
    meta = rt.metadata(rt.session(params.paths.export_dir / rt.FP32_FILE))
    assert meta["served"] == "int8"  # the shared export ships any INT8 model
    predictor = Predictor(params.paths.export_dir)
    assert (predictor.served, predictor.reason) == served_model(
        params.paths.export_dir, "auto", meta, rt.cpu_info()
    )
    result = CliRunner().invoke(
        app, ["predict", str(folder / "class_0"), "--model", str(params.paths.export_dir)]
    )
    assert result.exit_code == 0 and f"predict: running {predictor.served.upper()}: " in result.output


def _softmax(row: np.ndarray) -> np.ndarray:
    exp = np.exp(row - row.max())
    return exp / exp.sum()


def test_provider_auto_takes_the_best_offered_and_a_missing_one_fails_in_one_line(project):
    from pipeline.errors import PipelineError

    assert rt.providers_for("auto") == ("cpu", ["CPUExecutionProvider"])  # this ONNX Runtime: CPU only
    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert rt.providers_for("auto", offered) == ("cuda", offered)
    assert (
        rt.providers_for("openvino", ["OpenVINOExecutionProvider", "CPUExecutionProvider"])[0] == "openvino"
    )
    with pytest.raises(PipelineError, match=r"--provider tensorrt: this ONNX Runtime .* offers only CUDA"):
        rt.providers_for("tensorrt", offered)
    params, folder, _ = project
    args = ["predict", str(folder), "--model", str(params.paths.export_dir), "--provider", "cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and "onnxruntime-gpu" in result.output
    ok = CliRunner().invoke(app, [*args[:-1], "cpu", "--precision", "fp32"])
    assert ok.exit_code == 1 and "(provider cpu)" in ok.output  # 1: the corrupt file in the folder


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    from helpers import model_project

    from pipeline.stages import export, quantize

    params = model_project(
        tmp_path_factory.mktemp("fp16"), quantize={"enabled": False}, export={"fp16": True}
    )
    quantize.run(params)
    return params, export.run(params)


def test_fp16_export_has_half_weights_float_io_and_predicts_as_fp32(fp16_export):
    import onnx

    params, metrics = fp16_export
    folder = params.paths.export_dir
    model = onnx.load(str(folder / rt.FP16_FILE))
    weights = {init.data_type for init in model.graph.initializer if len(init.dims) > 1}
    assert weights == {onnx.TensorProto.FLOAT16}
    io_types = {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}  # callers feed and read float32 as with FP32
    assert rt.file_mb(folder / rt.FP16_FILE) < 0.7 * rt.file_mb(folder / rt.FP32_FILE)  # + graph, metadata
    assert (
        metrics["fp16_top1_agreement"] == 1.0
        and rt.metadata(rt.session(folder / rt.FP16_FILE))["class_names"]
    )
    trained = load_trained(params.paths.model)
    paths, _ = read_split(params.paths.splits, params.paths.data_root, "test", trained.class_names)
    half, full = Predictor(folder, precision="fp16"), Predictor(folder, precision="fp32")
    assert half.served == "fp16"
    np.testing.assert_allclose(
        half.probabilities(rt.load_inputs(paths, trained.data_config)),
        full.probabilities(rt.load_inputs(paths, trained.data_config)),
        atol=1e-3,
    )


def test_gpu_providers_serve_fp16_when_exported_and_fp16_must_exist(fp16_export, project):
    from pipeline.serving.predict import UsageError

    params, _ = fp16_export
    meta = {"served": "fp32", "served_reason": "quantization is off"}
    assert served_model(params.paths.export_dir, "auto", meta, {}, gpu=True)[0] == "fp16"
    assert served_model(params.paths.export_dir, "auto", meta, {}, gpu=False)[0] == "fp32"
    without, _, _ = project
    assert served_model(without.paths.export_dir, "auto", {"served": "int8"}, {}, gpu=True)[0] == "int8"
    with pytest.raises(UsageError, match="no FP16 model; set export.fp16: true"):
        served_model(without.paths.export_dir, "fp16", {}, {})

"""Prediction sets and the unknown flag from a fresh export: the same from the CLI (torch blocked) and
`Predictor`, equal to the PyTorch model's under evaluate's thresholds, FP32 and INT8 within a stated
tolerance, and an image unlike the training data flagged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import SHIP_ANY_INT8, model_project
from PIL import Image

from pipeline.calibration import softmax
from pipeline.io import read_json
from pipeline.models import load_trained
from pipeline.orchestration.champion import promote
from pipeline.serving import conformal
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.conformal import Conformal
from pipeline.serving.predict import Predictor
from pipeline.serving.unknown import Detector
from pipeline.stages import evaluate, export, quantize

# ONNX Runtime FP32 against PyTorch: logits differ by ~1e-8, so only a score this close to a threshold (a val
# image's own score is one) may fall on the other side.
FP32_TOLERANCE = 1e-5
# INT8 against FP32 on the tiny random model: scores may move this much, and only a class or an image whose
# FP32 score lies within that distance of the threshold may change sides.
SET_SCORE_TOLERANCE = 0.1  # conformal class scores (probability mass)
UNKNOWN_SCORE_TOLERANCE = 0.25  # knn scores (distance between unit vectors, 0 to 2)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """The tiny model evaluated (conformal alpha 0.5: val has 3 images, too few for 0.1), quantized, exported;
    its image files and three images unlike them (white, checkerboard, gradient)."""
    root = tmp_path_factory.mktemp("trusted")
    params = model_project(
        root,
        quantize=SHIP_ANY_INT8,
        evaluate={"conformal": {"alpha": 0.5}, "unknown": {"knn_k": 3}, "batch_size": 8},
        paths={"predictions": str(root / "predictions.csv")},
    )
    evaluate.run(params)
    quantize.run(params)
    export.run(params)
    files = sorted(str(p) for p in params.paths.data_root.rglob("*.png"))
    strange = []
    for kind in ("white", "checker", "gradient"):
        pixels = np.zeros((32, 32, 3), np.uint8)
        if kind == "white":
            pixels[:] = 255
        elif kind == "checker":
            pixels[::2, ::2] = pixels[1::2, 1::2] = 255
        else:
            pixels[:] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None]
        Image.fromarray(pixels).save(root / f"{kind}.png")
        strange.append(str(root / f"{kind}.png"))
    return params, files, strange


def _torch_reference(params, files):
    """Sets and unknown flags of the PyTorch model under the thresholds evaluate wrote, and for each the
    distance of its score from the threshold."""
    trained = load_trained(params.paths.model)
    calibration = read_json(params.paths.calibration)
    inputs = torch.from_numpy(rt.load_inputs(files, trained.data_config))
    with torch.inference_mode():
        features = trained.model.forward_features(inputs)
        logits = trained.model.head(features).numpy()
    fitted = Conformal.from_json(calibration["conformal"], "calibration")
    probs = softmax(logits, calibration["temperature"])
    margin = np.abs(conformal.class_scores(probs, fitted.method, fitted.k_reg, fitted.lam) - fitted.threshold)
    bank = np.load(params.paths.feature_bank)
    detector = Detector.from_settings(calibration["unknown"], bank, "calibration")
    scores = detector.scores(logits, features.numpy(), calibration["temperature"])
    flag_margin = np.abs(scores - detector.threshold)
    return conformal.prediction_sets(probs, fitted), margin, detector.unknown(scores), flag_margin


def test_export_carries_thresholds_bank_and_the_penultimate_features(trusted):
    params, files, _ = trusted
    folder = params.paths.export_dir
    meta = rt.metadata(rt.session(folder / rt.FP32_FILE))
    assert json.loads(meta["conformal"]) == read_json(params.paths.calibration)["conformal"]
    assert json.loads(meta["unknown"])["detector"] == "knn"
    assert np.array_equal(np.load(folder / rt.FEATURE_BANK_FILE), np.load(params.paths.feature_bank))
    metrics = read_json(params.paths.metrics("export"))
    assert metrics["features_max_abs_diff"] < 1e-4 and metrics["feature_bank_images"] == 12
    trained = load_trained(params.paths.model)
    inputs = rt.load_inputs(files[:4], trained.data_config)
    _, features = rt.outputs(rt.session(folder / rt.FP32_FILE), inputs)
    with torch.inference_mode():
        expected = trained.model.forward_features(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-4)  # the head's input, not another layer


def test_cli_without_torch_and_predictor_give_the_pytorch_sets_and_flags(trusted, tmp_path):
    params, files, strange = trusted
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    command = [sys.executable, "-m", "pipeline", "predict", *files, *strange, "--sets", "--format", "json"]
    proc = subprocess.run(
        [*command, "--model", str(params.paths.export_dir), "--precision", "fp32"],
        env={**os.environ, "PYTHONPATH": str(blocker.parent)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    predictor = Predictor(params.paths.export_dir, precision="fp32")
    api = predictor.predict([*files, *strange], sets=True)
    assert [entry["set"] for entry in cli] == [r.prediction_set for r in api]
    assert [entry["unknown"] for entry in cli] == [r.unknown for r in api]
    cli_scores = [entry["unknown_score"] for entry in cli]
    assert cli_scores == pytest.approx([r.unknown_score for r in api], abs=1e-9)

    sets, set_margin, flags, flag_margin = _torch_reference(params, [*files, *strange])
    ours = np.array([[name in r.prediction_set for name in predictor.class_names] for r in api])
    assert np.all(set_margin[ours != sets] < FP32_TOLERANCE)
    flagged = np.array([r.unknown for r in api])
    assert np.all(flag_margin[flagged != flags] < FP32_TOLERANCE)
    assert flagged[-3:].all() and flags[-3:].all()  # the images unlike the training data


def test_int8_agrees_with_fp32_within_the_stated_tolerance(trusted):
    params, files, strange = trusted
    items = [*files, *strange]
    fp32, int8 = (Predictor(params.paths.export_dir, precision=p) for p in ("fp32", "int8"))
    assert int8.served == "int8"
    inputs = rt.load_inputs(items, fp32.data_config)
    (p32, _, u32), (p8, _, u8) = fp32.trust(inputs), int8.trust(inputs)
    c = fp32.conformal
    s32, s8 = (conformal.class_scores(p, c.method, c.k_reg, c.lam) for p in (p32, p8))
    assert np.abs(s32 - s8).max() < SET_SCORE_TOLERANCE
    changed = (s32 <= c.threshold) != (s8 <= c.threshold)
    assert np.all(np.abs(s32[changed] - c.threshold) < SET_SCORE_TOLERANCE)
    assert np.abs(u32 - u8).max() < UNKNOWN_SCORE_TOLERANCE
    flipped = fp32.detector.unknown(u32) != int8.detector.unknown(u8)
    assert np.all(np.abs(u32[flipped] - fp32.detector.threshold) < UNKNOWN_SCORE_TOLERANCE)
    assert int8.detector.unknown(u8)[-3:].all()  # the strange images, in INT8 too


def test_sets_need_an_export_with_a_threshold(exported_project):
    predictor = Predictor(exported_project.paths.export_dir, precision="fp32")  # exported without evaluate
    assert predictor.conformal is None and predictor.detector is None
    result = predictor.predict([next(exported_project.paths.data_root.rglob("*.png"))])[0]
    assert result.unknown is None and result.prediction_set is None
    with pytest.raises(Exception, match="no conformal threshold"):
        predictor.predict([], sets=True)


def test_model_card_states_the_guarantee_and_the_gate_reports_coverage_and_unknown_rate(trusted, tmp_path):
    params, _, _ = trusted
    card = (params.paths.export_dir / "model_card.md").read_text(encoding="utf-8")
    assert "each image's set of classes contains its true class for at least 50% of images" in card
    assert "marks an image `unknown` when its knn score is below" in card

    first = promote(params.paths, params.orchestrate, tmp_path)  # no champion yet: only the new model's
    assert first["champion_coverage"] is None and 0 <= first["new_coverage"] <= 1
    again = promote(params.paths, params.orchestrate, tmp_path)  # the same export is now the champion
    assert again["champion_coverage"] == again["new_coverage"] == first["new_coverage"]
    assert again["champion_unknown_rate"] == again["new_unknown_rate"] == first["new_unknown_rate"]
    test = read_json(params.paths.details("evaluate"))["conformal"]
    assert first["new_coverage"] == pytest.approx(test["coverage"])  # the same 9 test images as evaluate's

"""Label sets through quantize, export and predict: the INT8 gate on whole thresholded sets, the thresholds in
the export's metadata, and predict answering with label sets (JSON and table), without torch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import SHIP_ANY_INT8, multilabel_train_params

from pipeline.config import OrchestrateParams
from pipeline.data.labels import LabelSets
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json
from pipeline.orchestration.champion import GATE_PREDICTIONS, promote
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor, format_predictions
from pipeline.stages import evaluate, export, quantize, train
from pipeline.stages.quantize import Decisions


def test_sets_are_coded_alike_and_a_threshold_is_met_at_its_logit():
    decide = Decisions(LabelSets(";"), np.log(np.array([0.5, 0.8]) / np.array([0.5, 0.2])))
    logits = np.array([[0.0, np.log(4.0)], [1.0, 1.0], [-1.0, 2.0], [3.0, 5.0]])  # p: .5/.8, .73/.73, ...

    codes = decide(logits)

    assert codes[0] == codes[3] and codes[1] != codes[0] and codes[2] not in (codes[0], codes[1])
    assert decide.label_agreement(codes, codes[[0, 1, 1, 3]]) == pytest.approx(1 - 2 / 8)  # {b} vs {a}
    truth = np.array([[True, True], [True, False]])
    assert decide.of_truth(truth).tolist() == [codes[0], codes[1]]
    assert Decisions(LabelSets())(logits).tolist() == [1, 0, 1, 1]  # one class per image: the top one


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_sets")
    out = root / "out"
    paths = {name: str(out / name) for name in ("onnx_dir", "export_dir", "reports_dir", "champion_dir")}
    paths.update(
        predictions=str(out / "predictions.csv"),
        calibration=str(out / "calibration.json"),
        feature_bank=str(out / "feature_bank.npy"),
    )
    params = multilabel_train_params(
        root,
        paths=paths,
        train={"epochs": 2},
        evaluate={"unknown": {"bank_size": 8, "knn_k": 2}},
        quantize={
            **SHIP_ANY_INT8,
            "benchmark_repeats": 2,
            "calibration_images": 8,
            "sensitivity_max_nodes": 0,
        },
    )
    for stage in (train, evaluate, quantize, export):
        stage.run(params)
    return params


def test_the_int8_gate_compares_whole_label_sets(exported):
    report = read_json(exported.paths.onnx_dir / rt.QUANTIZE_REPORT)
    splits = pd.read_csv(exported.paths.splits, dtype=str, keep_default_na=False)
    compared = pd.concat([splits[splits["split"] == s].sort_values("path") for s in ("val", "test")])
    files = [exported.paths.data_root / path for path in compared["path"]]
    sets = {}
    for precision in ("fp32", "int8"):
        results = Predictor(exported.paths.export_dir, precision=precision).predict(files)
        sets[precision] = [";".join(sorted(label for label, _ in r.labels)) for r in results]
    truth = compared["label"].tolist()

    shipped = next(c for c in report["candidates"] if c["format"] == report["decision"]["format"])

    assert report["compared"]["n"] == shipped["n"] == len(files) == 12
    assert shipped["reference_accuracy"] == pytest.approx(
        np.mean([a == b for a, b in zip(sets["fp32"], truth, strict=True)])
    )
    assert shipped["agreement"] == pytest.approx(
        np.mean([a == b for a, b in zip(sets["fp32"], sets["int8"], strict=True)])
    )
    assert read_json(exported.paths.metrics("quantize"))["fp32_accuracy"] == shipped["reference_accuracy"]
    names = json.loads(rt.metadata(rt.session(exported.paths.export_dir / rt.FP32_FILE))["class_names"])
    answers = {p: np.array([[name in s.split(";") for name in names] for s in sets[p]]) for p in sets}
    assert shipped["label_agreement"] == pytest.approx((answers["fp32"] == answers["int8"]).mean())


def test_predict_answers_with_the_label_sets_evaluate_predicted(exported):
    meta = rt.metadata(rt.session(exported.paths.export_dir / rt.FP32_FILE))
    thresholds = read_json(exported.paths.calibration)["thresholds"]
    names = json.loads(meta["class_names"])
    assert meta["task"] == "multilabel" and json.loads(meta["thresholds"]) == [thresholds[n] for n in names]
    predictions = pd.read_csv(exported.paths.predictions, dtype=str, keep_default_na=False)
    files = [exported.paths.data_root / path for path in predictions["path"]]

    results = Predictor(exported.paths.export_dir, precision="fp32").predict(files)

    answered = [";".join(sorted(label for label, _ in r.labels)) for r in results]
    assert answered == predictions["pred"].tolist()
    for r in results:
        probs = [p for _, p in r.labels]
        assert probs == sorted(probs, reverse=True)
        assert all(p >= thresholds[label] for label, p in r.labels)
    payload = json.loads(format_predictions(results, "json"))
    assert [[p["label"] for p in row["predictions"]] for row in payload] == [
        [lb for lb, _ in r.labels] for r in results
    ]
    empty = [r for r in results if not r.labels]
    if empty:
        assert "(no label)" in format_predictions(empty, "table")


def test_the_champion_gate_compares_map_and_counts_an_image_right_when_its_whole_set_is(exported):
    first = promote(exported.paths, OrchestrateParams())
    again = promote(exported.paths, OrchestrateParams(promote_metric="accuracy"))

    scored = pd.read_csv(
        exported.paths.reports("promote") / GATE_PREDICTIONS, dtype=str, keep_default_na=False
    )
    predictions = pd.read_csv(exported.paths.predictions, dtype=str, keep_default_na=False)
    assert (
        scored["new"].tolist() == predictions["pred"].tolist()
    )  # the sets, written as the tables write them
    assert first["promoted"] and first["reason"] == "no champion yet"
    # auto: mAP for label sets, from the exported FP32 model's scores: evaluate's figure on the same images
    test_map = read_json(exported.paths.metrics("evaluate"))["map_macro"]
    assert first["metric"] == "mAP" and first["new"] == pytest.approx(test_map, abs=1e-3)
    assert again["reason"] == "already champion" and again["images"] == 6
    assert again["metric"] == "accuracy"
    assert again["new"] == pytest.approx((predictions["pred"] == predictions["label"]).mean())


def test_quantize_and_export_read_evaluates_thresholds_alike_and_name_a_missing_label(exported, tmp_path):
    record = read_json(exported.paths.calibration)
    report = read_json(exported.paths.reports("evaluate") / "details.json")
    assert report["thresholds"] == record["thresholds"]  # the ones evaluate decided with, not rounded
    names = sorted(record["thresholds"])
    del record["thresholds"][names[0]]
    broken = write_json(tmp_path / "calibration.json", record)
    missing = rf"calibration.json: no per-label thresholds for \['{names[0]}'\]; run the evaluate stage"
    with pytest.raises(PipelineError, match=missing):
        export.label_set_metadata(names, record, LabelSets(";"), broken)
    with pytest.raises(PipelineError, match=missing):
        Decisions.of(LabelSets(";"), broken, names)

"""Evaluate on label sets: per-label thresholds tuned on val, the test figures, and the stage end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import multilabel_train_params
from sklearn.metrics import average_precision_score, f1_score, hamming_loss

from pipeline.calibration import tuned_thresholds
from pipeline.data.labels import LabelSets
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import evaluate, train
from pipeline.stages.evaluate import label_sets


def test_each_threshold_is_the_best_f1_cut_of_its_label():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 3)) < [0.5, 0.2, 0.05]
    probs = np.clip(truth * 0.35 + rng.random((200, 3)) * 0.65, 0, 1).astype(np.float32)

    thresholds = tuned_thresholds(probs, truth)

    for k in range(3):
        best = max(f1_score(truth[:, k], probs[:, k] >= t) for t in np.unique(probs[:, k]))
        assert f1_score(truth[:, k], probs[:, k] >= thresholds[k]) == pytest.approx(best)
    assert tuned_thresholds(probs, np.zeros_like(truth)).tolist() == [0.5] * 3


def test_figures_are_the_textbook_ones():
    truth = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=bool)
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.4, 0.3], [0.7, 0.8, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32)
    thresholds = np.array([0.5, 0.35, 0.5])

    metrics, details = label_sets.figures(truth, probs, thresholds, ["a", "b", "c"], bins=5)

    said = probs >= thresholds
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(truth, said))
    assert metrics["subset_accuracy"] == pytest.approx(0.25)  # the first image's set alone is all right
    assert metrics["example_f1"] == pytest.approx(np.mean([1.0, 0.0, 0.5, 2 / 3]))  # the empty set: 0 here
    assert metrics["f1_macro"] == pytest.approx(f1_score(truth, said, average="macro"))
    assert metrics["f1_micro"] == pytest.approx(f1_score(truth, said, average="micro"))
    assert metrics["map_macro"] == pytest.approx(average_precision_score(truth, probs, average="macro"))
    assert metrics["map_micro"] == pytest.approx(average_precision_score(truth, probs, average="micro"))
    assert details["per_label"]["b"]["support"] == 2 and details["per_label"]["b"]["recall"] == 0.5


def _project(tmp_path):
    out = tmp_path / "out"
    paths = {
        "predictions": str(out / "predictions.csv"),
        "calibration": str(out / "calibration.json"),
        "feature_bank": str(out / "feature_bank.npy"),
        "reports_dir": str(out / "reports"),
    }
    return multilabel_train_params(
        tmp_path, paths=paths, train={"epochs": 2}, evaluate={"unknown": {"bank_size": 8, "knn_k": 2}}
    )


def test_the_stage_writes_label_set_predictions_thresholds_and_its_report(tmp_path):
    params = _project(tmp_path)
    train.run(params)

    summary = evaluate.run(params)

    metrics = read_json(params.paths.metrics("evaluate"))
    assert summary["n_test"] == metrics["n_test"] == 6 and 0 <= metrics["map_macro"] <= 1
    calibration = read_json(params.paths.calibration)
    assert calibration["task"] == "multilabel"
    assert sorted(calibration["thresholds"]) == ["class_0", "class_1", "class_2", "even"]
    predictions = pd.read_csv(params.paths.predictions, dtype=str, keep_default_na=False)
    assert list(predictions.columns[:4]) == ["path", "label", "pred", "correct"]
    assert {"prob_even", "prob_class_0"} <= set(predictions.columns)
    sets = LabelSets(";")
    thresholds = np.array([calibration["thresholds"][n] for n in ["class_0", "class_1", "class_2", "even"]])
    probs = (
        predictions[["prob_class_0", "prob_class_1", "prob_class_2", "prob_even"]].astype(float).to_numpy()
    )
    names = np.array(["class_0", "class_1", "class_2", "even"])
    assert predictions["pred"].tolist() == [";".join(names[row >= thresholds]) for row in probs]
    assert all(set(sets.parse(cell)) <= set(names) for cell in predictions["label"])
    report = (params.paths.reports("evaluate") / "report.html").read_text()
    assert "Evaluation (label sets)" in report and "data:image/png;base64" in report
    assert np.load(params.paths.feature_bank).shape[0] == 8


def test_a_single_label_model_is_refused_for_label_sets(tmp_path):
    params = _project(tmp_path)
    single = params.model_copy(update={"base": params.base.model_copy(update={"task": "single"})})
    train.run(single)  # "class_0;even" is then one class of its own

    with pytest.raises(PipelineError, match=r"model.pt: trained for single labels .* re-run the train stage"):
        evaluate.run(params)

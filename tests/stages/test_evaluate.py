"""The evaluate stage end to end on a tiny model and tiny images: every output exists and is consistent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_headline_metrics, make_image_folder
from PIL import Image

from pipeline.calibration import softmax
from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.models import build_model, load_trained, resolve_data_config, save_trained
from pipeline.pages import report
from pipeline.preprocess import preprocess_file
from pipeline.serving import conformal, unknown
from pipeline.serving.conformal import Conformal
from pipeline.serving.unknown import Detector
from pipeline.stages import evaluate
from pipeline.stages.evaluate import passes

CLASSES = ["class_0", "class_1", "class_2"]
PNGS = ("confusion_matrix.png", "mistakes.png", "reliability.png", "per_class_f1.png", "coverage.png")
METRIC_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "top_k_accuracy",
    "log_loss",
    "ece_before",
    "ece_after",
    "coverage",
    "set_size_mean",
    "singleton_share",
    "unknown_rate",
}
DETAIL_KEYS = {
    "f1_weighted",
    "top_k",
    "log_loss_calibrated",
    "temperature",
    "n_test",
    "per_class",
    "conformal",
    "unknown",
}


def _project(root: Path, tta: bool = False, split_of=None, favour: int | None = None) -> Params:
    """Images, a splits CSV and a saved tiny model under `root`; returns params pointing at them.

    split_of(i) gives the split of the i-th image of each class (default: 3 train, 3 val, 3 test).
    favour: a class index the model's head is biased towards (so it predicts that class for every image).
    """
    make_image_folder(root / "images", classes=3, per_class=9, size=32)
    split_of = split_of or (lambda i: ("train", "val", "test")[i // 3])
    rows = [
        {
            "path": f"{name}/img_{i:03d}.png",
            "label": name,
            "split": split_of(i),
            "sha256": f"{k}{i}",
            "width": 32,
            "height": 32,
        }
        for k, name in enumerate(CLASSES)
        for i in range(9)
    ]
    (root / "data").mkdir()
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(root / "data" / "splits.csv", index=False)
    params = Params.from_dict(
        {
            "paths": {
                "data_root": str(root / "images"),
                "splits": str(root / "data" / "splits.csv"),
                "model": str(root / "models" / "model.pt"),
                "predictions": str(root / "models" / "predictions.csv"),
                "calibration": str(root / "models" / "calibration.json"),
                "feature_bank": str(root / "models" / "feature_bank.npy"),
                "metrics_dir": str(root / "metrics"),
                "reports_dir": str(root / "reports"),
                "live_dir": str(root / "dvclive"),
            },
            "model": {"backbone": "test_efficientnet", "weights": "none", "image_size": 32},
            "evaluate": {"top_k": 2, "tta": tta, "batch_size": 4, "mistakes_shown": 4, "calibration_bins": 5},
        }
    )
    torch.manual_seed(0)
    model = build_model(params.model, num_classes=len(CLASSES))
    if favour is not None:
        with torch.no_grad():
            model.head[-1].bias[favour] = 1e4
    save_trained(params.paths.model, model, CLASSES, resolve_data_config(params.model), params.to_dict())
    return params


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Params, dict]:
    params = _project(tmp_path_factory.mktemp("evaluate"))
    return params, evaluate.run(params)


def test_metrics_are_headline_scalars_in_range_and_details_hold_the_per_class_table(evaluated):
    params, summary = evaluated
    metrics = read_json(params.paths.metrics("evaluate"))
    details = read_json(params.paths.details("evaluate"))
    assert set(metrics) == METRIC_KEYS and set(details) == DETAIL_KEYS
    assert_headline_metrics(metrics, CLASSES)
    assert details["n_test"] == 9 == summary["n_test"]
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "top_k_accuracy", "ece_before", "ece_after"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= details["f1_weighted"] <= 1.0
    assert details["top_k"] == 2 and metrics["top_k_accuracy"] >= metrics["accuracy"]
    assert metrics["log_loss"] > 0
    assert set(details["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in details["per_class"].values()) == 9
    predictions = pd.read_csv(params.paths.predictions)
    assert metrics["accuracy"] == pytest.approx(predictions["correct"].mean())


def test_predictions_are_sorted_and_match_the_model_on_preprocess_file(evaluated):
    params, _ = evaluated
    predictions = pd.read_csv(params.paths.predictions, dtype={"path": str, "label": str, "pred": str})
    assert list(predictions.columns[:5]) == ["path", "label", "pred", "confidence", "correct"]
    assert predictions["path"].tolist() == sorted(predictions["path"])
    assert (predictions["correct"] == (predictions["label"] == predictions["pred"])).all()
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(predictions["confidence"], probs.max(axis=1))

    trained = load_trained(params.paths.model)
    batch = np.stack(
        [preprocess_file(params.paths.data_root / p, trained.data_config) for p in predictions["path"]]
    )
    with torch.inference_mode():
        logits = trained.model(torch.from_numpy(batch)).numpy()
    assert predictions["pred"].tolist() == [CLASSES[i] for i in logits.argmax(axis=1)]
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-5)
    temperature = read_json(params.paths.calibration)["temperature"]
    np.testing.assert_allclose(
        predictions["confidence_calibrated"], softmax(logits, temperature).max(1), atol=1e-5
    )


def test_conformal_sets_and_unknown_detector_are_calibrated_on_val_and_measured_on_test(evaluated):
    params, _ = evaluated
    calibration, details = read_json(params.paths.calibration), read_json(params.paths.details("evaluate"))
    fitted = Conformal.from_json(calibration["conformal"], "calibration.json")
    assert (fitted.method, fitted.alpha, fitted.n_calibration) == ("raps", 0.1, 9)  # ceil(10 x 0.9) = 9 of 9
    trained = load_trained(params.paths.model)
    test = pd.read_csv(params.paths.predictions, dtype=str)
    batch = np.stack([preprocess_file(params.paths.data_root / p, trained.data_config) for p in test["path"]])
    with torch.inference_mode():
        features = trained.model.forward_features(torch.from_numpy(batch))
        logits = trained.model.head(features).numpy()
    probs = softmax(logits, calibration["temperature"])
    labels = np.array([CLASSES.index(label) for label in test["label"]])
    # The random tiny model gives every image nearly the same probabilities, so one class of each sits within
    # float noise of the threshold, and this batch of 9 may round unlike the stage's batches of 4 (on one
    # thread it did): the stage's figures lie between those of the sets just inside and just outside it.
    inner, outer = (
        conformal.prediction_sets(probs, replace(fitted, threshold=fitted.threshold + shift))
        for shift in (-1e-5, 1e-5)
    )
    for key, figure in (
        ("coverage", lambda s: s[np.arange(9), labels].mean()),
        ("set_size_mean", lambda s: s.sum(axis=1).mean()),
    ):
        assert figure(inner) - 1e-9 <= details["conformal"][key] <= figure(outer) + 1e-9, key
    assert details["conformal"]["worst_class"] in CLASSES

    bank = np.load(params.paths.feature_bank)
    assert bank.dtype == np.float16 and bank.shape == (9, features.shape[1])  # the 9 train images
    np.testing.assert_allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1.0, atol=1e-2)
    detector = Detector.from_settings(calibration["unknown"], bank, "calibration.json")
    assert detector.kind == "knn" and detector.tpr == 0.95
    flagged = detector.unknown(detector.scores(logits, features.numpy(), calibration["temperature"]))
    assert read_json(params.paths.metrics("evaluate"))["unknown_rate"] == pytest.approx(flagged.mean())


def test_calibration_file_and_confusion_csv(evaluated):
    params, _ = evaluated
    calibration = read_json(params.paths.calibration)
    assert set(calibration) == {"temperature", "val_nll_before", "val_nll_after", "conformal", "unknown"}
    assert calibration["temperature"] > 0
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    assert calibration["temperature"] == read_json(params.paths.details("evaluate"))["temperature"]

    confusion = pd.read_csv(params.paths.reports_dir / "evaluate" / "confusion.csv", dtype=str)
    predictions = pd.read_csv(params.paths.predictions, dtype=str)
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == 9
    assert confusion["actual"].tolist() == predictions["label"].tolist()
    assert confusion["predicted"].tolist() == predictions["pred"].tolist()


def test_pngs_are_real_images(evaluated):
    params, _ = evaluated
    folder = params.paths.reports_dir / "evaluate"
    for name in PNGS:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 50, name
    assert not (folder / "training_curves.png").exists()  # no dvclive folder in this project


def test_report_is_self_contained_and_complete(evaluated):
    params, _ = evaluated
    page = (params.paths.reports_dir / "evaluate" / "report.html").read_text(encoding="utf-8")
    for forbidden in ("http://", "https://", 'src="http', "<script", "<link"):
        assert forbidden not in page
    for text in (
        *CLASSES,
        *(f"<h2>{title}</h2>" for _, title in report.SECTIONS),
        "test_efficientnet",
        "No training curves found",
        "No metrics file from the validate stage",
        "each set holds the true class for at least 90% of images like the training data",
        "Unknown inputs (knn detector)",
    ):
        assert text in page, text
    # confusion, reliability, per-class F1, coverage, mistakes
    assert page.count('src="data:image/png;base64,') == 5


def test_tta_averages_the_flip_and_report_shows_curves_and_stage_metrics(tmp_path):
    params = _project(tmp_path, tta=True)
    for name, values in {"train/loss": [1.2, 0.8], "val/loss": [1.1, 0.9], "val/acc": [0.4, 0.6]}.items():
        tsv = params.paths.curves_dir / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        stem = tsv.stem
        tsv.write_text(f"step\t{stem}\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
    params.paths.metrics_dir.mkdir()
    (params.paths.metrics_dir / "validate.json").write_text('{"n_quarantined": 7, "n_valid": 27}')
    params.paths.details("validate").parent.mkdir(parents=True)
    params.paths.details("validate").write_text('{"images_per_class": {"class_0": 12}}')

    evaluate.run(params)

    predictions = pd.read_csv(params.paths.predictions, dtype={"path": str})
    trained = load_trained(params.paths.model)
    image = torch.from_numpy(
        preprocess_file(params.paths.data_root / predictions["path"][0], trained.data_config)
    )[None]
    with torch.inference_mode():
        expected = (softmax(trained.model(image).numpy()) + softmax(trained.model(image.flip(3)).numpy())) / 2
    np.testing.assert_allclose(
        predictions.loc[0, [f"prob_{c}" for c in CLASSES]].to_numpy(float), expected[0], atol=1e-5
    )

    folder = params.paths.reports_dir / "evaluate"
    with Image.open(folder / "training_curves.png") as curves:
        assert curves.format == "PNG"
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "No training curves found" not in page
    assert page.count('src="data:image/png;base64,') == 6  # the five figures and the training curves
    assert "n_quarantined" in page and "No metrics file from the split stage" in page
    assert "details.images_per_class.class_0" in page  # validate's details file, next to its metrics


def test_no_mistakes_gives_a_gallery_that_says_so(tmp_path):
    params = _project(tmp_path, favour=0)  # the model predicts class_0 for everything
    splits = pd.read_csv(params.paths.splits)
    splits = splits[(splits["split"] != "test") | (splits["label"] == "class_0")]
    splits.to_csv(params.paths.splits, index=False)
    summary = evaluate.run(params)
    assert summary["accuracy"] == 1.0 and summary["n_test"] == 3
    folder = params.paths.reports_dir / "evaluate"
    with Image.open(folder / "mistakes.png") as image:
        assert image.format == "PNG"
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<th>path</th>" not in page  # no mistakes table under the gallery


def test_missing_model_names_the_path_and_the_stage(tmp_path):
    params = _project(tmp_path)
    params.paths.model.unlink()
    with pytest.raises(PipelineError, match=r"model\.pt.*train"):
        evaluate.run(params)


def test_empty_test_split_is_a_clear_error(tmp_path):
    params = _project(tmp_path, split_of=lambda i: ("train", "val")[i % 2])
    with pytest.raises(PipelineError, match="test split has no rows"):
        evaluate.run(params)
    assert not params.paths.metrics("evaluate").exists()


def test_labels_unknown_to_the_model_are_a_clear_error(tmp_path):
    params = _project(tmp_path)
    splits = pd.read_csv(params.paths.splits)
    splits.loc[0, "label"] = "zebra"
    splits.to_csv(params.paths.splits, index=False)
    with pytest.raises(PipelineError, match="zebra.*train"):
        evaluate.run(params)


def test_top_k_accuracy_on_known_scores():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2]])
    labels = np.array([2, 1, 1])
    rank = evaluate.true_rank(probs, labels)
    assert rank.tolist() == [2, 1, 0]  # a tie counts for the true class
    assert np.mean(rank < 1) == pytest.approx(1 / 3)
    assert np.mean(rank < 2) == pytest.approx(2 / 3)
    assert np.mean(rank < 3) == pytest.approx(1.0)


@pytest.mark.parametrize("classes", [3, 150])
def test_predictions_have_a_probability_per_class_or_above_a_hundred_the_five_most_probable(classes):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(classes), size=20)
    names = [f"c{k:03d}" for k in range(classes)]
    test = pd.DataFrame(
        {"path": [f"{i}.png" for i in range(20)], "label": [names[i % classes] for i in range(20)]}
    )
    outputs = passes.Outputs(np.log(probs)[None].astype(np.float32), np.ones((20, 4), np.float32))
    detector = unknown.unfitted("energy", np.zeros((0, 4)), 0.95, 1)
    trust = evaluate._Trust(conformal.calibrate(probs, np.zeros(20, int), "lac", 0.1), detector)
    scores = evaluate._score(outputs, np.zeros(20, int), 1.0, trust, classes)
    frame = evaluate._predictions_frame(test, scores, names)
    prob_columns = [c for c in frame.columns if c.startswith("prob_")]
    if classes <= evaluate.PROB_COLUMNS_MAX:
        assert np.allclose(frame[prob_columns].to_numpy(), probs, rtol=1e-5)
        return
    assert prob_columns == []  # 150 columns of figures per image no more
    order = np.argsort(-probs, axis=1)[:, : evaluate.TOP_SHOWN]
    for k in range(evaluate.TOP_SHOWN):
        assert frame[f"top{k + 1}_label"].tolist() == [names[j] for j in order[:, k]]
        assert np.allclose(frame[f"top{k + 1}_prob"], probs[np.arange(20), order[:, k]])
    assert (frame["top1_label"] == frame["pred"]).all()


def test_test_scores_are_computed_a_block_of_rows_at_a_time_from_memory_mapped_outputs(tmp_path, monkeypatch):
    """At a million images of 1,000 classes the test split's probabilities were 2.4 GB a copy and evaluate
    held five (killed at 19 GB); from memory-mapped logits a block of rows at a time, the same figures, and
    memory bounded by the block (a few block-sized temporaries), not by the split."""
    import tracemalloc

    monkeypatch.setattr(evaluate, "BLOCK_ROWS", 256)
    rng = np.random.default_rng(0)
    n, k = 16_000, 600
    logits = np.lib.format.open_memmap(tmp_path / "logits.npy", "w+", np.float32, (2, n, k))
    logits[:] = rng.normal(0, 2, size=logits.shape)
    features = np.lib.format.open_memmap(tmp_path / "features.npy", "w+", np.float32, (n, 8))
    features[:] = rng.normal(size=features.shape)
    labels = rng.integers(0, k, size=n)
    trust = evaluate._Trust(Conformal("aps", 0.1, 0.9, 100), Detector("energy", 0.0, 0.95))
    tracemalloc.start()
    scores = evaluate._score(passes.Outputs(logits, features), labels, 1.5, trust, k)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    probs = (softmax(logits[0]) + softmax(logits[1])) / 2  # the reference: whole arrays, TTA's two views
    calibrated = (softmax(logits[0], 1.5) + softmax(logits[1], 1.5)) / 2
    sets = conformal.prediction_sets(softmax(logits[0], 1.5), trust.conformal)
    rows = np.arange(n)
    assert np.array_equal(scores.pred, probs.argmax(axis=1))
    assert np.allclose(scores.confidence_calibrated, calibrated[rows, scores.pred])
    assert np.allclose(scores.true_prob, probs[rows, labels])
    assert np.array_equal(scores.true_rank, evaluate.true_rank(probs, labels))
    assert np.array_equal(scores.top, np.argsort(-probs, axis=1, kind="stable")[:, : evaluate.TOP_SHOWN])
    assert np.array_equal(scores.covered, sets[rows, labels]) and np.array_equal(scores.set_size, sets.sum(1))
    assert np.allclose(scores.unknown_scores, trust.detector.scores(logits[0], None, 1.5))
    assert scores.probs.shape == (n, 0)  # above PROB_COLUMNS_MAX classes, only the top ones are kept
    assert peak < probs.nbytes / 4, peak / 2**20  # one whole float64 copy: 77 MB

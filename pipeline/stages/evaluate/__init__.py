"""Stage: test-split metrics of the trained model, a temperature fitted on val, plots and report.html.

Images go through `pipeline.preprocess.preprocess_file`, the same torch-free function the ONNX `predict`
command uses, so evaluate's predictions are those a user gets from the export (test-time augmentation aside).
The model runs in fp32 on the train stage's device when the machine has a GPU (TF32 off), else on the CPU.

Trust: the val split also calibrates the conformal prediction sets (`pipeline.serving.conformal`) and the
unknown-input threshold (`pipeline.serving.unknown`, its kNN bank drawn from the train split); the test split,
untouched by both, measures their coverage and how many in-distribution images they mark unknown.

Memory: the logits and features of each split go to memory-mapped files in a scratch folder under
`paths.cache_dir` (removed when the stage ends) and every figure is computed a block of rows at a time, so
what stays in memory is a few figures per test image (and their probabilities up to PROB_COLUMNS_MAX
classes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline.calibration import Reliability, fit_temperature, log_loss_of, reliability_of, softmax
from pipeline.config import EvaluateParams, Params, PathsParams
from pipeline.data.sampling import stratified_sample
from pipeline.data.shards import BLOCK_ROWS, spans
from pipeline.data.splits import read_splits_table
from pipeline.io import atomic_dir, scratch_dir, write_bytes, write_json, write_text
from pipeline.models import TrainedModel, load_trained
from pipeline.pages import report
from pipeline.serving import conformal, unknown
from pipeline.stages import Stage, contracts
from pipeline.stages.evaluate import label_sets
from pipeline.stages.evaluate.passes import Outputs, bank_of, npy, outputs, split_rows, thumbnail
from pipeline.training.precision import configure_backends, evaluation_device, visible_gpus

STAGE = Stage(
    summary="Test-split metrics, calibration, plots and the run's report page.",
    params=("evaluate", "train.device", "base.seed", "base.task", "base.label_separator"),
    deps=(
        "model",
        "splits",
        "curves_dir",
        "metrics:validate",
        "metrics:split",
        "details:validate",
        "details:split",
    ),
    outs=("predictions", "calibration", "feature_bank", "reports:evaluate"),
    page="report.html",
    dvc_plots={
        "confusion.csv": {
            "template": "confusion",
            "x": "actual",
            "y": "predicted",
            "title": "Test confusion matrix",
        },
        "confusion_matrix.png": {},
        "reliability.png": {},
        "per_class_f1.png": {},
        "mistakes.png": {},
        "coverage.png": {},
    },
)

log = logging.getLogger(__name__)

_TRUST_DETAILS = ("conformal", "unknown")  # details keys the report shows in its own section


@dataclass(frozen=True)
class _Trust:
    """The val-calibrated conformal predictor and unknown-input detector."""

    conformal: conformal.Conformal
    detector: unknown.Detector


@dataclass(frozen=True)
class _Scores:
    """What the metrics, predictions, plots and trust figures read of each test image, computed a block of
    rows at a time (`_score`): never the (N, K) probabilities, 2.4 GB a copy at a million images of 1,000
    classes. `probs` are the softmax probabilities averaged over the TTA views; `calibrated` the same after
    temperature scaling."""

    pred: np.ndarray  # (N,) argmax of probs
    confidence: np.ndarray  # (N,) probs[pred]
    confidence_calibrated: np.ndarray  # (N,) calibrated[pred]: what predict reports
    calibrated_top: np.ndarray  # (N,) max of calibrated, and its argmax (ECE after scaling)
    calibrated_pred: np.ndarray
    true_prob: np.ndarray  # (N,) probs[label], calibrated[label]
    true_prob_calibrated: np.ndarray
    true_rank: np.ndarray  # (N,) classes more probable than the true one
    probs: np.ndarray  # (N, K) up to PROB_COLUMNS_MAX classes, else (N, 0)
    top: np.ndarray  # (N, min(K, TOP_SHOWN)) the most probable classes, most probable first
    top_probs: np.ndarray  # (N, min(K, TOP_SHOWN)) their probs
    covered: np.ndarray  # (N,) bool: the true class is in the conformal set
    set_size: np.ndarray  # (N,)
    unknown_scores: np.ndarray  # (N,) in-distribution score of the unknown-input detector

    def reliability(self, labels: np.ndarray, bins: int) -> tuple[Reliability, Reliability]:
        """Confidence bins before and after temperature scaling."""
        return (
            reliability_of(self.confidence, self.pred == labels, bins),
            reliability_of(self.calibrated_top, self.calibrated_pred == labels, bins),
        )


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.evaluate
    trained = load_trained(paths.model)
    if params.base.task == "multilabel":
        return label_sets.run(params, trained, read_splits_table(paths.splits))
    class_names = list(trained.class_names)
    splits = _read_splits(paths.splits, class_names, paths.model)
    val, test = (split_rows(splits, split, paths.splits) for split in ("val", "test"))
    index = {name: i for i, name in enumerate(class_names)}
    y_val = val["label"].map(index).to_numpy()
    y_test = test["label"].map(index).to_numpy()
    device = evaluation_device(params.train.device, visible_gpus())
    configure_backends(device, tf32=False)
    trained.model.float().to(device).eval()

    with scratch_dir(paths.cache_dir / "evaluate") as scratch:
        val_out = outputs(trained, paths.data_root, val["path"], cfg, False, scratch / "val", "evaluate val")
        fit = fit_temperature(val_out.logits[0], y_val)
        bank_files = _bank_files(splits, paths.splits, index, cfg, params.base.seed)
        trust = _fit_trust(
            trained, paths.data_root, cfg, val_out, y_val, bank_files, fit.temperature, scratch
        )
        test_out = outputs(
            trained, paths.data_root, test["path"], cfg, cfg.tta, scratch / "test", "evaluate test"
        )
        scores = _score(test_out, y_test, fit.temperature, trust, len(class_names))
        width = test_out.features.shape[1]

    predictions = _predictions_frame(test, scores, class_names)
    metrics, details = _figures(y_test, scores, class_names, cfg.top_k, cfg.calibration_bins)
    details["temperature"] = fit.temperature
    _trust_figures(trust, scores, y_test, class_names, metrics, details)

    _write_report_folder(paths, cfg, trained, splits, predictions, metrics, details, scores, y_test)
    write_text(paths.predictions, predictions.to_csv(index=False))
    write_bytes(paths.feature_bank, npy(bank_of(trust.detector, width)))
    write_json(
        paths.calibration,
        {
            "temperature": fit.temperature,
            "val_nll_before": fit.nll_before,
            "val_nll_after": fit.nll_after,
            "conformal": trust.conformal.to_json(),
            "unknown": trust.detector.settings(),
        },
    )
    write_json(paths.metrics("evaluate"), metrics)
    log.info(
        "test accuracy %.4f on %d images; temperature %.3f", metrics["accuracy"], len(test), fit.temperature
    )
    return {
        "accuracy": metrics["accuracy"],
        "f1_macro": metrics["f1_macro"],
        "ece_after": metrics["ece_after"],
        "temperature": fit.temperature,
        "n_test": len(test),
        "report": (paths.reports("evaluate") / STAGE.page).as_posix(),
    }


def _read_splits(path: Path, class_names: list[str], model_path: Path) -> pd.DataFrame:
    return read_splits_table(path, class_names, model_path)


def _bank_files(
    splits: pd.DataFrame, source: Path, index: dict[str, int], cfg: EvaluateParams, seed: int
) -> pd.Series:
    """The train images whose features make the kNN bank: a stratified sample of `unknown.bank_size` drawn
    with `seed`; none for the other detectors, which need no bank."""
    if cfg.unknown.detector != "knn":
        return pd.Series([], dtype=str)
    train = split_rows(splits, "train", source)
    return train["path"].iloc[
        stratified_sample(train["label"].map(index).to_numpy(), cfg.unknown.bank_size, seed)
    ]


def _fit_trust(
    trained: TrainedModel,
    data_root: Path,
    cfg: EvaluateParams,
    val: Outputs,
    y_val: np.ndarray,
    bank_files: pd.Series,
    temperature: float,
    scratch: Path,
) -> _Trust:
    """Conformal threshold and unknown-input threshold from the unflipped val images (after temperature
    scaling), in one pass over blocks of rows."""
    c, u = cfg.conformal, cfg.unknown
    bank = np.zeros((0, val.features.shape[1]), dtype=np.float32)
    if len(bank_files):
        bank_out = outputs(
            trained, data_root, bank_files, cfg, False, scratch / "bank", "evaluate train bank"
        )
        bank = np.array(bank_out.features)
    detector = unknown.unfitted(u.detector, bank, u.tpr, u.knn_k, u.knn_dims)
    true_scores, unknown_scores = [], []
    for start, stop in spans(len(y_val), BLOCK_ROWS):
        logits, features = val.rows(start, stop)
        probs = softmax(logits[0], temperature)
        true_scores.append(
            conformal.true_scores(probs, y_val[start:stop], c.method, c.raps_k_reg, c.raps_lambda)
        )
        unknown_scores.append(detector.scores(logits[0], features, temperature))
    return _Trust(
        conformal=conformal.from_true_scores(
            np.concatenate(true_scores), c.method, c.alpha, c.raps_k_reg, c.raps_lambda
        ),
        detector=detector.fitted(np.concatenate(unknown_scores)),
    )


def _score(test: Outputs, y: np.ndarray, temperature: float, trust: _Trust, classes: int) -> _Scores:
    """Each test image's `_Scores`, a block of rows at a time; the conformal sets and unknown scores of the
    unflipped images, the ones predict sees."""
    parts: list[dict[str, np.ndarray]] = []
    for start, stop in spans(len(y), BLOCK_ROWS):
        views, features = test.rows(start, stop)
        labels, rows = y[start:stop], np.arange(stop - start)
        unflipped = softmax(views[0], temperature)
        probs = sum(softmax(v) for v in views) / len(views)
        calibrated = (unflipped + sum(softmax(v, temperature) for v in views[1:])) / len(views)
        pred, calibrated_pred = probs.argmax(axis=1), calibrated.argmax(axis=1)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_SHOWN].copy()  # not a view of all K
        sets = conformal.prediction_sets(unflipped, trust.conformal)
        parts.append(
            {
                "pred": pred,
                "confidence": probs[rows, pred],
                "confidence_calibrated": calibrated[rows, pred],
                "calibrated_top": calibrated[rows, calibrated_pred],
                "calibrated_pred": calibrated_pred,
                "true_prob": probs[rows, labels],
                "true_prob_calibrated": calibrated[rows, labels],
                "true_rank": true_rank(probs, labels),
                "probs": probs if classes <= PROB_COLUMNS_MAX else np.empty((len(probs), 0)),
                "top": top,
                "top_probs": np.take_along_axis(probs, top, axis=1),
                "covered": sets[rows, labels],
                "set_size": sets.sum(axis=1),
                "unknown_scores": trust.detector.scores(views[0], features, temperature),
            }
        )
    return _Scores(**{name: np.concatenate([part[name] for part in parts]) for name in parts[0]})


def _trust_figures(
    trust: _Trust, scores: _Scores, y: np.ndarray, class_names: list[str], metrics: dict, details: dict
) -> None:
    """Add the test split's coverage, set sizes and unknown rate: headline scalars to `metrics`, the rest
    (per class, by set size) to `details`."""
    sets = conformal.figures_of(scores.covered, scores.set_size, y, class_names)
    flagged = trust.detector.unknown(scores.unknown_scores)
    correct = scores.pred == y
    metrics.update(
        coverage=sets["coverage"],
        set_size_mean=sets["set_size_mean"],
        singleton_share=sets["singleton_share"],
        unknown_rate=float(flagged.mean()),
    )
    details["conformal"] = {**trust.conformal.to_json(), **sets}
    details["unknown"] = {
        **trust.detector.settings(),
        "bank_images": 0 if trust.detector.bank is None else len(trust.detector.bank),
        "test_unknown_rate": float(flagged.mean()),
        "unknown_rate_correct": float(flagged[correct].mean()) if correct.any() else None,
        "unknown_rate_mistakes": float(flagged[~correct].mean()) if (~correct).any() else None,
    }


def _predictions_frame(test: pd.DataFrame, scores: _Scores, class_names: list[str]) -> pd.DataFrame:
    """One row per test image. `confidence` and prob_* are raw softmax; `confidence_calibrated` is the
    predicted class's probability after temperature scaling, the figure `predict` reports. A prob_<class>
    column per class up to PROB_COLUMNS_MAX classes; above, the TOP_SHOWN most probable as top<k>_label and
    top<k>_prob (a thousand classes of 150,000 test images: 150 million figures, 1.5 GB of CSV)."""
    names = np.asarray(class_names, dtype=object)
    frame = pd.DataFrame(
        {
            "path": test["path"],
            "label": test["label"],
            "pred": names[scores.pred],
            "confidence": scores.confidence,
        }
    )
    frame["correct"] = frame["label"] == frame["pred"]
    frame["confidence_calibrated"] = scores.confidence_calibrated
    if len(class_names) <= PROB_COLUMNS_MAX:
        columns = {f"prob_{name}": scores.probs[:, k] for k, name in enumerate(class_names)}
    else:
        columns = {}
        for k in range(scores.top.shape[1]):
            columns[f"top{k + 1}_label"] = names[scores.top[:, k]]
            columns[f"top{k + 1}_prob"] = scores.top_probs[:, k]
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


PROB_COLUMNS_MAX = 100
TOP_SHOWN = 5


def true_rank(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) how many classes score above each row's true class (0: top-1; a tie counts for the true class):
    the share below k is the top-k accuracy."""
    true_score = probs[np.arange(len(labels)), labels]
    return (probs > true_score[:, None]).sum(axis=1)


def _figures(
    y: np.ndarray, scores: _Scores, class_names: list[str], top_k: int, bins: int
) -> tuple[dict, dict]:
    """(metrics, details): the headline scalars `dvc exp show` compares, and the rest, per class included."""
    k, pred = min(top_k, len(class_names)), scores.pred
    before, after = scores.reliability(y, bins)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),  # sklearn's definition, for all K labels
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "top_k_accuracy": float(np.mean(scores.true_rank < k)),
        "log_loss": log_loss_of(scores.true_prob),
        "ece_before": before.ece,
        "ece_after": after.ece,
    }
    details = {
        "n_test": len(y),
        "top_k": k,
        "f1_weighted": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "log_loss_calibrated": log_loss_of(scores.true_prob_calibrated),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
    }
    return metrics, details


def _write_report_folder(
    paths: PathsParams,
    cfg: EvaluateParams,
    trained: TrainedModel,
    splits: pd.DataFrame,
    predictions: pd.DataFrame,
    metrics: dict,
    details: dict,
    scores: _Scores,
    y_test: np.ndarray,
) -> None:
    """confusion.csv, the PNGs, report.html and details.json, written as one folder so a crash leaves the old
    one intact."""
    mistakes = (
        predictions.loc[~predictions["correct"], ["path", "label", "pred", "confidence"]]
        .sort_values(["confidence", "path"], ascending=[False, True], kind="stable")
        .head(cfg.mistakes_shown)
        .reset_index(drop=True)
    )
    data = report.collect(
        paths,
        run_summary=_run_summary(paths.model, cfg, trained),
        splits=splits,
        test_metrics={
            key: value
            for key, value in {**metrics, **details}.items()
            if key not in ("per_class", *_TRUST_DETAILS)
        },
        per_class=details["per_class"],
        mistakes=mistakes,
        figures=_plots(
            paths.data_root, cfg.calibration_bins, trained.class_names, mistakes, details, scores, y_test
        ),
        links=_page_links(paths),
        trust={key: details[key] for key in _TRUST_DETAILS},
    )
    confusion = pd.DataFrame({"actual": predictions["label"], "predicted": predictions["pred"]})
    with atomic_dir(paths.reports("evaluate")) as folder:
        confusion.to_csv(folder / "confusion.csv", index=False)
        write_json(folder / paths.details("evaluate").name, details)
        curves = {} if data.curves_png is None else {"training_curves": data.curves_png}
        for name, png in {**data.figures, **curves}.items():
            (folder / f"{name}.png").write_bytes(png)
        (folder / STAGE.page).write_text(report.render_report(data), encoding="utf-8")


def _page_links(paths: PathsParams) -> dict[str, str]:
    """The pages the report links to, where their stages' contracts put them, relative to the report's
    folder (`../export/index.html` with the default paths)."""
    here = (paths.reports("evaluate") / STAGE.page).parent
    pages = {name: paths.reports(name) / contracts()[name].page for name in report.LINKED}
    return {name: Path(os.path.relpath(target, here)).as_posix() for name, target in pages.items()}


def _plots(
    data_root: Path,
    bins: int,
    class_names: list[str],
    mistakes: pd.DataFrame,
    details: dict,
    scores: _Scores,
    y_test: np.ndarray,
) -> dict[str, bytes]:
    """The report's PNGs: confusion matrix, reliability before/after scaling (`bins` of confidence), per-class
    F1, mistakes (their images under `data_root`)."""
    matrix = np.zeros((len(class_names), len(class_names)), dtype=int)
    np.add.at(matrix, (y_test, scores.pred), 1)
    tiles = [
        report.Tile(
            thumbnail(data_root / row.path),
            f"true: {row.label}\npred: {row.pred} ({row.confidence:.2f})",
        )
        for row in mistakes.itertuples(index=False)
    ]
    before, after = scores.reliability(y_test, bins)
    return {
        "confusion_matrix": report.confusion_png(matrix, class_names),
        "reliability": report.reliability_png(before, after, details["temperature"]),
        "per_class_f1": report.per_class_f1_png(
            class_names, [details["per_class"][c]["f1"] for c in class_names]
        ),
        "mistakes": report.mistakes_png(tiles, "No mistakes on the test split"),
        "coverage": report.coverage_png(details["conformal"]),
    }


def _run_summary(model_path: Path, cfg: EvaluateParams, trained: TrainedModel) -> list[tuple[str, Any]]:
    """The settings a reader needs to interpret the numbers, taken from the params saved inside the model
    (read from `model_path`) and this stage's own."""
    model = trained.params.get("model", {})
    train = trained.params.get("train", {})
    return [
        ("model artifact", model_path.as_posix()),
        ("backbone", model.get("backbone")),
        ("weights", model.get("weights")),
        ("head", model.get("head")),
        ("input size", "x".join(str(s) for s in trained.data_config.get("input_size", []))),
        ("strategy", train.get("strategy")),
        ("epochs", train.get("epochs")),
        ("optimizer", train.get("optimizer")),
        ("learning rate", train.get("lr")),
        ("batch size", train.get("batch_size")),
        ("label smoothing", train.get("label_smoothing")),
        ("seed", trained.params.get("base", {}).get("seed")),
        ("test-time augmentation", cfg.tta),
        ("top-k", cfg.top_k),
    ]

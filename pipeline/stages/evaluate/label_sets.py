"""Evaluate for label sets (`base.task: multilabel`): each label a yes/no question answered by its sigmoid.

- Thresholds: one per label, the one that maximises the label's F1 on val (halfway between the scores
  either side of the best cut); a label without a positive in val keeps 0.5. Test is scored at these
  thresholds and, for comparison, at 0.5.
- Figures on test: mAP (macro over the labels with a positive; micro over every (image, label) pair), AP,
  precision, recall and F1 per label, example-based F1 (per image: 2|true & predicted| / (|true| +
  |predicted|), 1 when both are empty), Hamming loss, subset accuracy (the whole set right), and each
  label's calibration (ECE of its probability of being present).
- Trust: the unknown-input detector as for one label per image (kNN on the penultimate features, threshold
  on val); conformal sets are for one label per image and are not made here.
- Pictures: precision-recall curves, per-label F1, the most confident false positives and false negatives.

Memory: the val and test probabilities are held as (N, K) float32 (150,000 test images of 100 labels: 60 MB);
the logits pass is `passes.outputs`, memory-mapped.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve

from pipeline.calibration import reliability_of, tuned_thresholds
from pipeline.config import Params
from pipeline.data.labels import LabelSets, joined, multi_hot
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, scratch_dir, write_bytes, write_json, write_text
from pipeline.models import TrainedModel
from pipeline.pages import page, report
from pipeline.serving import unknown
from pipeline.stages.evaluate.passes import bank_of, npy, outputs, split_rows, thumbnail

log = logging.getLogger(__name__)

PROB_COLUMNS_MAX = 100  # prob_<label> columns in the predictions up to this many labels
_CURVES_SHOWN = 10  # labels drawn in the precision-recall plot (the most frequent), beside the micro curve


def run(params: Params, trained: TrainedModel, splits: pd.DataFrame) -> dict:
    """Probabilities on val and test, thresholds from val, the test figures, report, predictions, the
    thresholds and unknown detector in `paths.calibration`, the kNN bank; the stage's summary."""
    paths, cfg = params.paths, params.evaluate
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    names = list(trained.class_names)
    unknown_labels = sorted(set(sets.names(splits["label"])) - set(names))
    if unknown_labels or trained.params.get("base", {}).get("task") != "multilabel":
        raise PipelineError(
            f"{paths.model}: trained for {trained.params.get('base', {}).get('task', 'single')} labels "
            f"{names[:10]}, not for the label sets of {paths.splits} (labels unknown to it: "
            f"{unknown_labels[:10]}); re-run the train stage (dvc repro train)"
        )
    val, test = (split_rows(splits, split, paths.splits) for split in ("val", "test"))
    y_val, y_test = (multi_hot(sets.exploded(rows["label"]), len(rows), names) for rows in (val, test))
    with scratch_dir(paths.cache_dir / "evaluate") as scratch:
        val_out = outputs(trained, paths.data_root, val["path"], cfg, False, scratch / "val", "evaluate val")
        p_val = _sigmoid(np.array(val_out.logits[0]))
        bank = _bank_features(trained, params, splits, scratch)
        detector = unknown.unfitted("knn", bank, cfg.unknown.tpr, cfg.unknown.knn_k, cfg.unknown.knn_dims)
        detector = detector.fitted(detector.scores(val_out.logits[0], np.array(val_out.features), 1.0))
        test_out = outputs(
            trained, paths.data_root, test["path"], cfg, cfg.tta, scratch / "test", "evaluate test"
        )
        p_test = np.mean([_sigmoid(np.array(view)) for view in test_out.logits], axis=0)
        flagged = detector.unknown(detector.scores(test_out.logits[0], np.array(test_out.features), 1.0))
        width = test_out.features.shape[1]
    thresholds = tuned_thresholds(p_val, y_val)
    metrics, details = figures(y_test, p_test, thresholds, names, cfg.calibration_bins)
    metrics["unknown_rate"] = float(flagged.mean())
    details["thresholds"] = dict(zip(names, thresholds.tolist(), strict=True))  # as decided: not rounded
    details["unknown"] = {**detector.settings(), "test_unknown_rate": float(flagged.mean())}
    predictions = predictions_frame(test, p_test, thresholds, names, sets)
    _write_report(paths.reports("evaluate"), paths, predictions, metrics, details, p_test, y_test, names)
    write_text(paths.predictions, predictions.to_csv(index=False))
    write_bytes(paths.feature_bank, npy(bank_of(detector, width)))
    write_json(
        paths.calibration,
        {"task": "multilabel", "thresholds": details["thresholds"], "unknown": detector.settings()},
    )
    write_json(paths.metrics("evaluate"), metrics)
    log.info(
        "test mAP %.4f, macro F1 %.4f at the tuned thresholds, on %d images",
        metrics["map_macro"],
        metrics["f1_macro"],
        len(test),
    )
    return {key: metrics[key] for key in ("map_macro", "f1_macro", "subset_accuracy", "n_test")}


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def _bank_features(trained: TrainedModel, params: Params, splits: pd.DataFrame, scratch: Path) -> np.ndarray:
    """Penultimate features of `evaluate.unknown.bank_size` train images drawn at random with `base.seed`."""
    cfg = params.evaluate
    train = split_rows(splits, "train", params.paths.splits)
    rng = np.random.default_rng(params.base.seed)
    drawn = np.sort(rng.permutation(len(train))[: cfg.unknown.bank_size])
    files = train["path"].iloc[drawn]
    bank = outputs(
        trained, params.paths.data_root, files, cfg, False, scratch / "bank", "evaluate train bank"
    )
    return np.array(bank.features)


def figures(
    truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, names: list[str], bins: int
) -> tuple[dict, dict]:
    """(metrics, details) of the test split: the headline scalars and the per-label figures."""
    said, said_half = probs >= thresholds, probs >= 0.5
    present = truth.any(axis=0)
    ap = np.array(
        [
            average_precision_score(truth[:, k], probs[:, k]) if present[k] else np.nan
            for k in range(len(names))
        ]
    )
    per_label, f1 = _per_label(truth, said)
    _, f1_half = _per_label(truth, said_half)
    ece = np.array([reliability_of(probs[:, k], truth[:, k], bins).ece for k in range(len(names))])
    both = (truth & said).sum(axis=1)
    sizes = truth.sum(axis=1) + said.sum(axis=1)
    example_f1 = np.where(sizes == 0, 1.0, 2 * both / np.maximum(sizes, 1))
    metrics = {
        "map_macro": float(np.nanmean(ap)) if present.any() else 0.0,
        "map_micro": float(average_precision_score(truth.ravel(), probs.ravel())) if truth.any() else 0.0,
        "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
        "f1_macro_at_0_5": float(f1_half[present].mean()) if present.any() else 0.0,
        "f1_micro": _f1(truth & said, ~truth & said, truth & ~said),
        "example_f1": float(example_f1.mean()),
        "hamming_loss": float((truth != said).mean()),
        "subset_accuracy": float((truth == said).all(axis=1).mean()),
        "ece_mean": float(ece[present].mean()) if present.any() else 0.0,
        "n_test": len(truth),
    }
    details = {
        "per_label": {
            name: {
                **per_label[k],
                "ap": None if np.isnan(ap[k]) else float(ap[k]),
                "f1_at_0_5": float(f1_half[k]),
                "ece": float(ece[k]),
            }
            for k, name in enumerate(names)
        },
        "labels_without_test_positive": [name for k, name in enumerate(names) if not present[k]],
    }
    return metrics, details


def _per_label(truth: np.ndarray, said: np.ndarray) -> tuple[list[dict], np.ndarray]:
    tp, fp, fn = ((truth & said).sum(0), (~truth & said).sum(0), (truth & ~said).sum(0))
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    rows = [
        {
            "precision": float(tp[k] / max(tp[k] + fp[k], 1)),
            "recall": float(tp[k] / max(tp[k] + fn[k], 1)),
            "f1": float(f1[k]),
            "support": int(tp[k] + fn[k]),
        }
        for k in range(len(tp))
    ]
    return rows, f1


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    return float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1))


def predictions_frame(
    test: pd.DataFrame, probs: np.ndarray, thresholds: np.ndarray, names: list[str], sets: LabelSets
) -> pd.DataFrame:
    """One row per test image: its label set, the predicted set (tuned thresholds), whether they are equal,
    and a prob_<label> column per label up to PROB_COLUMNS_MAX labels."""
    said = probs >= thresholds
    predicted = [joined((names[k] for k in np.flatnonzero(row)), sets.separator) for row in said]
    frame = pd.DataFrame({"path": test["path"], "label": test["label"], "pred": predicted})
    frame["correct"] = frame["label"] == frame["pred"]
    if len(names) <= PROB_COLUMNS_MAX:
        frame = pd.concat(
            [frame, pd.DataFrame(probs, columns=[f"prob_{n}" for n in names], index=frame.index)], axis=1
        )
    return frame


def confident_errors(
    truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, shown: int
) -> pd.DataFrame:
    """The `shown` most confident false positives (a label said with the highest probability but absent)
    and false negatives (present but given the lowest), as rows (image, label, kind, probability)."""
    image, label = np.nonzero((probs >= thresholds) & ~truth)
    fp = pd.DataFrame(
        {"image": image, "label": label, "kind": "false positive", "probability": probs[image, label]}
    )
    image, label = np.nonzero((probs < thresholds) & truth)
    fn = pd.DataFrame(
        {"image": image, "label": label, "kind": "false negative", "probability": probs[image, label]}
    )
    return pd.concat(
        [
            fp.sort_values(["probability", "image"], ascending=[False, True], kind="stable").head(shown // 2),
            fn.sort_values(["probability", "image"], kind="stable").head(shown - shown // 2),
        ]
    ).reset_index(drop=True)


def _write_report(
    folder: Path,
    paths,
    predictions: pd.DataFrame,
    metrics: dict,
    details: dict,
    probs: np.ndarray,
    truth: np.ndarray,
    names: list[str],
) -> None:
    """details.json, the pictures and report.html, written as one folder (a crash leaves the old one)."""
    thresholds = np.array([details["thresholds"][name] for name in names])
    errors = confident_errors(truth, probs, thresholds, 16)
    tiles = [
        report.Tile(
            thumbnail(paths.data_root / predictions["path"].iat[row.image]),
            f"{row.kind}: {names[row.label]} ({row.probability:.2f})",
        )
        for row in errors.itertuples(index=False)
    ]
    pictures = {
        "pr_curves": _pr_curves_png(truth, probs, names),
        "per_class_f1": report.per_class_f1_png(names, [details["per_label"][n]["f1"] for n in names]),
        "mistakes": report.mistakes_png(tiles, "No false positive or false negative on the test split"),
    }
    with atomic_dir(folder) as out:
        write_json(out / "details.json", {**metrics, **details})
        for name, png in pictures.items():
            (out / f"{name}.png").write_bytes(png)
        (out / "report.html").write_text(_page(metrics, details, pictures), encoding="utf-8")


def _pr_curves_png(truth: np.ndarray, probs: np.ndarray, names: list[str]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    if truth.any():
        precision, recall, _ = precision_recall_curve(truth.ravel(), probs.ravel())
        axes.plot(recall, precision, color="black", linewidth=2, label="all labels (micro)")
    for k in np.argsort(-truth.sum(axis=0), kind="stable")[:_CURVES_SHOWN].tolist():
        if truth[:, k].any():
            precision, recall, _ = precision_recall_curve(truth[:, k], probs[:, k])
            axes.plot(recall, precision, linewidth=1, label=names[k])
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("Precision-recall on the test split")
    axes.legend(loc="lower left", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _page(metrics: dict, details: dict, pictures: dict[str, bytes]) -> str:
    """The report: headline figures, the per-label table, the pictures (embedded: it opens offline)."""
    cards = page.cards(
        [
            ("mAP (macro)", f"{metrics['map_macro']:.3f}", ""),
            ("mAP (micro)", f"{metrics['map_micro']:.3f}", ""),
            ("macro F1, tuned thresholds", f"{metrics['f1_macro']:.3f}", ""),
            ("macro F1 at 0.5", f"{metrics['f1_macro_at_0_5']:.3f}", ""),
            ("example-based F1", f"{metrics['example_f1']:.3f}", ""),
            ("subset accuracy", f"{metrics['subset_accuracy']:.3f}", ""),
            ("Hamming loss", f"{metrics['hamming_loss']:.4f}", ""),
            ("test images", metrics["n_test"], ""),
        ]
    )
    rows = [
        (
            name,
            figure["support"],
            figure["ap"],
            details["thresholds"][name],
            figure["precision"],
            figure["recall"],
            figure["f1"],
            figure["f1_at_0_5"],
            figure["ece"],
        )
        for name, figure in details["per_label"].items()
    ]
    header = [
        "label",
        "test positives",
        "AP",
        "threshold (val)",
        "precision",
        "recall",
        "F1",
        "F1 at 0.5",
        "ECE",
    ]
    sections = [
        ("headline", "Headline", cards),
        ("labels", "Per label", page.table(header, rows)),
        ("curves", "Precision-recall", page.image(pictures["pr_curves"], "precision-recall curves")),
        ("f1", "F1 per label", page.image(pictures["per_class_f1"], "F1 per label")),
        (
            "mistakes",
            "Most confident false positives and negatives",
            page.image(pictures["mistakes"], "errors"),
        ),
        ("raw", "Raw figures", page.details("details.json", page.key_values(details))),
    ]
    return page.document("Evaluation (label sets)", sections)

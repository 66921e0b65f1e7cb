"""Stage: test-split metrics of the trained model, a temperature fitted on val, plots and report.html.

Images go through `pipeline.preprocess.preprocess_file`, the same torch-free function the ONNX `predict`
command uses, so evaluate's predictions are those a user gets from the export (test-time augmentation aside).
The model runs in fp32 on the train stage's device when the machine has a GPU (TF32 off), else on the CPU.

Trust: the val split also calibrates the conformal prediction sets (`pipeline.serving.conformal`) and the
unknown-input threshold (`pipeline.serving.unknown`, its kNN bank drawn from the train split); the test split,
untouched by both, measures their coverage and how many in-distribution images they mark unknown.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline.calibration import fit_temperature, log_loss, reliability, softmax
from pipeline.config import EvaluateParams, Params, PathsParams
from pipeline.data.sampling import stratified_sample
from pipeline.data.splits import read_splits_table
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_bytes, write_json, write_text
from pipeline.models import TrainedModel, load_trained
from pipeline.pages import report
from pipeline.preprocess import open_rgb, preprocess_file
from pipeline.progress import progress
from pipeline.serving import conformal, unknown
from pipeline.stages import Stage, contracts
from pipeline.training.precision import configure_backends, evaluation_device, visible_gpus

STAGE = Stage(
    summary="Test-split metrics, calibration, plots and the run's report page.",
    params=("evaluate", "train.device", "base.seed"),
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

_THUMBNAIL_SIDE = 160
_TRUST_DETAILS = ("conformal", "unknown")  # details keys the report shows in its own section


@dataclass(frozen=True)
class _Scores:
    """Test-split scores: probabilities averaged over the TTA views, before and after temperature scaling."""

    probs: np.ndarray  # (N, K)
    probs_calibrated: np.ndarray  # (N, K)


@dataclass(frozen=True)
class _Outputs:
    """The model's outputs on one split: logits per view and the first view's penultimate features."""

    logits: np.ndarray  # (V, N, K)
    features: np.ndarray  # (N, C): the pooled backbone features the head reads


@dataclass(frozen=True)
class _Trust:
    """The val-calibrated conformal predictor and unknown-input detector, and what they do on test."""

    conformal: conformal.Conformal
    detector: unknown.Detector
    sets: np.ndarray  # (N, K) bool, test
    unknown_scores: np.ndarray  # (N,), test


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.evaluate
    trained = load_trained(paths.model)
    class_names = list(trained.class_names)
    splits = _read_splits(paths.splits, class_names, paths.model)
    val, test = (_rows(splits, split, paths.splits) for split in ("val", "test"))
    index = {name: i for i, name in enumerate(class_names)}
    y_val = val["label"].map(index).to_numpy()
    y_test = test["label"].map(index).to_numpy()
    device = evaluation_device(params.train.device, visible_gpus())
    configure_backends(device, tf32=False)
    trained.model.float().to(device).eval()

    val_out = _outputs(trained, paths.data_root, val["path"], cfg.batch_size, False, "evaluate val")
    fit = fit_temperature(val_out.logits[0], y_val)
    test_out = _outputs(trained, paths.data_root, test["path"], cfg.batch_size, cfg.tta, "evaluate test")
    test_views = test_out.logits
    scores = _Scores(
        probs=np.mean([softmax(v) for v in test_views], axis=0),
        probs_calibrated=np.mean([softmax(v, fit.temperature) for v in test_views], axis=0),
    )
    bank_files = _bank_files(splits, paths.splits, index, cfg, params.base.seed)
    trust = _fit_trust(trained, paths.data_root, cfg, (val_out, y_val), test_out, bank_files, fit.temperature)

    pred = scores.probs.argmax(axis=1)
    predictions = _predictions_frame(test, scores, pred, class_names)
    metrics, details = _figures(y_test, pred, scores, class_names, cfg.top_k, cfg.calibration_bins)
    details["temperature"] = fit.temperature
    _trust_figures(trust, y_test, pred, class_names, metrics, details)

    _write_report_folder(paths, cfg, trained, splits, predictions, metrics, details, scores, y_test)
    write_text(paths.predictions, predictions.to_csv(index=False))
    write_bytes(paths.feature_bank, _npy(_bank(trust.detector, val_out.features.shape[1])))
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


_WHY_NEEDED = {
    "test": "there is nothing to evaluate; set split.test > 0 (or split.carve_test_from for pre-split data)",
    "val": "the temperature cannot be fitted; set split.val > 0",
}


def _rows(splits: pd.DataFrame, split: str, source: Path) -> pd.DataFrame:
    """One split's rows sorted by path; a clear error when it has none."""
    rows = splits[splits["split"] == split].sort_values("path", kind="stable").reset_index(drop=True)
    if rows.empty:
        raise PipelineError(
            f"{source}: the {split} split has no rows, so {_WHY_NEEDED[split]}, and re-run `dvc repro split`"
        )
    return rows


def _read_splits(path: Path, class_names: list[str], model_path: Path) -> pd.DataFrame:
    return read_splits_table(path, class_names, model_path)


def _outputs(
    trained: TrainedModel, data_root: Path, files: pd.Series, batch_size: int, tta: bool, desc: str
) -> _Outputs:
    """fp32 logits (V, N, K) of the model (in eval mode, on its device), V = 2 with TTA (the image and its
    horizontal flip), else 1; and the unflipped images' pooled features (N, C), which the head maps to logits
    and the ONNX export outputs next to them."""
    model = trained.model
    device = next(model.parameters()).device
    views: list[list[np.ndarray]] = [[] for _ in range(2 if tta else 1)]
    features: list[np.ndarray] = []
    files = list(files)
    with torch.inference_mode(), progress(desc, len(files), "img") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = np.stack([_load(data_root, f, trained.data_config) for f in chunk])
            batch = torch.from_numpy(images).to(device)
            pooled = model.forward_features(batch)
            features.append(pooled.cpu().numpy())
            views[0].append(model.head(pooled).cpu().numpy())
            if tta:
                views[1].append(model(torch.flip(batch, dims=[3])).cpu().numpy())  # (B, C, H, W): flip W
            bar.update(len(chunk))
    return _Outputs(np.stack([np.concatenate(v) for v in views]), np.concatenate(features))


def _bank_files(
    splits: pd.DataFrame, source: Path, index: dict[str, int], cfg: EvaluateParams, seed: int
) -> pd.Series:
    """The train images whose features make the kNN bank: a stratified sample of `unknown.bank_size` drawn
    with `seed`; none for the other detectors, which need no bank."""
    if cfg.unknown.detector != "knn":
        return pd.Series([], dtype=str)
    train = _rows(splits, "train", source)
    return train["path"].iloc[
        stratified_sample(train["label"].map(index).to_numpy(), cfg.unknown.bank_size, seed)
    ]


def _fit_trust(
    trained: TrainedModel,
    data_root: Path,
    cfg: EvaluateParams,
    val: tuple[_Outputs, np.ndarray],
    test: _Outputs,
    bank_files: pd.Series,
    temperature: float,
) -> _Trust:
    """Conformal threshold and unknown-input threshold from val (after temperature scaling), applied to the
    unflipped test images, the ones predict sees."""
    (val_out, y_val), c, u = val, cfg.conformal, cfg.unknown
    val_probs = softmax(val_out.logits[0], temperature)
    calibrated = conformal.calibrate(val_probs, y_val, c.method, c.alpha, c.raps_k_reg, c.raps_lambda)
    bank = np.zeros((0, val_out.features.shape[1]), dtype=np.float32)
    if len(bank_files):
        bank = _outputs(trained, data_root, bank_files, cfg.batch_size, False, "evaluate train bank").features
    detector = unknown.fit(
        u.detector, (val_out.logits[0], val_out.features), bank, temperature, u.tpr, u.knn_k, u.knn_dims
    )
    return _Trust(
        conformal=calibrated,
        detector=detector,
        sets=conformal.prediction_sets(softmax(test.logits[0], temperature), calibrated),
        unknown_scores=detector.scores(test.logits[0], test.features, temperature),
    )


def _trust_figures(
    trust: _Trust, y: np.ndarray, pred: np.ndarray, class_names: list[str], metrics: dict, details: dict
) -> None:
    """Add the test split's coverage, set sizes and unknown rate: headline scalars to `metrics`, the rest
    (per class, by set size) to `details`."""
    sets = conformal.set_figures(trust.sets, y, class_names)
    flagged = trust.detector.unknown(trust.unknown_scores)
    correct = pred == y
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


def _bank(detector: unknown.Detector, width: int) -> np.ndarray:
    """The kNN bank to ship (float16, unit rows); an empty (0, C) one for the detectors that need none."""
    return detector.bank if detector.bank is not None else np.zeros((0, width), dtype=np.float16)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load(data_root: Path, relative: str, data_config: dict) -> np.ndarray:
    path = Path(data_root) / relative
    try:
        return preprocess_file(path, data_config)
    except OSError as exc:
        raise PipelineError(
            f"{path}: cannot read this image listed in the splits file ({exc}); "
            "the data changed since ingest: re-run the pipeline from ingest (dvc repro)"
        ) from None


def _predictions_frame(
    test: pd.DataFrame, scores: _Scores, pred: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One row per test image. `confidence` and prob_* are raw softmax; `confidence_calibrated` is the
    predicted class's probability after temperature scaling, the figure `predict` reports. A prob_<class>
    column per class up to PROB_COLUMNS_MAX classes; above, the TOP_SHOWN most probable as top<k>_label and
    top<k>_prob (a thousand classes of 150,000 test images: 150 million figures, 1.5 GB of CSV)."""
    rows = np.arange(len(pred))
    frame = pd.DataFrame(
        {
            "path": test["path"],
            "label": test["label"],
            "pred": [class_names[i] for i in pred],
            "confidence": scores.probs[rows, pred],
        }
    )
    frame["correct"] = frame["label"] == frame["pred"]
    frame["confidence_calibrated"] = scores.probs_calibrated[rows, pred]
    if len(class_names) <= PROB_COLUMNS_MAX:
        columns = {f"prob_{name}": scores.probs[:, k] for k, name in enumerate(class_names)}
    else:
        top = np.argsort(-scores.probs, axis=1, kind="stable")[:, :TOP_SHOWN]
        names = np.asarray(class_names, dtype=object)
        columns = {}
        for k in range(TOP_SHOWN):
            columns[f"top{k + 1}_label"] = names[top[:, k]]
            columns[f"top{k + 1}_prob"] = scores.probs[rows, top[:, k]]
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


PROB_COLUMNS_MAX = 100
TOP_SHOWN = 5


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores (ties count for the true class)."""
    true_score = probs[np.arange(len(labels)), labels]
    rank = (probs > true_score[:, None]).sum(axis=1)
    return float(np.mean(rank < k))


def _figures(
    y: np.ndarray, pred: np.ndarray, scores: _Scores, class_names: list[str], top_k: int, bins: int
) -> tuple[dict, dict]:
    """(metrics, details): the headline scalars `dvc exp show` compares, and the rest, per class included."""
    k = min(top_k, len(class_names))
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),  # sklearn's definition, for all K labels
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "top_k_accuracy": top_k_accuracy(scores.probs, y, k),
        "log_loss": log_loss(scores.probs, y),
        "ece_before": reliability(scores.probs, y, bins).ece,
        "ece_after": reliability(scores.probs_calibrated, y, bins).ece,
    }
    details = {
        "n_test": len(y),
        "top_k": k,
        "f1_weighted": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "log_loss_calibrated": log_loss(scores.probs_calibrated, y),
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
    np.add.at(matrix, (y_test, scores.probs.argmax(axis=1)), 1)
    tiles = [
        report.Tile(
            _thumbnail(data_root / row.path),
            f"true: {row.label}\npred: {row.pred} ({row.confidence:.2f})",
        )
        for row in mistakes.itertuples(index=False)
    ]
    before, after = (reliability(probs, y_test, bins) for probs in (scores.probs, scores.probs_calibrated))
    return {
        "confusion_matrix": report.confusion_png(matrix, class_names),
        "reliability": report.reliability_png(before, after, details["temperature"]),
        "per_class_f1": report.per_class_f1_png(
            class_names, [details["per_class"][c]["f1"] for c in class_names]
        ),
        "mistakes": report.mistakes_png(tiles, "No mistakes on the test split"),
        "coverage": report.coverage_png(details["conformal"]),
    }


def _thumbnail(path: Path) -> Image.Image:
    image = open_rgb(path)
    image.thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE))
    return image


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

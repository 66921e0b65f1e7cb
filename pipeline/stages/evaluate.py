"""Stage: test-split metrics of the trained model, a temperature fitted on val, plots and report.html.

Images go through `pipeline.preprocess.preprocess_file`, the same torch-free function the ONNX `predict`
command uses, so evaluate's predictions are those a user gets from the export (test-time augmentation aside).
The model runs in fp32 on the train stage's device when the machine has a GPU (TF32 off), else on the CPU.
"""

from __future__ import annotations

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
from pipeline.data.splits import read_splits_table
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json, write_text
from pipeline.models import TrainedModel, load_trained
from pipeline.pages import report
from pipeline.preprocess import open_rgb, preprocess_file
from pipeline.progress import progress
from pipeline.stages import Stage, contracts
from pipeline.training.precision import configure_backends, evaluation_device, visible_gpus

STAGE = Stage(
    summary="Test-split metrics, calibration, plots and the run's report page.",
    params=("evaluate", "train.device"),
    deps=(
        "model",
        "splits",
        "curves_dir",
        "metrics:validate",
        "metrics:split",
        "details:validate",
        "details:split",
    ),
    outs=("predictions", "calibration", "reports:evaluate"),
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
    },
)

log = logging.getLogger(__name__)

_THUMBNAIL_SIDE = 160


@dataclass(frozen=True)
class _Scores:
    """Test-split scores: probabilities averaged over the TTA views, before and after temperature scaling."""

    probs: np.ndarray  # (N, K)
    probs_calibrated: np.ndarray  # (N, K)


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

    val_logits = _logits(trained, paths.data_root, val["path"], cfg.batch_size, False, "evaluate val")[0]
    fit = fit_temperature(val_logits, y_val)
    test_views = _logits(trained, paths.data_root, test["path"], cfg.batch_size, cfg.tta, "evaluate test")
    scores = _Scores(
        probs=np.mean([softmax(v) for v in test_views], axis=0),
        probs_calibrated=np.mean([softmax(v, fit.temperature) for v in test_views], axis=0),
    )

    pred = scores.probs.argmax(axis=1)
    predictions = _predictions_frame(test, scores, pred, class_names)
    metrics, details = _figures(y_test, pred, scores, class_names, cfg.top_k, cfg.calibration_bins)
    details["temperature"] = fit.temperature

    _write_report_folder(paths, cfg, trained, splits, predictions, metrics, details, scores, y_test)
    write_text(paths.predictions, predictions.to_csv(index=False))
    write_json(
        paths.calibration,
        {"temperature": fit.temperature, "val_nll_before": fit.nll_before, "val_nll_after": fit.nll_after},
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


def _logits(
    trained: TrainedModel, data_root: Path, files: pd.Series, batch_size: int, tta: bool, desc: str
) -> np.ndarray:
    """(V, N, K) fp32 logits of the model (in eval mode, on its device); V = 2 with TTA (the image and its
    horizontal flip), else 1."""
    model = trained.model
    device = next(model.parameters()).device
    views: list[list[np.ndarray]] = [[] for _ in range(2 if tta else 1)]
    files = list(files)
    with torch.inference_mode(), progress(desc, len(files), "img") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = np.stack([_load(data_root, f, trained.data_config) for f in chunk])
            batch = torch.from_numpy(images).to(device)
            views[0].append(model(batch).cpu().numpy())
            if tta:
                views[1].append(model(torch.flip(batch, dims=[3])).cpu().numpy())  # (B, C, H, W): flip W
            bar.update(len(chunk))
    return np.stack([np.concatenate(v) for v in views])


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
        test_metrics={key: value for key, value in {**metrics, **details}.items() if key != "per_class"},
        per_class=details["per_class"],
        mistakes=mistakes,
        figures=_plots(
            paths.data_root, cfg.calibration_bins, trained.class_names, mistakes, details, scores, y_test
        ),
        links=_page_links(paths),
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

"""Promotion gate, like for like: the champion's exported model and the new one both predict the current test
split (ONNX Runtime, FP32, no torch), and the new model replaces the champion only if, on the same images, it
is not less accurate by more than `orchestrate.promote_margin` and an exact McNemar test on the images where
exactly one of them is right does not show it less accurate (p >= `orchestrate.promote_alpha`).

Class changes: the comparison uses the test images of the classes both models know. Test images of added
classes cannot be scored for the champion: the new model's accuracy on them is reported, not gated.

Trust, reported and not gated: on the same images, each model's conformal coverage (the share whose true class
is in its prediction set) and the share it marks unknown, where its export carries the thresholds. Next to
the audit's drift figures (metrics/audit.json: the images added since the champion's training set against
it), the share of the test images among those added that each model marks unknown, and the share of the
other test images for comparison: drift the champion's detector sees shows there first.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import OrchestrateParams, PathsParams
from pipeline.data.labels import joined, parse
from pipeline.data.splits import read_splits_table
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, read_optional_json, write_json, write_text
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor
from pipeline.stats import PairedComparison, compare

CHAMPION_METRICS = "metrics.json"
GATE_PREDICTIONS = "predictions.csv"  # in reports_dir/promote: every test image and both models' top-1
# The metrics that travel with a champion: the test figures and what quantization/export measured.
_CARRIED_STAGES = ("evaluate", "quantize", "export")


@dataclass(frozen=True)
class Decision:
    """The gate's verdict and the figures it rests on, all measured on the same `images` test images."""

    promoted: bool
    reason: str
    metric: str  # top-1 accuracy, the one figure McNemar's test speaks about
    new: float | None  # the new model's accuracy on the compared images (None: there are none)
    champion: float | None  # the champion's on the same images; None when there is no champion to score
    images: int  # compared: the current test images of the classes both models know
    worse: int  # compared images only the champion gets right
    better: int  # compared images only the new model gets right
    p_value: float | None  # exact one-sided McNemar p-value for "the new model is less accurate"
    margin: float
    alpha: float
    test_sha256: str  # fingerprint of the compared images: sha256 of their sorted content hashes
    classes_added: list[str]
    classes_removed: list[str]
    new_on_added: float | None  # the new model's accuracy on the test images of the added classes
    # On the compared images; None where that model's export has no conformal threshold or detector.
    new_coverage: float | None = None
    champion_coverage: float | None = None
    new_unknown_rate: float | None = None
    champion_unknown_rate: float | None = None
    drift: dict[str, Any] | None = None  # drift_and_unknown(): the audit's drift next to the unknown shares


def decide(comparison: PairedComparison | None, margin: float, alpha: float) -> tuple[bool, str]:
    """(promoted, reason) from the paired comparison of the champion (reference) and the new model."""
    if comparison is None:
        return True, "no champion yet"
    if comparison.n == 0:
        return True, "the champion knows none of the test split's classes, so it cannot be scored"
    new, held, n = comparison.candidate_accuracy, comparison.reference_accuracy, comparison.n
    p, counts = comparison.p_worse, f"{comparison.worse} images lost, {comparison.better} won"
    if new < held - margin - 1e-12:  # float slack: a loss of exactly the margin passes
        return False, f"new accuracy {new:.4f} < champion {held:.4f} - margin {margin} on the same {n} images"
    if p < alpha:
        return False, f"McNemar: the new model is less accurate (p {p:.3g} < {alpha}; {counts} of {n})"
    return True, f"new accuracy {new:.4f} >= {held - margin:.4f} and McNemar p {p:.3g} >= {alpha} ({counts})"


def promote(paths: PathsParams, gate: OrchestrateParams, root: Path | str = ".") -> dict[str, Any]:
    """Score the new export and the champion's on the current test split; on success (by `gate`'s
    `promote_margin` and `promote_alpha`) copy the new model to `paths.champion_dir`.

    `paths` are relative to `root` (the project folder). Both models' top-1 per test image go to
    `reports_dir/promote/predictions.csv`. The champion folder receives the export folder, the trained model
    and `metrics.json` (model hash, the stages' metrics and this decision) in one atomic swap, so a reader
    never sees half a champion.

    Returns:
        The Decision as a dict.
    """
    root = Path(root)
    metrics = {stage: _read_metrics(root / paths.metrics(stage)) for stage in _CARRIED_STAGES}
    model_sha256 = _sha256(root / paths.model)
    test = _test_images(root / paths.splits)
    files = [root / paths.data_root / path for path in test["path"]]
    new_classes, separator = _score(
        test, "new", root / paths.export_dir, files, "run the pipeline (dvc repro) first"
    )
    current = _read_champion(root / paths.champion_dir / CHAMPION_METRICS)
    held_classes = None
    for column in _TRUST_COLUMNS:
        test[f"champion{column}"] = None
    held_dir = root / paths.champion_dir / paths.export_dir.name
    if current and _scored_files(held_dir) == _scored_files(root / paths.export_dir):
        held_classes = new_classes  # the same model: scoring it again is waste
        for column in _TRUST_COLUMNS:
            test[f"champion{column}"] = test[f"new{column}"]
    elif current:
        lost = f"restore it, or delete {paths.champion_dir} to promote the next model unconditionally"
        held_classes, _ = _score(test, "champion", held_dir, files, lost)
    gated = _gate(test, new_classes, held_classes, gate, separator)
    decision = replace(gated, drift=_drift(root, paths, test, current))
    write_text(root / paths.reports("promote") / GATE_PREDICTIONS, test.to_csv(index=False))
    if current.get("model_sha256") == model_sha256:
        return asdict(replace(decision, promoted=False, reason="already champion"))
    if decision.promoted:
        with atomic_dir(root / paths.champion_dir) as staging:
            shutil.copytree(root / paths.export_dir, staging / paths.export_dir.name)
            shutil.copy2(root / paths.model, staging / paths.model.name)
            if (root / paths.splits).is_file():  # what it was trained on: the audit's drift test reads it
                shutil.copy2(root / paths.splits, staging / paths.champion_splits.name)
            write_json(
                staging / CHAMPION_METRICS,
                {
                    "model_sha256": model_sha256,
                    "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "gate": asdict(decision),
                    "stages": metrics,
                },
            )
    return asdict(decision)


def _gate(
    test: pd.DataFrame,
    new_classes: list[str],
    held_classes: list[str] | None,
    gate: OrchestrateParams,
    separator: str = "",
) -> Decision:
    """The decision from both models' top-1 (columns `new`, `champion`) on the test rows whose classes the
    champion knows; label sets (`separator` not "") are right only when the whole set is."""
    held = new_classes if held_classes is None else held_classes
    added, removed = sorted(set(new_classes) - set(held)), sorted(set(held) - set(new_classes))
    known = set(held)
    shared = test[[set(parse(cell, separator)) <= known for cell in test["label"]]]
    comparison = None
    if held_classes is not None:
        comparison = compare(*(shared[column].to_numpy() for column in ("champion", "new", "label")))
    promoted, reason = decide(comparison, gate.promote_margin, gate.promote_alpha)
    if added or removed:
        reason += f"; classes added {added}, removed {removed}"
    scored = comparison if comparison is not None and comparison.n else None
    return Decision(
        promoted=promoted,
        reason=reason,
        metric="accuracy",
        new=_accuracy(shared, "new"),
        champion=_accuracy(shared, "champion") if scored else None,
        images=len(shared),
        worse=scored.worse if scored else 0,
        better=scored.better if scored else 0,
        p_value=scored.p_worse if scored else None,
        margin=gate.promote_margin,
        alpha=gate.promote_alpha,
        test_sha256=hashlib.sha256("\n".join(sorted(shared["sha256"])).encode()).hexdigest(),
        classes_added=added,
        classes_removed=removed,
        new_on_added=_accuracy(test[test["label"].isin(added)], "new"),
        new_coverage=_share(shared, "new_covered"),
        champion_coverage=_share(shared, "champion_covered") if scored else None,
        new_unknown_rate=_share(shared, "new_unknown"),
        champion_unknown_rate=_share(shared, "champion_unknown") if scored else None,
    )


def _accuracy(rows: pd.DataFrame, column: str) -> float | None:
    """Top-1 accuracy of `column` against `label`; None when there are no rows."""
    return float(np.mean(rows[column] == rows["label"])) if len(rows) else None


_DRIFT_KEYS = ("drifted", "drift_auc", "prior_shift")  # the audit's headline drift figures


def drift_and_unknown(
    test: pd.DataFrame, trained_on: set[str] | None, audit: dict[str, Any]
) -> dict[str, Any]:
    """The audit's drift figures next to the share of the test images added since the champion's training
    set that each model marks unknown, and the share of the other test images.

    Args: test with columns sha256, champion_unknown and new_unknown (booleans; None where a model has no
    detector or was not scored); trained_on the sha256 of every image in the champion's splits (None: no
    champion yet, so no image is new to it); audit the audit's metrics.
    Returns: {drifted, drift_auc, prior_shift, new_test_images, {champion,new}_unknown_{added,other}_images}.
    """
    figures: dict[str, Any] = {key: audit.get(key) for key in _DRIFT_KEYS}
    added = None if trained_on is None else ~test["sha256"].isin(trained_on)
    figures["new_test_images"] = None if added is None else int(added.sum())
    for model in ("champion", "new"):
        for part, rows in (("added", added), ("other", None if added is None else ~added)):
            share = None if rows is None else _share(test[rows], f"{model}_unknown")
            figures[f"{model}_unknown_{part}_images"] = share
    return figures


def drift_table(figures: dict[str, Any]) -> str:
    """drift_and_unknown()'s figures as a markdown table: drift and the unknown shares side by side."""

    def shown(value: Any) -> str:
        return "n/a" if value is None else f"{value:.1%}" if isinstance(value, float) else str(value)

    rows = [
        "| audit: drifted | old-vs-new AUC | class-prior shift | new test images | marked unknown by | "
        "among the new ones | among the others |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    drift = [str(figures.get(key)) for key in _DRIFT_KEYS] + [shown(figures.get("new_test_images"))]
    for model in ("champion", "new"):
        shares = [shown(figures.get(f"{model}_unknown_{part}_images")) for part in ("added", "other")]
        rows.append(f"| {' | '.join(drift)} | {model} model | {' | '.join(shares)} |")
        drift = ["", "", "", ""]  # the drift once, the unknown shares per model
    return "\n".join(rows)


def _drift(root: Path, paths: PathsParams, test: pd.DataFrame, champion: dict[str, Any]) -> dict[str, Any]:
    """drift_and_unknown() from the audit's metrics and the current champion's splits record (none: no image
    is new to a champion that does not exist, or whose record is lost)."""
    record = root / paths.champion_splits
    trained_on = set(read_splits_table(record)["sha256"]) if champion and record.is_file() else None
    return drift_and_unknown(test, trained_on, read_optional_json(root / paths.metrics("audit")) or {})


def _share(rows: pd.DataFrame, column: str) -> float | None:
    """Share of True in a column of booleans; None when there are no rows or the model had no threshold."""
    values = rows[column]
    return float(values.astype(bool).mean()) if len(values) and values.notna().all() else None


def _test_images(splits_csv: Path) -> pd.DataFrame:
    """The current test split (path, label, sha256), sorted by path."""
    table = read_splits_table(splits_csv)
    test = table.loc[table["split"] == "test", ["path", "label", "sha256"]]
    if test.empty:
        raise PipelineError(f"{splits_csv}: no test images to compare the models on; set split.test > 0")
    return test.sort_values("path", kind="stable").reset_index(drop=True)


_TRUST_COLUMNS = ("", "_covered", "_unknown")  # per model: top-1, true class in its set, marked unknown


def _score(
    test: pd.DataFrame, model: str, export_dir: Path, files: list[Path], fix: str
) -> tuple[list[str], str]:
    """Fill `test`'s columns <model> (top-1 class; a multilabel export's label set, written as the tables
    write one), <model>_covered (true class in its conformal set) and <model>_unknown (None where the export
    has no threshold) from the FP32 model of an export folder; return its class names and label separator
    ("" for one class per image). `fix` says what to do when the folder has no model."""
    if not (export_dir / rt.FP32_FILE).is_file():
        raise PipelineError(f"{export_dir}: no exported model to score; {fix}")
    predictor = Predictor(export_dir, precision="fp32")
    sets = predictor.conformal is not None
    predictions = predictor.predict(files, sets=sets)
    unreadable = [p.source for p in predictions if not p.ok]
    if unreadable:
        raise PipelineError(f"{unreadable[0]}: a test image is unreadable; re-run the pipeline (dvc repro)")
    multilabel = predictor.thresholds is not None
    test[model] = [
        joined((label for label, _ in p.labels), predictor.separator) if multilabel else p.labels[0][0]
        for p in predictions
    ]
    test[f"{model}_covered"] = [
        label in p.prediction_set if sets else None
        for p, label in zip(predictions, test["label"], strict=True)
    ]
    test[f"{model}_unknown"] = [p.unknown for p in predictions]
    return predictor.class_names, predictor.separator if multilabel else ""


def _scored_files(export_dir: Path) -> list[str] | None:
    """sha256 of what `_top1` reads from an export folder (model, labels, preprocessing); None when any is
    missing. Equal fingerprints give equal predictions."""
    files = [export_dir / name for name in (rt.FP32_FILE, rt.LABELS_FILE, rt.PREPROCESS_FILE)]
    return [_sha256(file) for file in files] if all(file.is_file() for file in files) else None


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{path}: metrics missing; run the pipeline (dvc repro) before the gate")
    return read_json(path)


def _read_champion(path: Path) -> dict[str, Any]:
    """The current champion's record, or {} when there is none (a folder without a record is replaced)."""
    return read_optional_json(path) or {}


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise PipelineError(f"{path}: trained model missing; run the pipeline (dvc repro) before the gate")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Promotion gate, like for like: the champion's exported model and the new one both predict the current test
split (ONNX Runtime, FP32, no torch), and the new model replaces the champion only if, on the same images, it
is not less accurate by more than `orchestrate.promote_margin` and an exact McNemar test on the images where
exactly one of them is right does not show it less accurate (p >= `orchestrate.promote_alpha`).

Label sets (`orchestrate.promote_metric: map`, the default for them): the figure is mean average precision
(macro over the labels both models know that have a test positive) and the test a paired bootstrap of the
same images (`stats.compare_map`): the new mAP must be at least the champion's minus the margin, and the
resamples must not show it lower (p >= alpha). `accuracy` counts an image right when its whole set is.

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
from pipeline.data.labels import LabelSets, joined, multi_hot, parse
from pipeline.data.splits import read_splits_table
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, read_optional_json, write_json, write_text
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor
from pipeline.stats import PairedComparison, PairedMap, compare, compare_map, mean_average_precision

CHAMPION_METRICS = "metrics.json"
GATE = "promote"  # the gate's name in the paths catalogue: metrics/promote.json, reports/promote/
GATE_PREDICTIONS = "predictions.csv"  # in reports_dir/promote: every test image and both models' top-1
# The metrics that travel with a champion: the test figures and what quantization/export measured.
_CARRIED_STAGES = ("evaluate", "quantize", "export")


@dataclass(frozen=True)
class Decision:
    """The gate's verdict and the figures it rests on, all measured on the same `images` test images."""

    promoted: bool
    reason: str
    metric: str  # accuracy (top-1 or the whole label set; McNemar's test) or mAP (a paired bootstrap)
    new: float | None  # the new model's figure on the compared images (None: there are none)
    champion: float | None  # the champion's on the same images; None when there is no champion to score
    images: int  # compared: the current test images of the classes both models know
    worse: int  # compared images only the champion gets right (top-1, or the whole set)
    better: int  # compared images only the new model gets right
    p_value: float | None  # one-sided p-value of `metric`'s test for "the new model is worse"
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


def decide(comparison: PairedComparison | PairedMap | None, margin: float, alpha: float) -> tuple[bool, str]:
    """(promoted, reason) from the paired comparison of the champion (reference) and the new model: of
    accuracies (McNemar) or of mAPs (paired bootstrap)."""
    if comparison is None:
        return True, "no champion yet"
    if comparison.n == 0:
        return True, "the champion knows none of the test split's classes, so it cannot be scored"
    n, p = comparison.n, comparison.p_worse
    if isinstance(comparison, PairedMap):
        figure, test = "mAP", "paired bootstrap"
        new, held = comparison.candidate_map, comparison.reference_map
        counts = f"difference {comparison.delta_low:+.4f} to {comparison.delta_high:+.4f} over the resamples"
        worse = "the new model's mAP is lower"
    else:
        figure, test = "accuracy", "McNemar"
        new, held = comparison.candidate_accuracy, comparison.reference_accuracy
        counts = f"{comparison.worse} images lost, {comparison.better} won"
        worse = "the new model is less accurate"
    if new < held - margin - 1e-12:  # float slack: a loss of exactly the margin passes
        return False, f"new {figure} {new:.4f} < champion {held:.4f} - margin {margin} on the same {n} images"
    if p < alpha:
        return False, f"{test}: {worse} (p {p:.3g} < {alpha}; {counts}, {n} images)"
    return True, f"new {figure} {new:.4f} >= {held - margin:.4f} and {test} p {p:.3g} >= {alpha} ({counts})"


def promote(
    paths: PathsParams, gate: OrchestrateParams, root: Path | str = ".", replace_champion: bool = True
) -> dict[str, Any]:
    """Score the new export and the champion's on the current test split; on success (by `gate`'s
    `promote_margin` and `promote_alpha`) copy the new model to `paths.champion_dir`, unless not
    `replace_champion` (a sweep's points: each is judged, the sweep promotes at most one).

    `paths` are relative to `root` (the project folder). Both models' top-1 per test image go to
    `reports_dir/promote/predictions.csv`. The champion folder receives the export folder, the trained model
    and `metrics.json` (model hash, the stages' metrics and this decision) in one atomic swap, so a reader
    never sees half a champion.

    Returns:
        The Decision as a dict, also written to `paths.metrics("promote")`.
    """
    root = Path(root)
    metrics = {stage: _read_metrics(root / paths.metrics(stage)) for stage in _CARRIED_STAGES}
    model_sha256 = _sha256(root / paths.model)
    test = _test_images(root / paths.splits)
    files = [root / paths.data_root / path for path in test["path"]]
    new = _score(test, "new", root / paths.export_dir, files, "run the pipeline (dvc repro) first")
    current = _read_champion(root / paths.champion_dir / CHAMPION_METRICS)
    held = None
    for column in _TRUST_COLUMNS:
        test[f"champion{column}"] = None
    held_dir = root / paths.champion_dir / paths.export_dir.name
    if current and _scored_files(held_dir) == _scored_files(root / paths.export_dir):
        held = new  # the same model: scoring it again is waste
        for column in _TRUST_COLUMNS:
            test[f"champion{column}"] = test[f"new{column}"]
    elif current:
        lost = f"restore it, or delete {paths.champion_dir} to promote the next model unconditionally"
        held = _score(test, "champion", held_dir, files, lost)
    gated = _gate(test, new, held, gate)
    decision = replace(gated, drift=_drift(root, paths, test, current))
    write_text(root / paths.reports(GATE) / GATE_PREDICTIONS, test.to_csv(index=False))
    if current.get("model_sha256") == model_sha256:
        decision = replace(decision, promoted=False, reason="already champion")
    write_json(root / paths.metrics(GATE), asdict(decision))  # a saved experiment carries it
    if decision.promoted and replace_champion:
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


def _gate(test: pd.DataFrame, new: _Scored, held: _Scored | None, gate: OrchestrateParams) -> Decision:
    """The decision on the test rows whose classes the champion knows, from both models' answers (columns
    `new`, `champion`: right only when the whole label set is) or their per-label scores (`map`)."""
    known = set((held or new).names)
    added, removed = sorted(set(new.names) - known), sorted(known - set(new.names))
    rows = np.array([set(parse(cell, new.separator)) <= known for cell in test["label"]], dtype=bool)
    shared = test[rows]
    by_map = gate.promote_metric == "map" or (gate.promote_metric == "auto" and bool(new.separator))
    answers = None
    if held is not None:
        answers = compare(*(shared[column].to_numpy() for column in ("champion", "new", "label")))
    scored = answers if answers is not None and answers.n else None
    if by_map:
        names = [name for name in new.names if name in known]
        truth = _truth(shared["label"], new.separator, names)
        comparison: PairedComparison | PairedMap | None = None
        if held is None:
            figures = mean_average_precision(truth, _columns(new, names, rows)), None
        else:
            comparison = compare_map(
                _columns(held, names, rows), _columns(new, names, rows), truth, gate.promote_alpha
            )
            figures = comparison.candidate_map, comparison.reference_map if scored else None
    else:
        comparison = answers
        figures = _accuracy(shared, "new"), _accuracy(shared, "champion") if scored else None
    promoted, reason = decide(comparison, gate.promote_margin, gate.promote_alpha)
    if added or removed:
        reason += f"; classes added {added}, removed {removed}"
    return Decision(
        promoted=promoted,
        reason=reason,
        metric="mAP" if by_map else "accuracy",
        new=figures[0],
        champion=figures[1],
        images=len(shared),
        worse=scored.worse if scored else 0,
        better=scored.better if scored else 0,
        p_value=comparison.p_worse if scored and comparison is not None else None,
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


def _truth(labels: pd.Series, separator: str, names: list[str]) -> np.ndarray:
    """(N, len(names)) bool: which of `names` each label cell holds (other labels are left out)."""
    pairs = LabelSets(separator).exploded(labels.reset_index(drop=True))
    return multi_hot(pairs[pairs["label"].isin(names)], len(labels), names, bool)


def _columns(model: _Scored, names: list[str], rows: np.ndarray) -> np.ndarray:
    """The model's probabilities of `names` (in that order) on the chosen test rows."""
    return model.probabilities[rows][:, [model.names.index(name) for name in names]]


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


@dataclass(frozen=True)
class _Scored:
    """One model's view of the test images: its class names, how it writes a label set ("" for one class per
    image) and every image's probability of each class, (N, K) in the names' order."""

    names: list[str]
    separator: str
    probabilities: np.ndarray


def _score(test: pd.DataFrame, model: str, export_dir: Path, files: list[Path], fix: str) -> _Scored:
    """Fill `test`'s columns <model> (top-1 class; a multilabel export's label set, written as the tables
    write one), <model>_covered (true class in its conformal set) and <model>_unknown (None where the export
    has no threshold) from the FP32 model of an export folder. `fix` says what to do when the folder has no
    model."""
    if not (export_dir / rt.FP32_FILE).is_file():
        raise PipelineError(f"{export_dir}: no exported model to score; {fix}")
    predictor = Predictor(export_dir, precision="fp32")
    sets = predictor.conformal is not None
    predictions = predictor.predict(files, sets=sets, scores=True)
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
    probabilities = np.stack([p.scores for p in predictions]).astype(np.float32)
    return _Scored(predictor.class_names, predictor.separator if multilabel else "", probabilities)


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

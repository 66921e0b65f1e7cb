"""Promotion gate, like for like: the champion's exported model and the new one both predict the current test
split (ONNX Runtime, FP32, no torch), and the new model replaces the champion only if, on the same images, it
is not less accurate by more than `orchestrate.promote_margin` and an exact McNemar test on the images where
exactly one of them is right does not show it less accurate (p >= `orchestrate.promote_alpha`).

Class changes: the comparison uses the test images of the classes both models know. Test images of added
classes cannot be scored for the champion: the new model's accuracy on them is reported, not gated.
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
    new_classes, test["new"] = _top1(root / paths.export_dir, files, "run the pipeline (dvc repro) first")
    current = _read_champion(root / paths.champion_dir / CHAMPION_METRICS)
    held_classes, test["champion"] = None, None
    held_dir = root / paths.champion_dir / paths.export_dir.name
    if current and _scored_files(held_dir) == _scored_files(root / paths.export_dir):
        held_classes, test["champion"] = new_classes, test["new"]  # the same model: scoring it again is waste
    elif current:
        lost = f"restore it, or delete {paths.champion_dir} to promote the next model unconditionally"
        held_classes, test["champion"] = _top1(held_dir, files, lost)
    decision = _gate(test, new_classes, held_classes, gate)
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
    test: pd.DataFrame, new_classes: list[str], held_classes: list[str] | None, gate: OrchestrateParams
) -> Decision:
    """The decision from both models' top-1 (columns `new`, `champion`) on the test rows."""
    held = new_classes if held_classes is None else held_classes
    added, removed = sorted(set(new_classes) - set(held)), sorted(set(held) - set(new_classes))
    shared = test[test["label"].isin(held)]
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
    )


def _accuracy(rows: pd.DataFrame, column: str) -> float | None:
    """Top-1 accuracy of `column` against `label`; None when there are no rows."""
    return float(np.mean(rows[column] == rows["label"])) if len(rows) else None


def _test_images(splits_csv: Path) -> pd.DataFrame:
    """The current test split (path, label, sha256), sorted by path."""
    table = read_splits_table(splits_csv)
    test = table.loc[table["split"] == "test", ["path", "label", "sha256"]]
    if test.empty:
        raise PipelineError(f"{splits_csv}: no test images to compare the models on; set split.test > 0")
    return test.sort_values("path", kind="stable").reset_index(drop=True)


def _top1(export_dir: Path, files: list[Path], fix: str) -> tuple[list[str], list[str]]:
    """(class names, top-1 class per file) of the FP32 model of an export folder; `fix` says what to do
    when the folder has no model."""
    if not (export_dir / rt.FP32_FILE).is_file():
        raise PipelineError(f"{export_dir}: no exported model to score; {fix}")
    predictor = Predictor(export_dir, precision="fp32")
    predictions = predictor.predict(files)
    unreadable = [p.source for p in predictions if not p.ok]
    if unreadable:
        raise PipelineError(f"{unreadable[0]}: a test image is unreadable; re-run the pipeline (dvc repro)")
    return predictor.class_names, [p.labels[0][0] for p in predictions]


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

"""Promotion quality gate: a new model replaces the champion only if its test metric is not worse by more
than `orchestrate.promote_tolerance`, so a noisy retrain cannot silently ship a regression."""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, read_optional_json, write_json

CHAMPION_METRICS = "metrics.json"
CHAMPION_SPLITS = (
    "splits.csv"  # the champion's splits table: the audit compares new images with its train split
)
# The metrics that travel with a champion: the test figures and what quantization/export measured.
_CARRIED_STAGES = ("evaluate", "quantize", "export")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    metric: str
    new: float
    champion: float | None
    tolerance: float
    reason: str


def decide(metric: str, new: float, champion: float | None, tolerance: float) -> Decision:
    """Promote when there is no champion or `new >= champion - tolerance` (higher is better)."""
    if math.isnan(new):
        return Decision(False, metric, new, champion, tolerance, f"new {metric} is NaN")
    if champion is None:
        return Decision(True, metric, new, None, tolerance, "no champion yet")
    floor = champion - tolerance
    if new >= floor:
        return Decision(True, metric, new, champion, tolerance, f"new {metric} {new:.4f} >= {floor:.4f}")
    return Decision(False, metric, new, champion, tolerance, f"new {metric} {new:.4f} < {floor:.4f}")


def promote(params: Params, root: Path | str = ".") -> dict[str, Any]:
    """Apply the gate to the pipeline's current model; on success copy it to `paths.champion_dir`.

    Paths in `params` are relative to `root` (the project folder). The champion folder receives the export
    folder, the trained model and `metrics.json` (metric, value, model hash and the stages' metrics) in one
    atomic swap, so a reader never sees half a champion.

    Returns:
        The decision as a dict: promoted, metric, new, champion, tolerance, reason.
    """
    root = Path(root)
    paths, gate = params.paths, params.orchestrate
    metrics = {stage: _read_metrics(root / paths.metrics(stage)) for stage in _CARRIED_STAGES}
    if gate.promote_metric not in metrics["evaluate"]:
        raise PipelineError(
            f"{paths.metrics('evaluate')}: no metric {gate.promote_metric!r}; set orchestrate.promote_metric "
            f"to one of {sorted(metrics['evaluate'])}"
        )
    new = float(metrics["evaluate"][gate.promote_metric])
    model_sha256 = _sha256(root / paths.model)
    current = _read_champion(root / paths.champion_dir / CHAMPION_METRICS)
    # Compare on the champion's own evaluate figures, so changing promote_metric compares like with like.
    held = current.get("stages", {}).get("evaluate", {}).get(gate.promote_metric)
    held = None if held is None else float(held)
    if current.get("model_sha256") == model_sha256:
        decision = Decision(False, gate.promote_metric, new, held, gate.promote_tolerance, "already champion")
        return asdict(decision)
    decision = decide(gate.promote_metric, new, held, gate.promote_tolerance)
    if decision.promoted:
        with atomic_dir(root / paths.champion_dir) as staging:
            shutil.copytree(root / paths.export_dir, staging / paths.export_dir.name)
            shutil.copy2(root / paths.model, staging / paths.model.name)
            if (root / paths.splits).is_file():  # what it was trained on: the audit's drift test reads it
                shutil.copy2(root / paths.splits, staging / CHAMPION_SPLITS)
            write_json(
                staging / CHAMPION_METRICS,
                {
                    "metric": gate.promote_metric,
                    "value": new,
                    "model_sha256": model_sha256,
                    "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "stages": metrics,
                },
            )
    return asdict(decision)


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

"""The tables of images by path: validated.csv (what split and audit read) and splits.csv (what split writes),
their one reader each, in pandas alone (no torch: ONNX-side code uses it).

Every cell is read as text, so a class named NA, None or null keeps its name: pandas' defaults would read
those as missing values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.labels import SINGLE, LabelSets, multi_hot
from pipeline.errors import PipelineError

SPLITS_COLUMNS = ("path", "label", "split", "sha256")
VALIDATED_COLUMNS = (*SPLITS_COLUMNS, "width", "height")  # of the manifest's columns, those read downstream


def read_validated(path: Path, purpose: str) -> pd.DataFrame:
    """validate's table of usable images, every column text, sorted by path. `purpose` ("split", "audit")
    completes the message when there is nothing to work on.

    Raises:
        PipelineError: the file or one of VALIDATED_COLUMNS is missing, or it has no rows.
    """
    if not path.is_file():
        raise PipelineError(f"paths.validated: {path} not found; run `python -m pipeline validate` first")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in VALIDATED_COLUMNS if column not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing columns {missing}; re-run `python -m pipeline validate`")
    if table.empty:
        raise PipelineError(
            f"{path}: no usable images to {purpose}; check the quarantine written by validate"
        )
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def read_splits_table(
    splits_csv: Path | str, class_names: Sequence[str] | None = None, model_path: Path | None = None
) -> pd.DataFrame:
    """The table in file order, every column a string. With `class_names` (the classes of the model at
    `model_path`) every label must be one of them.

    Raises:
        PipelineError: the file or one of SPLITS_COLUMNS is missing, or a label is not in `class_names`.
    """
    if not Path(splits_csv).is_file():
        raise PipelineError(
            f"{splits_csv}: splits table not found; run the split stage first (dvc repro split)"
        )
    table = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    missing = [c for c in SPLITS_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(
            f"{splits_csv}: missing columns {missing}; re-run the split stage (dvc repro split)"
        )
    if class_names is not None:
        _check_labels(splits_csv, table["label"], class_names, model_path)
    return table


def read_split(
    splits_csv: Path | str, data_root: Path, split: str, class_names: Sequence[str], sets: LabelSets = SINGLE
) -> tuple[list[Path], np.ndarray]:
    """Image paths (sorted) and class indices of one split, for a model trained on `class_names`; a
    multilabel task's (`sets`): (N, K) bool rows, which of the model's labels each image has."""
    table = read_splits_table(splits_csv)
    part = table[table["split"] == split].sort_values("path", kind="stable").reset_index(drop=True)
    if part.empty:
        raise PipelineError(
            f"{splits_csv}: no '{split}' rows; check split.{split} in params.yaml, re-run split"
        )
    pairs = sets.exploded(part["label"])
    _check_labels(splits_csv, pairs["label"], class_names)
    if sets.multilabel:
        labels = multi_hot(pairs, len(part), class_names)
    else:
        index = {name: i for i, name in enumerate(class_names)}
        labels = pairs["label"].map(index).to_numpy(dtype=np.int64)
    return [Path(data_root) / path for path in part["path"]], labels


def _check_labels(
    splits_csv: Path | str, labels: Iterable[str], class_names: Sequence[str], model_path: Path | None = None
) -> None:
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        model = f"the model {model_path}" if model_path else "the trained model"
        raise PipelineError(
            f"{splits_csv}: labels {unknown[:10]} are not classes of {model} ({list(class_names)[:10]}); "
            "the model is older than the splits: re-run the train stage (dvc repro train)"
        )

"""splits.csv has one reader (pipeline.data.splits) under the train loader and the ONNX-side stages: class
names that pandas would take for missing values survive it, and bad tables fail with one clear line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.loader import read_splits
from pipeline.data.splits import SPLITS_COLUMNS, read_split, read_splits_table
from pipeline.errors import PipelineError

NA_LIKE = ["NA", "None", "null"]  # pandas' read_csv takes each of them for a missing value by default


def _write(path: Path, rows: list[tuple[str, str, str]], columns=SPLITS_COLUMNS) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for file, label, split in rows:
            writer.writerow([file, label, split, f"sha-{file}"][: len(columns)])
    return path


@pytest.fixture
def na_splits(tmp_path) -> Path:
    # Unsorted on purpose: read_split sorts by path, the train loader keeps the file's order.
    rows = [
        (f"{label}/{i}.png", label, split)
        for split in ("train", "val", "test")
        for label in reversed(NA_LIKE)
        for i in (1, 0)
    ]
    return _write(tmp_path / "splits.csv", rows)


def test_classes_named_like_missing_values_survive_every_reader(na_splits, tmp_path):
    table = read_splits_table(na_splits, class_names=NA_LIKE)
    assert sorted(set(table["label"])) == NA_LIKE and list(table.columns) == list(SPLITS_COLUMNS)

    splits = read_splits(na_splits, tmp_path)  # the train stage's reader
    assert splits.class_names == NA_LIKE
    assert [Path(p).parent.name for p in splits.train.paths] == ["null", "null", "None", "None", "NA", "NA"]
    assert splits.train.labels.tolist() == [2, 2, 1, 1, 0, 0] and splits.val.labels.tolist() == [
        2,
        2,
        1,
        1,
        0,
        0,
    ]
    assert splits.train.identities[0] == "null/1.png:sha-null/1.png"

    for split in ("train", "val", "test"):  # quantize's, export's and the benchmarks' reader
        paths, labels = read_split(na_splits, tmp_path, split, NA_LIKE)
        assert [p.relative_to(tmp_path).as_posix() for p in paths] == sorted(
            f"{c}/{i}.png" for c in NA_LIKE for i in (0, 1)
        )
        assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_bad_tables_fail_with_one_line_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.csv: splits table not found; run the split stage"):
        read_splits_table(tmp_path / "nope.csv")
    no_sha = _write(tmp_path / "no_sha.csv", [("a/1.png", "a", "train")], columns=("path", "label", "split"))
    with pytest.raises(PipelineError, match=r"no_sha\.csv: missing columns \['sha256'\]; re-run the split"):
        read_split(no_sha, tmp_path, "train", ["a"])
    stale = _write(tmp_path / "stale.csv", [("a/1.png", "a", "train"), ("b/1.png", "b", "test")])
    with pytest.raises(PipelineError, match=r"stale\.csv: labels \['b'\] are not classes of the model m\.pt"):
        read_splits_table(stale, class_names=["a"], model_path=Path("m.pt"))
    with pytest.raises(PipelineError, match=r"labels \['b'\] are not classes of the trained model"):
        read_split(stale, tmp_path, "test", ["a"])
    assert read_split(stale, tmp_path, "train", ["a"])[1].tolist() == [0]  # only the split read is checked
    with pytest.raises(PipelineError, match=r"stale\.csv: no 'val' rows"):
        read_split(stale, tmp_path, "val", ["a"])


def test_the_reader_and_the_predict_path_import_no_torch():
    code = "import sys, pipeline.data.splits, pipeline.serving.predict; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

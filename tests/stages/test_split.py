"""Split: stratification, duplicates kept together, determinism, given splits and carving, tiny classes."""

from __future__ import annotations

import hashlib
import logging

import pandas as pd
import pytest
from helpers import assert_headline_metrics, data_stage_params

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import split
from pipeline.stages.split import _allocate


def _rows(label: str, n: int, given: str = "", copies: int = 1) -> list[dict]:
    """n distinct images of a class (each present `copies` times under different names)."""
    rows = []
    for i in range(n):
        sha = hashlib.sha256(f"{label}-{given}-{i}".encode()).hexdigest()
        for c in range(copies):
            path = f"{given + '/' if given else ''}{label}/{i:03d}_{c}.png"
            rows.append(
                {"path": path, "label": label, "split": given, "sha256": sha, "width": 32, "height": 32}
            )
    return rows


def _params(tmp_path, rows: list[dict], **sections):
    params = data_stage_params(tmp_path, tmp_path / "data", **sections)
    params.paths.validated.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(params.paths.validated, index=False)
    return params


def _splits(params) -> pd.DataFrame:
    return pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False)


def test_stratified_split_gives_every_class_its_share_of_every_split(tmp_path):
    params = _params(tmp_path, _rows("a", 40) + _rows("b", 20) + _rows("c", 10))

    summary = split.run(params)

    table = _splits(params)
    assert list(table.columns) == ["path", "label", "split", "sha256", "width", "height"]
    assert list(table["path"]) == sorted(table["path"])
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    for label, n in (("a", 40), ("b", 20), ("c", 10)):
        for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(counts.at[label, name] - fraction * n) <= 1, (label, name)
    metrics = read_json(params.paths.metrics("split"))
    assert set(metrics) == {"strategy", "images"}
    assert_headline_metrics(metrics, "abc")
    details = read_json(params.paths.details("split"))
    assert details["classes"] == ["a", "b", "c"] and details["groups"] == 70
    assert details["per_class"]["val"] == {label: int(counts.at[label, "val"]) for label in "abc"}
    assert (
        summary == {"strategy": "stratified", **metrics["images"]} and sum(metrics["images"].values()) == 70
    )


def test_identical_files_always_land_in_the_same_split(tmp_path):
    params = _params(tmp_path, _rows("a", 12, copies=3) + _rows("b", 12, copies=2))
    split.run(params)
    table = _splits(params)
    assert (table.groupby("sha256")["split"].nunique() == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    rows = _rows("a", 30) + _rows("b", 30)
    first = _params(tmp_path, rows)
    split.run(first)
    once = first.paths.splits.read_bytes()
    split.run(first)
    assert first.paths.splits.read_bytes() == once
    reseeded = _params(tmp_path, rows, base={"seed": 7})
    split.run(reseeded)
    assert reseeded.paths.splits.read_bytes() != once


def test_a_class_too_small_for_every_split_fails_or_goes_to_train(tmp_path, caplog):
    rows = _rows("a", 20) + _rows("tiny", 2, copies=2)
    with pytest.raises(PipelineError) as caught:
        split.run(_params(tmp_path, rows))
    assert (
        "classes ['tiny' (2 distinct images)] are too small to appear in each of ['train', 'val', 'test']"
        in str(caught.value)
    )
    assert "split.small_class: warning" in str(caught.value)

    params = _params(tmp_path, rows, split={"small_class": "warning"})
    with caplog.at_level(logging.WARNING):
        split.run(params)
    assert "'tiny' (2 distinct images)" in caplog.text
    table = _splits(params)
    assert set(table.loc[table["label"] == "tiny", "split"]) == {"train"}


def test_two_way_split_needs_only_two_images_per_class(tmp_path):
    params = _params(tmp_path, _rows("a", 2) + _rows("b", 5), split={"train": 0.8, "val": 0.2, "test": 0.0})
    split.run(params)
    table = _splits(params)
    assert set(table["split"]) == {"train", "val"}
    assert set(table.loc[table["label"] == "a", "split"]) == {"train", "val"}


def _presplit_rows(test: bool) -> list[dict]:
    rows = []
    for label in ("a", "b"):
        rows += (
            _rows(label, 14, "train") + _rows(label, 10, "val") + (_rows(label, 3, "test") if test else [])
        )
    return rows


def test_given_splits_are_kept(tmp_path):
    params = _params(tmp_path, _presplit_rows(test=True))
    assert split.run(params)["strategy"] == "given"
    table = _splits(params)
    assert (table["split"] == table["path"].str.split("/").str[0]).all()


def test_carving_test_out_of_val_moves_a_stratified_fraction_of_val(tmp_path):
    params = _params(
        tmp_path, _presplit_rows(test=False), split={"carve_test_from": "val", "test": 0.2, "val": 0.1}
    )

    assert split.run(params)["strategy"] == "given, test carved from val"

    table = _splits(params)
    given = table["path"].str.split("/").str[0]
    assert (table.loc[given == "train", "split"] == "train").all()
    moved = table[(given == "val") & (table["split"] == "test")]
    assert moved["label"].value_counts().to_dict() == {"a": 2, "b": 2}  # 20% of each class's 10 val images


def test_given_splits_can_be_ignored(tmp_path):
    params = _params(tmp_path, _presplit_rows(test=True), split={"keep_given_splits": False})
    assert split.run(params)["strategy"] == "stratified"
    table = _splits(params)
    assert (table["split"] != table["path"].str.split("/").str[0]).any()


def test_partly_given_splits_are_an_error(tmp_path):
    params = _params(tmp_path, _rows("a", 5, "train") + _rows("a", 5))
    with pytest.raises(
        PipelineError, match=r"5 images have no given split .* split.keep_given_splits: false"
    ):
        split.run(params)


def test_a_class_missing_from_a_given_split_is_reported(tmp_path):
    rows = _rows("a", 5, "train") + _rows("a", 2, "val") + _rows("b", 5, "train")
    with pytest.raises(PipelineError, match=r"classes \['b' \(not in \['val'\]\)\] are too small"):
        split.run(_params(tmp_path, rows))


def test_missing_validated_table_says_to_run_validate(tmp_path):
    with pytest.raises(
        PipelineError, match=r"paths.validated: .* not found; run `python -m pipeline validate`"
    ):
        split.run(data_stage_params(tmp_path, tmp_path))


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (3, (0.7, 0.15, 0.15), (1, 1, 1)),
        (20, (0.7, 0.15, 0.15), (14, 3, 3)),
        (4, (0.1, 0.45, 0.45), (1, 2, 1)),
        (7, (0.8, 0.2, 0.0), (6, 1, 0)),
    ],
)
def test_allocation_sums_up_and_gives_every_nonzero_split_one(n, fractions, expected):
    counts = _allocate(n, dict(zip(("train", "val", "test"), fractions, strict=True)))
    assert tuple(counts.values()) == expected

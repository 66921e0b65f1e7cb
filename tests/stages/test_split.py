"""Split: stratification, duplicates kept together, determinism, given splits and carving, tiny classes."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import assert_headline_metrics, data_stage_params

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import split
from pipeline.stages.split import _allocate, stable_position


def _rows(label: str, n: int, given: str = "", copies: int = 1, start: int = 0) -> list[dict]:
    """n distinct images of a class (each present `copies` times under different names), numbered from
    `start`."""
    rows = []
    for i in range(start, start + n):
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
    params = _params(
        tmp_path, _rows("a", 40) + _rows("b", 20) + _rows("c", 10), split={"method": "stratified"}
    )

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
    carve = {"carve_test_from": "val", "test": 0.2, "val": 0.1, "method": "stratified"}
    params = _params(tmp_path, _presplit_rows(test=False), split=carve)

    assert split.run(params)["strategy"] == "given, test carved from val (stratified)"

    table = _splits(params)
    given = table["path"].str.split("/").str[0]
    assert (table.loc[given == "train", "split"] == "train").all()
    moved = table[(given == "val") & (table["split"] == "test")]
    assert moved["label"].value_counts().to_dict() == {"a": 2, "b": 2}  # 20% of each class's 10 val images


def test_given_splits_can_be_ignored(tmp_path):
    params = _params(tmp_path, _presplit_rows(test=True), split={"keep_given_splits": False})
    assert split.run(params)["strategy"] == "stable"
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


# Stable splits: a file's split is a function of its bytes and the seed.

_Z_999 = 3.2905  # two-sided 99.9% normal quantile


def _share_bound(n: int, fraction: float) -> float:
    """The stated bound: with 99.9% probability a class of n distinct images gets a share of a split within
    this of the split's fraction (normal approximation of Binomial(n, fraction)), plus one filler image."""
    return _Z_999 * math.sqrt(fraction * (1 - fraction) / n) + 1 / n


def _split_of(params) -> dict[str, str]:
    table = _splits(params)
    return dict(zip(table["path"], table["split"], strict=True))


def test_ten_percent_more_images_move_no_existing_image(tmp_path):
    rows = _rows("a", 300) + _rows("b", 120, copies=2) + _rows("c", 60)
    before = _params(tmp_path / "before", rows)
    split.run(before)
    assert read_json(before.paths.details("split"))["placed_by_rank"] == {}  # every image placed by hash

    new_rows = _rows("a", 30, start=300) + _rows("b", 12, copies=2, start=120) + _rows("c", 6, start=60)
    grown = rows + new_rows
    after = _params(tmp_path / "after", grown)
    split.run(after)

    old, new = _split_of(before), _split_of(after)
    assert len(new) == len(old) + len(new_rows) == len(old) + 60
    moved = {path: (was, new[path]) for path, was in old.items() if new[path] != was}
    assert moved == {}
    assert {new[row["path"]] for row in new_rows} == {"train", "val", "test"}  # the new images are split too


def test_removing_and_relabelling_other_images_moves_no_image(tmp_path):
    rows = _rows("a", 200) + _rows("b", 200)
    first = _params(tmp_path / "first", rows)
    split.run(first)
    changed = [row for i, row in enumerate(rows) if i % 10 != 0]  # a tenth removed
    for row in changed[::7]:
        row["label"] = "b" if row["label"] == "a" else "a"  # and some relabelled
    second = _params(tmp_path / "second", changed)
    split.run(second)
    old, new = _split_of(first), _split_of(second)
    assert {path: new[path] for path in new} == {path: old[path] for path in new}


def test_stable_split_is_the_hash_position_against_the_cumulative_fractions(tmp_path):
    params = _params(tmp_path, _rows("a", 200))
    split.run(params)
    for _, row in _splits(params).iterrows():
        position = stable_position(row["sha256"], 42)
        expected = "test" if position < 0.15 else "val" if position < 0.30 else "train"
        assert row["split"] == expected, (row["path"], position)


@pytest.mark.parametrize("n", [20, 100, 1000])
def test_stable_shares_stay_within_the_stated_bound(n):
    """Over 300 seeds, a class's share of each split leaves the 99.9% bound about 0.1% of the time."""
    shas = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(n)]
    outside = 0
    for seed in range(300):
        positions = np.array([stable_position(sha, seed) for sha in shas])
        shares = {"test": np.mean(positions < 0.15), "val": np.mean((positions >= 0.15) & (positions < 0.3))}
        outside += sum(abs(share - 0.15) > _share_bound(n, 0.15) for share in shares.values())
    assert outside <= 3  # of 600 figures; 0.6 expected at 0.1%, and a broken hash is far off


def test_stable_stage_shares_on_a_skewed_dataset_are_within_the_bound(tmp_path):
    sizes = {"big": 1500, "mid": 300, "small": 40, "tiny": 10}
    params = _params(tmp_path, [row for label, n in sizes.items() for row in _rows(label, n)])
    split.run(params)
    per_class = read_json(params.paths.details("split"))["per_class"]
    for label, n in sizes.items():
        for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            share = per_class[name][label] / n
            assert abs(share - fraction) <= _share_bound(n, fraction), (label, name, share)


@pytest.mark.parametrize("n", [3, 4, 6, 10])
def test_small_classes_get_an_image_in_every_split_by_rank(tmp_path, n):
    fillers = 0
    for seed in range(25):
        params = _params(tmp_path, _rows("a", 40) + _rows("small", n), base={"seed": seed})
        split.run(params)
        table = _splits(params)
        small = table[table["label"] == "small"]
        assert set(small["split"]) == {"train", "val", "test"}, (seed, small["split"].tolist())
        ranked = sorted(small["sha256"], key=lambda sha: stable_position(sha, seed))
        by_rank = read_json(params.paths.details("split"))["placed_by_rank"].get("small", 0)
        if by_rank:  # the filled splits take the smallest positions: test first, then val
            split_by_sha = dict(zip(small["sha256"], small["split"], strict=True))
            order = [split_by_sha[sha] for sha in ranked]
            assert order == sorted(order, key=["test", "val", "train"].index)
        fillers += by_rank
    assert fillers > 0  # the rule was exercised, not only the lucky draws


def test_duplicate_and_near_duplicate_groups_stay_together(tmp_path):
    rows = _rows("a", 60, copies=2) + _rows("b", 60)
    for i, row in enumerate(rows):
        row["group"] = f"g{i // 6}" if i % 3 == 0 else ""  # chains exact copies and near-duplicates together
    for method in ("stable", "stratified"):
        params = _params(tmp_path, [{k: v for k, v in row.items() if k != "group"} for row in rows],
                         split={"method": method})  # fmt: skip
        audit = pd.DataFrame(rows).assign(quarantined="False")  # the audit's table: one group per image
        audit["group"] = audit["group"].where(audit["group"] != "", audit["sha256"])
        params.paths.audit_table.parent.mkdir(parents=True, exist_ok=True)
        audit.to_csv(params.paths.audit_table, index=False)
        split.run(params)
        table = _splits(params).merge(pd.DataFrame(rows)[["path", "group"]], on="path")
        linked = table[table["group"] != ""].groupby("group")["split"].nunique()
        assert (linked == 1).all() and len(linked) == 30, method
        assert (table.groupby("sha256")["split"].nunique() == 1).all(), method
        assert set(table["split"]) == {"train", "val", "test"}


def test_stable_carving_moves_val_images_by_hash_and_keeps_them_when_val_grows(tmp_path):
    carve = {"carve_test_from": "val", "train": 0.6, "val": 0.1, "test": 0.3}
    first = _params(tmp_path / "first", _presplit_rows(test=False), split=carve)
    assert split.run(first)["strategy"] == "given, test carved from val (stable)"
    table = _splits(first)
    moved = table[table["split"] == "test"]
    assert set(moved["path"].str.split("/").str[0]) == {"val"} and set(moved["label"]) == {"a", "b"}

    grown = _presplit_rows(test=False) + _rows("a", 3, "val", start=10) + _rows("b", 3, "train", start=14)
    second = _params(tmp_path / "second", grown, split=carve)
    split.run(second)
    old, new = _split_of(first), _split_of(second)
    assert {path: new[path] for path in old} == old


# Classes the audit's near-duplicate groups shrink or merge with others.


def _write_audit(params, rows: list[dict], groups: dict[str, list[str]]) -> dict[str, str]:
    """The audit's table for `rows`: each list of paths in `groups` one group (its id the smallest sha256, as
    the audit names it), every other image its own. Returns path -> group id."""
    sha = {row["path"]: row["sha256"] for row in rows}
    group = dict(sha)
    for paths in groups.values():
        group.update(dict.fromkeys(paths, min(sha[path] for path in paths)))
    audit = pd.DataFrame(rows).assign(group=lambda t: t["path"].map(group), quarantined="False")
    params.paths.audit_table.parent.mkdir(parents=True, exist_ok=True)
    audit.to_csv(params.paths.audit_table, index=False)
    return group


def _per_class(params) -> pd.DataFrame:
    return pd.crosstab(_splits(params)["label"], _splits(params)["split"])


@pytest.mark.parametrize("method", ["stable", "stratified"])
def test_a_minority_class_grouped_with_a_big_one_still_gets_every_split(tmp_path, method):
    """1000:3, each of the small class's images near-duplicate of a big-class image: the three cross-label
    groups are placed so that the small class is in train, val and test."""
    rows = _rows("big", 1000) + _rows("small", 3)
    params = _params(tmp_path, rows, split={"method": method})
    pairs = {f"pair{i}": [f"big/{i:03d}_0.png", f"small/{i:03d}_0.png"] for i in range(3)}
    _write_audit(params, rows, pairs)

    split.run(params)

    counts = _per_class(params)
    assert (counts.loc["small", ["train", "val", "test"]] == 1).all(), counts.loc["small"].to_dict()
    assert (counts.loc["big", ["train", "val", "test"]] > 100).all()
    table = _splits(params).set_index("path")
    for paths in pairs.values():  # each group still in one split
        assert table.loc[paths, "split"].nunique() == 1


def test_a_class_inside_one_group_with_another_class_fails_with_one_line(tmp_path, caplog):
    """The small class's three files all in one group with big-class images: it cannot be in three splits."""
    rows = _rows("big", 40) + _rows("small", 3)
    members = ["big/000_0.png", "big/001_0.png", "small/000_0.png", "small/001_0.png", "small/002_0.png"]
    params = _params(tmp_path, rows)
    group = _write_audit(params, rows, {"g": members})["small/000_0.png"]

    with pytest.raises(PipelineError) as caught:
        split.run(params)

    message = str(caught.value)
    assert "\n" not in message
    assert "'small' (3 images in 3 different files" in message
    assert "1 distinct image once the audit's near-duplicate groups are joined" in message
    assert "shared with 'big'" in message
    assert re.search(r"shared with 'big'; it would get train [03], val [03], test [03];", message)
    assert f"audit group {group[:12]} (5 images of ['big', 'small']: small/000_0.png" in message
    assert "raise audit.similarity" in message and "split.small_class: warning" in message
    assert not params.paths.splits.exists()

    warned = _params(tmp_path, rows, split={"small_class": "warning"})  # the class at least goes to train
    with caplog.at_level(logging.WARNING):
        split.run(warned)
    assert "'small' (3 images in 3 different files" in caplog.text
    assert set(_splits(warned).set_index("path").loc[members, "split"]) == {"train"}


def test_a_class_the_audit_grouped_into_one_image_names_the_group(tmp_path):
    """60 classes of 3 different files; the audit takes one class's three for near-duplicates: the message
    says so, with the group and the param that makes it, not '1 distinct image' alone."""
    rows = [row for k in range(60) for row in _rows(f"c{k:02d}", 3)]
    params = _params(tmp_path, rows)
    members = ["c07/000_0.png", "c07/001_0.png", "c07/002_0.png"]
    group = _write_audit(params, rows, {"g": members})["c07/000_0.png"]

    with pytest.raises(PipelineError) as caught:
        split.run(params)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("classes ['c07' (3 images in 3 different files, 1 distinct image once the")
    assert f"audit group {group[:12]} (3 images of ['c07']: c07/000_0.png, c07/001_0.png, c07/002_0.png)" in (
        message
    )
    assert "raise audit.similarity or audit.pixel_correlation" in message
    assert "'c08'" not in message  # only the class that cannot be split


def _python_calls(function, *args) -> int:
    """Python-level function calls made while `function(*args)` runs (calls into C are not counted)."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        function(*args)
    finally:
        sys.setprofile(None)
    return calls


def _linked_table(n: int) -> pd.DataFrame:
    """n files in 10 classes: every 20th a byte copy of the one before, every 10th in the near-duplicate group
    of the one before, and one group across two classes."""
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    shas = [shas[i - 1] if i % 20 == 19 else sha for i, sha in enumerate(shas)]
    groups = [shas[i - 1] if i % 10 == 9 else sha for i, sha in enumerate(shas)]
    groups[1] = groups[0]  # classes 0 and 1
    labels = [f"c{i % 10}" if i % 10 != 9 else f"c{(i - 1) % 10}" for i in range(n)]
    return pd.DataFrame({"sha256": shas, "group": groups, "label": labels}, dtype=str)


def test_units_of_a_million_rows_take_no_python_call_per_row():
    """Joining files into units (connected components) and describing them runs in numpy and pandas: a Python
    union-find and per-row lambdas took 18 s of a million-image split (benchmarks/scale.py)."""
    small, large = _linked_table(1_000), _linked_table(20_000)
    for table in (small, large):
        keys = split._unit_keys(table)
        units = split._units(table, keys, seed=42)
        # Each 10th file joins the one before (every other one by its bytes), and file 1 joins file 0.
        assert keys.nunique() == len(units) == len(table) - len(table) // 10 - 1
        assert units.loc[keys[0], "labels"] == ("c0", "c1") and units["images"].sum() == len(table)
    grown = [
        _python_calls(work, large) - _python_calls(work, small)
        for work in (split._unit_keys, lambda t: split._units(t, split._unit_keys(t), 42))
    ]
    assert max(grown) < 200, grown  # 20 times the rows, the same calls (was one or more per row)


def test_stable_positions_are_the_one_by_one_positions():
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    expected = [stable_position(sha, 7) for sha in shas]
    assert split.stable_positions(shas, 7).tolist() == expected
    old = [  # the definition, written out
        int.from_bytes(hashlib.blake2b(s.encode(), key=b"7", digest_size=8).digest(), "big") / 2.0**64
        for s in shas
    ]
    assert expected == old

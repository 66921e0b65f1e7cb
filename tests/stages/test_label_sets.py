"""Multilabel data (`base.task: multilabel`) through ingest, validate and split: CSV label sets, identical
files under several class folders merged, the label-set figures and page, stratified and stable splits of
label sets."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from helpers import data_stage_params, make_image

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import ingest, split, validate

LABELS = ("car", "bike", "person", "dog")
MULTILABEL = {"task": "multilabel"}


def _csv_project(tmp_path, sets: list[str], header: str = "path,labels", **sections):
    root = tmp_path / "data"
    lines = [header]
    for i, cell in enumerate(sets):
        make_image(root / f"img_{i:03d}.png", i % 4, seed=i)
        lines.append(f"img_{i:03d}.png,{cell}")
    listing = tmp_path / "labels.csv"
    listing.write_text("\n".join(lines) + "\n")
    sections = {"base": MULTILABEL, "ingest": {"num_workers": 0}, **sections}
    return data_stage_params(tmp_path, root, paths={"csv_manifest": str(listing)}, **sections)


def _random_sets(n: int, seed: int = 0, rates=(0.6, 0.3, 0.5, 0.15)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        ";".join(name for name, rate in zip(LABELS, rates, strict=True) if rng.random() < rate)
        for _ in range(n)
    ]


def test_a_csv_of_label_sets_reads_sorted_sets_and_keeps_images_with_none(tmp_path):
    params = _csv_project(tmp_path, ["dog; car", "", "person;person", "bike"] * 10)

    ingest.run(params)
    summary = validate.run(params)

    manifest = pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False)
    assert manifest["label"].tolist()[:4] == ["car;dog", "", "person", "bike"]
    assert set(manifest["status"]) == {"ok"}  # an empty set is an image of none of the labels, not no_label
    assert summary["usable"] == 40 and summary["classes"] == 4
    figures = read_json(params.paths.details("validate"))["multilabel"]
    assert figures["no_label"] == 10 and figures["labels"] == 4 and figures["label_sets"] == 4
    assert figures["positives"] == {"bike": 10, "car": 10, "dog": 10, "person": 10}
    assert figures["negatives"]["car"] == 30
    assert figures["cardinality"] == 1.0 and figures["density"] == 0.25
    assert figures["always_together"] == [["car", "dog", 10]]
    assert figures["never_together"]["pairs"] == 5  # of 6 pairs, only car-dog meet
    assert figures["cooccurrence"]["car"] == {"bike": 0, "car": 10, "dog": 10, "person": 0}


def test_min_images_per_class_counts_each_labels_positives(tmp_path):
    params = _csv_project(tmp_path, ["car;bike"] * 12 + ["car;dog"] * 3, validate={"min_images_per_class": 5})
    ingest.run(params)

    with pytest.raises(PipelineError, match=r"rule min_images_per_class failed: classes \['dog' \(3\)\]"):
        validate.run(params)


def test_the_same_file_under_several_class_folders_is_one_image_with_every_label(tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        make_image(root / "car" / f"{i}.png", 0, seed=i)
        make_image(root / "person" / f"p{i}.png", 2, seed=100 + i)
    for i in range(4):  # the same bytes as car/i.png, also a person: two labels
        (root / "person" / f"{i}.png").write_bytes((root / "car" / f"{i}.png").read_bytes())
    params = data_stage_params(tmp_path, root, base=MULTILABEL, ingest={"num_workers": 0})
    ingest.run(params)

    summary = validate.run(params)

    validated = pd.read_csv(params.paths.validated, dtype=str, keep_default_na=False).set_index("path")
    assert summary["usable"] == 24 and summary["warnings"] == 0  # no label conflict in a multilabel task
    assert validated.at["car/0.png", "label"] == "car;person" and "person/0.png" not in validated.index
    quarantine = pd.read_csv(params.paths.quarantine)
    assert quarantine.set_index("path")["reason"].to_dict() == {
        f"person/{i}.png": "merged_copy" for i in range(4)
    }
    details = read_json(params.paths.details("validate"))
    assert details["images_per_class"] == {"car": 12, "person": 16}
    assert details["multilabel"]["merged_copies"] == 4
    assert details["multilabel"]["implies"] == [] and details["multilabel"]["always_together"] == []
    html = (params.paths.reports("validate") / "index.html").read_text()
    assert "Label sets" in html and "identical files merged" in html


def test_single_label_keeps_copies_under_two_folders_a_label_conflict(tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        make_image(root / "car" / f"{i}.png", 0, seed=i)
        make_image(root / "person" / f"p{i}.png", 2, seed=100 + i)
    (root / "person" / "0.png").write_bytes((root / "car" / "0.png").read_bytes())
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0})
    ingest.run(params)

    summary = validate.run(params)

    assert summary["warnings"] == 1 and summary["usable"] == 23  # both copies quarantined


def test_a_class_folder_holding_the_separator_is_refused_naming_it(tmp_path):
    root = tmp_path / "data"
    make_image(root / "cat;dog" / "0.png", 0)
    make_image(root / "bird" / "0.png", 1)
    params = data_stage_params(tmp_path, root, base=MULTILABEL, ingest={"num_workers": 0})

    with pytest.raises(PipelineError, match=r"'cat;dog' \(no ';', base.label_separator"):
        ingest.run(params)


def test_a_labels_column_in_a_single_label_task_says_to_set_the_task(tmp_path):
    params = _csv_project(tmp_path, ["car;dog"] * 3, base={"task": "single"})

    with pytest.raises(PipelineError, match="a labels column is for label sets: set base.task: multilabel"):
        ingest.run(params)


def _validated(tmp_path, sets: list[str], shas: list[str] | None = None, **sections):
    params = data_stage_params(tmp_path, tmp_path / "data", base=MULTILABEL, **sections)
    params.paths.validated.parent.mkdir(parents=True, exist_ok=True)
    shas = shas or [hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(len(sets))]
    rows = [
        {"path": f"{i:05d}.png", "label": cell, "split": "", "sha256": sha, "width": 32, "height": 32}
        for i, (cell, sha) in enumerate(zip(sets, shas, strict=True))
    ]
    pd.DataFrame(rows).to_csv(params.paths.validated, index=False)
    return params


def _label_shares(params) -> pd.DataFrame:
    table = pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False)
    pairs = table.assign(label=table["label"].str.split(";")).explode("label")
    pairs = pairs[pairs["label"] != ""]
    counts = pd.crosstab(pairs["label"], pairs["split"])
    return counts.div(counts.sum(axis=1), axis=0)


@pytest.mark.parametrize("method", ["stratified", "stable"])
def test_every_label_reaches_every_split_near_its_share(tmp_path, method):
    params = _validated(tmp_path, _random_sets(600), split={"method": method})

    summary = split.run(params)

    shares = _label_shares(params)
    assert (shares > 0).all().all()  # every label, dog's 90 images too, in every split
    bound = 0.02 if method == "stratified" else 3.29 * np.sqrt(0.7 * 0.3 / 90)  # stable: binomial, 99.9%
    assert (shares["train"] - 0.7).abs().max() < bound
    assert summary["train"] + summary["val"] + summary["test"] == 600
    per_class = read_json(params.paths.details("split"))["per_class"]
    assert sum(per_class[s]["dog"] for s in ("train", "val", "test")) == sum(
        "dog" in c for c in _random_sets(600)
    )


def test_stratified_label_sets_beat_the_stable_hash_on_per_label_shares(tmp_path):
    sets = _random_sets(600, rates=(0.5, 0.2, 0.1, 0.05))
    deviations = {}
    for method in ("stratified", "stable"):
        params = _validated(tmp_path / method, sets, split={"method": method})
        split.run(params)
        shares = _label_shares(params)
        deviations[method] = float((shares[["train", "val", "test"]] - [0.7, 0.15, 0.15]).abs().mean().mean())
    assert deviations["stratified"] < deviations["stable"] / 2


def test_stable_label_sets_move_no_image_when_ten_percent_more_arrive(tmp_path):
    sets = _random_sets(660, seed=4)
    before = _validated(tmp_path / "before", sets[:600])
    after = _validated(tmp_path / "after", sets)
    split.run(before)
    split.run(after)
    old = pd.read_csv(before.paths.splits, dtype=str, keep_default_na=False).set_index("path")["split"]
    new = pd.read_csv(after.paths.splits, dtype=str, keep_default_na=False).set_index("path")["split"]
    moved = (new[old.index] != old).sum()
    fillers = sum(
        read_json(p.paths.details("split"))["placed_by_rank"].get("dog", 0) for p in (before, after)
    )
    assert moved <= fillers  # only units moved to give a rare label a place in every split can move


def test_identical_files_stay_together_and_rare_labels_are_named(tmp_path):
    sets = _random_sets(200) + ["car;fox"] * 2
    shas = [hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(200)] + ["f" * 64] * 2
    params = _validated(tmp_path, sets, shas, split={"method": "stratified"})

    with pytest.raises(
        PipelineError, match=r"labels \['fox' \(not in \['val', 'test'\]\)\] get no image in each"
    ):
        split.run(params)

    params = _validated(
        tmp_path / "warn", sets, shas, split={"method": "stratified", "small_class": "warning"}
    )
    split.run(params)
    table = pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False)
    assert table.loc[table["label"] == "car;fox", "split"].tolist() == ["train", "train"]

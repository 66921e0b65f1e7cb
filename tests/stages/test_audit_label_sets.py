"""The audit on label sets (`base.task: multilabel`): out-of-fold one-vs-rest probabilities (logistic below
PROBE_ABOVE images, ridge above), cleanlab's multi-label mode, and the stage end to end on photo mosaics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from test_audit import _params, tiles

from pipeline.io import read_json
from pipeline.stages import audit, ingest, split, validate
from pipeline.stages.audit import label_sets


def _synthetic(n: int = 300, k: int = 4, seed: int = 0):
    """Embeddings that carry each image's labels (a direction per label, plus noise), and the targets."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < 0.4).astype(np.float32)
    directions = rng.normal(size=(k, 32))
    embeddings = (targets @ directions + 0.3 * rng.normal(size=(n, 32))).astype(np.float32)
    return embeddings, targets


@pytest.mark.parametrize("probe_above", [10_000, 0])  # logistic regression; ridge, a block at a time
def test_a_missing_and_an_extra_label_are_flagged_first_with_the_right_set_suggested(probe_above):
    embeddings, targets = _synthetic()
    given = targets.copy()
    given[7, :] = 0.0
    given[7, 0], given[7, 1] = 1.0, 1.0 - targets[7, 1]  # image 7: label 1 flipped, the rest kept
    given[7, 2:] = targets[7, 2:]
    lists = [np.flatnonzero(row) for row in given]
    assignment = label_sets.fold_of(lists, 5, seed=0)

    probabilities = label_sets.out_of_fold_probabilities(embeddings, given, assignment, probe_above)
    issues = label_sets.label_issues(lists, probabilities)

    assert issues.ranked[0] == 7 and len(issues.ranked) <= 6
    assert issues.suggested[7] == tuple(np.flatnonzero(targets[7]).tolist())
    assert issues.quality[7] == issues.quality.min()
    clean = np.delete(np.arange(len(targets)), 7)
    assert ((probabilities[clean] >= 0.5) == (targets[clean] == 1)).mean() > 0.97


def test_folds_spread_every_label_and_need_two_images_with_and_without_it():
    _, targets = _synthetic(100)
    assignment = label_sets.fold_of([np.flatnonzero(row) for row in targets], 5, seed=1)
    per_fold = np.stack([targets[assignment == f].sum(axis=0) for f in range(5)])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()
    assert label_sets.usable_folds(targets, 5) == 5
    assert label_sets.usable_folds(np.ones((10, 2), dtype=np.float32), 5) == 0


def _mosaic(path, left: str, right: str | None, index: int) -> None:
    """A 64 px picture: the left half a tile of one photo, the right half another's (or the same photo)."""
    first = Image.fromarray(tiles(left)[index]).resize((32, 64))
    second = Image.fromarray(tiles(right or left)[-(index + 1)]).resize((32, 64))
    canvas = Image.new("RGB", (64, 64))
    canvas.paste(first, (0, 0))
    canvas.paste(second, (32, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def test_the_stage_fills_every_label_column_from_label_sets_and_split_leaves_the_quarantined_out(tmp_path):
    # 36 mosaics of two photos: too few for the probe to find a planted error reliably (the synthetic tests
    # above check that); here the stage's wiring: the label sets in, the suggested sets out, quarantine.
    data, rows = tmp_path / "data", ["path,labels"]
    for i in range(12):
        for left, right in [("astronaut", None), ("coffee", None), ("astronaut", "coffee")]:
            name = f"{left}_{right}_{i}.png"
            _mosaic(data / name, left, right, i)
            rows.append(f"{name},{left};{right or left}")
    # mirrored copies: one under another set (a conflict), one under the same set written in another order
    for name, labels in [
        ("astronaut_coffee_0.png", "astronaut"),
        ("astronaut_coffee_1.png", "coffee;astronaut"),
    ]:
        ImageOps.mirror(Image.open(data / name)).save(data / f"mirrored_{name}")
        rows.append(f"mirrored_{name},{labels}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    params = _params(tmp_path, data, label_issues="quarantine")
    params = params.model_copy(
        update={
            "base": params.base.model_copy(update={"task": "multilabel"}),
            "paths": params.paths.model_copy(update={"csv_manifest": tmp_path / "labels.csv"}),
        }
    )
    ingest.run(params)
    validate.run(params)

    metrics = audit.run(params)

    table = pd.read_csv(params.paths.audit_table, dtype=str, keep_default_na=False)
    assert set(table["label"]) == {"astronaut", "coffee", "astronaut;coffee"}
    groups = table[table["group_size"] == "2"].groupby("group")["path"].apply(sorted).tolist()
    assert ["astronaut_coffee_0.png", "mirrored_astronaut_coffee_0.png"] in groups
    assert ["astronaut_coffee_1.png", "mirrored_astronaut_coffee_1.png"] in groups
    assert metrics["cross_label_groups"] == 1  # only the copy whose set differs
    assert set(table["suggested_label"]) <= {"", "astronaut", "coffee", "astronaut;coffee"}
    quality = table["label_quality"].astype(float)
    assert quality.between(0, 1).all() and quality.nunique() > 10
    flagged = table["label_issue"] == "True"
    assert metrics["label_issues"] == metrics["quarantined"] == flagged.sum() > 0
    assert quality[flagged].max() <= quality[~flagged].min()  # cleanlab's worst scores are the flagged ones
    note = read_json(params.paths.details("audit"))["label_issues"]
    probe = metrics["label_probe_map"]
    assert note == (
        "quarantine: 3-fold one-vs-rest logistic regression + cleanlab (multi-label); "
        f"the probe's out-of-fold mAP {probe:.3f}"
    )
    assert 0.5 < probe <= 1  # both photos are easy to tell apart in the backbone's features
    assert f"{probe:.3f} mAP" in (params.paths.reports("audit") / audit.STAGE.page).read_text()
    split.run(params)
    kept = set(pd.read_csv(params.paths.splits)["path"])
    assert kept == set(table.loc[~flagged, "path"])

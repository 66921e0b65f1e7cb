"""Audit: each check fires on what it should (altered copies, a wrong label, drifted new data) and stays quiet
on clean data; split keeps near-duplicate groups together; features are reused; DVC reruns only on change.

The images are 64 px tiles of real photos bundled with scikit-image (a class is a photo; each tile its own
picture); the backbone is the bundled pretrained lite0 at 64 px (random weights find every image alike).
"""

from __future__ import annotations

import io
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_headline_metrics, data_stage_params
from PIL import Image, ImageOps

from pipeline.config import AuditParams
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import audit, ingest, split, validate
from pipeline.stages.audit import checks

CLASSES = ("astronaut", "coffee", "immunohistochemistry")
OTHER_LOOK = ("hubble_deep_field", "retina", "rocket")  # drifted data: other photos
PER_CLASS = 10
_TILE = 100


@cache
def tiles(photo: str) -> list[np.ndarray]:
    """The photo's 100 px tiles (no overlap), the most detailed first (flat sky would be alike)."""
    import skimage.data

    pixels = getattr(skimage.data, photo)()[..., :3]
    rows, cols = pixels.shape[0] // _TILE, pixels.shape[1] // _TILE
    cut = [
        pixels[r * _TILE : (r + 1) * _TILE, c * _TILE : (c + 1) * _TILE]
        for r in range(rows)
        for c in range(cols)
    ]
    return sorted(cut, key=lambda tile: -float(tile.std()))


def picture(path: Path, photo: str, index: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tiles(photo)[index]).resize((64, 64), Image.Resampling.LANCZOS).save(path)
    return path


def clean_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    for label in CLASSES:
        for i in range(per_class):
            picture(root / label / f"{i:03d}.png", label, i)
    return root


def _params(tmp_path: Path, data: Path, train: dict | None = None, **audit_settings):
    out = tmp_path / "out"
    return data_stage_params(
        tmp_path,
        data,
        ingest={"num_workers": 0},
        validate={"min_images_per_class": 5},
        model={"backbone": "tf_efficientnet_lite0", "weights": "bundled", "image_size": 64},
        train={"precision": "fp32", **(train or {})},
        audit={"folds": 3, "drift_min_images": 10, **audit_settings},
        paths={
            "champion_dir": str(out / "champion"),
            "checkpoint_dir": str(out / "checkpoints"),
            "model": str(out / "model.pt"),
            "live_dir": str(out / "live"),
        },
    )


def _audit(params) -> tuple[dict, pd.DataFrame]:
    ingest.run(params)
    validate.run(params)
    metrics = audit.run(params)
    return metrics, pd.read_csv(params.paths.audit_table, dtype=str, keep_default_na=False)


def test_clean_data_has_no_finding_and_the_page_opens_offline(tmp_path):
    params = _params(tmp_path, clean_folder(tmp_path / "data"))
    metrics, table = _audit(params)
    assert metrics["images"] == len(table) == 3 * PER_CLASS
    assert metrics["near_duplicate_groups"] == metrics["label_issues"] == metrics["quarantined"] == 0
    assert metrics["drifted"] is None  # no champion yet
    assert_headline_metrics(metrics, CLASSES)
    assert list(table["group"]) == list(table["sha256"])  # every image its own group
    html = (params.paths.reports("audit") / audit.STAGE.page).read_text()
    assert "No likely label error found" in html and "No near-duplicate group" in html
    assert "http://" not in html and "https://" not in html
    assert read_json(params.paths.details("audit"))["drift"]["status"].startswith("no champion")


def _copies(data: Path, label: str = "astronaut") -> dict[str, str]:
    """Altered copies of four pictures (flip, JPEG, resize, crop) under `label`: copy path -> original."""
    made = {}
    for name, alter in (
        ("000", lambda im: ImageOps.mirror(im)),
        ("001", lambda im: _jpeg(im, 70)),
        ("002", lambda im: im.resize((72, 72), Image.Resampling.BICUBIC)),
        ("003", lambda im: im.crop((2, 5, 60, 63))),  # 90% of each side, off centre
    ):
        copy = f"{label}/copy_of_{name}.png"
        alter(Image.open(data / label / f"{name}.png").convert("RGB")).save(data / copy)
        made[copy] = f"{label}/{name}.png"
    return made


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_altered_copies_share_a_group_and_split_keeps_each_group_in_one_split(tmp_path):
    data = clean_folder(tmp_path / "data")
    copies = _copies(data)
    params = _params(tmp_path, data)
    metrics, table = _audit(params)
    group = dict(zip(table["path"], table["group"], strict=True))
    assert all(group[copy] == group[original] for copy, original in copies.items())
    assert metrics["near_duplicate_groups"] == 4 and metrics["near_duplicate_images"] == 8
    assert metrics["cross_label_groups"] == 0
    split.run(params)
    splits = pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False).set_index("path")["split"]
    assert all(splits[copy] == splits[original] for copy, original in copies.items())
    html = (params.paths.reports("audit") / audit.STAGE.page).read_text()
    assert html.count("<h3>group ") == 4


def test_aligned_pixel_correlation_matches_crops_and_mirrors_not_other_pictures(tmp_path):
    original = picture(tmp_path / "original.png", "coffee", 0)
    image = Image.open(original)
    image.crop((6, 0, 64, 58)).save(tmp_path / "crop.png")  # 90% of each side, in a corner
    ImageOps.mirror(image).resize((80, 80), Image.Resampling.BICUBIC).save(tmp_path / "mirror.png")
    picture(tmp_path / "other.png", "coffee", 1)
    names = ("original", "crop", "mirror", "other")
    thumbs = {k: checks.thumbnail(tmp_path / f"{name}.png") for k, name in enumerate(names)}
    crop, mirror, other = checks.aligned_correlation(thumbs, [(0, 1), (2, 0), (0, 3)])
    assert crop >= 0.995 and mirror >= 0.995 and other < 0.9


def _tuples(pairs: checks.Pairs) -> set[tuple[int, int]]:
    return set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))


def test_a_copy_far_from_its_original_in_embedding_space_is_found_by_its_pixels(tmp_path):
    files = [picture(tmp_path / f"{k}.png", "coffee", k) for k in range(6)]
    _jpeg(Image.open(files[2]).convert("RGB"), 60).save(tmp_path / "copy.jpg")
    ImageOps.mirror(Image.open(files[4])).save(tmp_path / "mirror.png")
    files += [tmp_path / "copy.jpg", tmp_path / "mirror.png"]
    embeddings = np.random.default_rng(0).normal(size=(len(files), 16))
    embeddings[6], embeddings[7] = -embeddings[2], -embeddings[4]  # each copy far from its original
    assert not {(2, 6), (4, 7)} & _tuples(checks.similar_pairs(embeddings, threshold=0.97, neighbours=1)[1])
    thumbs = checks.thumbnails(files)
    assert thumbs.dtype == np.uint8 and thumbs.shape == (len(files), 48, 48)
    assert {(2, 6), (4, 7)} <= _tuples(checks.pixel_nearest(thumbs))
    for ann_above in (checks.ANN_ABOVE, 0):  # all pairs compared, or graphs and memory-mapped files
        pairs = checks.near_duplicate_pairs(embeddings, files, AuditParams(neighbours=1), ann_above)
        assert [(p.first, p.second) for p in pairs] == [
            (2, 6),
            (4, 7),
        ]  # the other candidates fail the pixels
        assert all(p.correlation >= 0.995 and p.similarity < 0 for p in pairs)


def test_similar_pairs_are_those_above_the_threshold_and_each_images_closest_others():
    embeddings = np.array([[1.0, 0.0, 0.2], [0.9, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.8, 0.9], [0, 0, 1.0]])
    alike, pairs = checks.similar_pairs(embeddings, threshold=0.5, neighbours=1)
    unit = checks.normalize(embeddings - embeddings.mean(axis=0))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = {tuple(sorted((i, int(similarity[i].argmax())))) for i in range(len(embeddings))}
    assert _tuples(pairs) == expected and (pairs.first < pairs.second).all()
    assert pairs.similarity[0] == pytest.approx(similarity[0, 1], abs=1e-6)  # (0, 1) sorts first
    above = {(i, j) for i in range(5) for j in range(i + 1, 5) if similarity[i, j] >= 0.5}
    assert above and _tuples(alike) == above  # whatever their rank
    assert alike.similarity[0] == pytest.approx(similarity[0, 1], abs=1e-6)
    assert len(checks.similar_pairs(embeddings, threshold=0.5, neighbours=10)[1]) == 10  # every pair, once


def test_pairs_hold_each_pair_once_lower_index_first_and_never_an_image_with_itself():
    pairs = checks.Pairs.of([3, 1, 2, 0, 2], [1, 3, 2, 5, 0], [0.5, 0.6, 0.7, 0.8, 0.9])
    assert _tuples(pairs) == {(1, 3), (0, 5), (0, 2)}
    assert pairs.first.tolist() == [0, 0, 1] and pairs.second.tolist() == [2, 5, 3]  # sorted
    assert pairs.similarity.tolist() == pytest.approx([0.9, 0.8, 0.5])  # a pair's first occurrence
    assert [p.correlation for p in pairs] == [None, None, None]  # NaN: not needed
    assert checks.group_ids(["d", "c", "b", "a", "e", "f"], pairs) == ["b", "a", "b", "a", "e", "b"]
    assert len(checks.Pairs.empty()) == 0


def test_joined_pairs_are_those_of_all_parts_each_once_in_a_few_bytes_a_pair():
    """Joining the embedding search's blocks gives what Pairs.of gives on all their pairs at once (each pair
    once, its first occurrence's values), holding a few 8-byte arrays a pair beside the parts, not the
    hundred bytes a pair of Pairs.of's copies (3.8 GB at a million images)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    parts = []
    for _ in range(8):  # overlapping blocks, as two images' searches find each other
        first, second = rng.integers(0, 3000, size=(2, 250_000))
        parts.append(checks.Pairs.of(first, second, rng.random(250_000), rng.random(250_000)))
    raw = sum(len(part) for part in parts)
    columns = (np.concatenate([getattr(p, name) for p in parts]) for name in checks.Pairs._COLUMNS)
    expected = checks.Pairs.of(*columns)
    tracemalloc.start()
    joined = checks.Pairs.joined(parts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for name in checks.Pairs._COLUMNS:
        np.testing.assert_array_equal(getattr(joined, name), getattr(expected, name))
    assert len(joined) < raw  # some pairs were found by two blocks
    assert peak < 48 * raw, peak / raw  # with its output (24 bytes a pair); Pairs.of on them all: 74
    assert len(checks.Pairs.joined([checks.Pairs.empty()])) == 0


def test_a_copy_under_another_label_is_a_conflict_and_fails_at_severity_error(tmp_path):
    data = clean_folder(tmp_path / "data")
    ImageOps.mirror(Image.open(data / "astronaut" / "004.png")).save(data / "coffee" / "mirrored.png")
    params = _params(tmp_path, data, severity={"near_duplicate_conflict": "error"})
    with pytest.raises(PipelineError, match="near_duplicate_conflict: 1 near-duplicate group"):
        _audit(params)
    assert read_json(params.paths.metrics("audit"))["cross_label_groups"] == 1  # reports written first


def test_a_wrong_label_is_flagged_with_the_right_class_suggested_and_can_be_quarantined(tmp_path):
    data = clean_folder(tmp_path / "data")
    picture(data / "coffee" / "really_astronaut.png", "astronaut", PER_CLASS)
    params = _params(tmp_path, data, label_issues="quarantine")
    metrics, table = _audit(params)
    flagged = table[table["label_issue"] == "True"].set_index("path")
    planted = "coffee/really_astronaut.png"
    assert planted in flagged.index and len(flagged) <= 3  # on 31 images the probe doubts a tile or two more
    quality = table.set_index("path")["label_quality"].astype(float)
    assert quality[planted] < 0.2  # out of sample, its given label gets little probability
    assert (
        flagged.at[planted, "suggested_label"] == "astronaut" and flagged.at[planted, "quarantined"] == "True"
    )
    assert metrics["label_issues"] == metrics["quarantined"] == len(flagged)
    # the probe's out-of-fold accuracy: how often its preferred class is the given one
    probe = metrics["label_probe_accuracy"]
    assert probe == pytest.approx((table["suggested_label"] == table["label"]).mean()) and probe < 1
    page_text = (params.paths.reports("audit") / audit.STAGE.page).read_text()
    assert f"{probe:.3f} accuracy" in page_text
    split.run(params)
    assert "coffee/really_astronaut.png" not in set(pd.read_csv(params.paths.splits)["path"])
    assert "really_astronaut.png" in (params.paths.reports("audit") / audit.STAGE.page).read_text()


def test_label_issues_off_flags_nothing(tmp_path):
    data = clean_folder(tmp_path / "data")
    picture(data / "coffee" / "really_astronaut.png", "astronaut", PER_CLASS)
    metrics, table = _audit(_params(tmp_path, data, label_issues="off"))
    assert metrics["label_issues"] == 0 and (table["label_issue"] == "False").all()
    assert metrics["label_probe_accuracy"] is None


def _champion_of(params) -> None:
    """Record the current usable images as the champion's training set."""
    validated = pd.read_csv(params.paths.validated, dtype=str, keep_default_na=False)
    params.paths.champion_dir.mkdir(parents=True)
    validated.assign(split="train")[["path", "label", "split", "sha256"]].to_csv(
        params.paths.champion_splits, index=False
    )


@pytest.mark.parametrize("drifted", [False, True], ids=["same-look", "new-look"])
def test_drift_is_found_only_when_the_new_images_look_different(tmp_path, drifted):
    data = clean_folder(tmp_path / "data")
    params = _params(tmp_path, data)
    _audit(params)
    _champion_of(params)
    for label, other in zip(CLASSES, OTHER_LOOK, strict=True):
        for i in range(PER_CLASS):  # the same photos' next tiles, or tiles of other photos
            picture(data / label / f"new_{i:03d}.png", other if drifted else label, PER_CLASS + 1 + i)
    metrics, _ = _audit(params)
    drift = read_json(params.paths.details("audit"))["drift"]
    assert drift["new_images"] == drift["old_images"] == 3 * PER_CLASS
    assert metrics["prior_shift"] == pytest.approx(0.0)
    assert metrics["drifted"] is drifted
    assert (metrics["drift_auc"] > 0.75) is drifted


def test_a_second_run_embeds_nothing_and_writes_the_same_table(tmp_path):
    params = _params(tmp_path, clean_folder(tmp_path / "data"))
    _audit(params)
    first = params.paths.audit_table.read_bytes()
    stores = list(params.paths.cache_dir.glob("features-*/*.keys.npy"))
    assert len(stores) == 1
    stores[0].chmod(0o444)
    audit.run(params)
    assert list(params.paths.cache_dir.glob("features-*/*.keys.npy")) == stores  # no new shard: all reused
    assert params.paths.audit_table.read_bytes() == first


def test_split_reads_groups_and_quarantine_from_the_audit_table(tmp_path):
    from pipeline.data.audit import with_audit_groups

    table = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "sha256": ["s1", "s2", "s3"]})
    assert list(with_audit_groups(table, tmp_path / "missing.csv")["group"]) == ["s1", "s2", "s3"]
    audit_csv = tmp_path / "images.csv"
    audit_rows = {"path": ["a.png", "b.png"], "group": ["s1", "s1"], "quarantined": [False, True]}
    pd.DataFrame(audit_rows).to_csv(audit_csv, index=False)
    grouped = with_audit_groups(table, audit_csv)
    assert grouped["path"].tolist() == ["a.png", "c.png"]  # b quarantined
    assert grouped["group"].tolist() == ["s1", "s3"]  # c unseen by the audit: its own sha256


def test_no_usable_images_is_one_clear_error(tmp_path):
    params = _params(tmp_path, tmp_path / "data")
    params.paths.validated.parent.mkdir(parents=True)
    params.paths.validated.write_text("path,label,split,sha256,width,height\n")
    with pytest.raises(PipelineError, match="no usable images to audit"):
        audit.run(params)
    shutil.rmtree(params.paths.validated.parent)
    with pytest.raises(PipelineError, match="run `python -m pipeline validate` first"):
        audit.run(params)


def test_train_reuses_the_audit_features_for_its_head_only_epochs(tmp_path):
    from pipeline.stages import train

    params = _params(tmp_path, clean_folder(tmp_path / "data"))
    _audit(params)
    split.run(params)

    def shards() -> list[Path]:
        return sorted(params.paths.cache_dir.glob("*/*.keys.npy"))  # features-* and images-*

    made = shards()
    assert [p.parent.name.split("-")[0] for p in made] == ["features", "images"]
    train.run(_params(tmp_path, tmp_path / "data", train={"strategy": "linear_probe", "epochs": 1}))
    assert shards() == made  # every image found by content: neither decoded nor embedded again


@pytest.mark.parametrize(
    ("images", "largest", "warned"), [(1000, 40, False), (1000, 60, True), (10_000, 60, False)]
)
def test_a_group_holding_over_one_percent_and_fifty_images_is_called_a_chain(images, largest, warned):
    from pipeline.config import AuditSeverityParams

    groups = pd.DataFrame({"group": ["a", "b"], "images": [largest, 2], "labels": [1, 1], "splits": [0, 0]})
    found = audit.Found(pd.DataFrame({"path": range(images)}), pd.DataFrame(), groups, {})
    audit._judge_groups(found, AuditSeverityParams())
    chained = [line for line in found.warnings if "largest near-duplicate group" in line]
    assert bool(chained) == warned
    if warned:
        assert f"holds {largest} of {images} images" in chained[0] and "audit.similarity" in chained[0]

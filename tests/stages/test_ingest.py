"""Ingest: the three sources, labels by folder depth, symlink handling, determinism and the error paths."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from helpers import assert_headline_metrics, data_stage_params, make_image, make_image_folder
from PIL import Image, ImageFile

from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import ingest, validate
from pipeline.stages import split as split_stage


def _manifest(params) -> pd.DataFrame:
    return pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False)


def test_folder_source_labels_from_first_level_and_deeper_folders_join_their_class(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    make_image(root / "class_0" / "close-ups" / "deep.png", 0, seed=7)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0})

    summary = ingest.run(params)

    manifest = _manifest(params)
    assert list(manifest.columns) == list(images.MANIFEST_COLUMNS)
    assert list(manifest["path"]) == sorted(manifest["path"])
    labels = dict(zip(manifest["path"], manifest["label"], strict=True))
    assert labels["class_0/close-ups/deep.png"] == "class_0"
    assert set(manifest["status"]) == {"ok"} and set(manifest["split"]) == {""}
    assert set(manifest["format"]) == {"PNG"} and set(manifest["width"]) == {"32"}
    metrics = read_json(params.paths.metrics("ingest"))
    assert summary == {"source": "folder", **metrics} and metrics["ok"] == 7 and metrics["files_scanned"] == 7
    assert set(metrics) == {"files_scanned", "ok", "seconds", "images_per_second"}
    assert_headline_metrics(metrics, ["class_0", "class_1"])
    details = read_json(params.paths.details("ingest"))
    assert details["status"] == {"ok": 7} and details["source"] == "folder" and details["classes"] == 2


def test_label_depth_picks_another_folder_level(tmp_path):
    root = tmp_path / "data"
    make_image(root / "shop_a" / "shoes" / "1.png", 0, seed=1)
    make_image(root / "shop_b" / "bags" / "2.png", 1, seed=2)
    make_image(root / "shop_b" / "loose.png", 1, seed=3)  # no folder at depth 2: no label
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, "label_depth": 2})

    ingest.run(params)

    rows = _manifest(params).set_index("path")
    assert rows.at["shop_a/shoes/1.png", "label"] == "shoes"
    assert rows.at["shop_b/bags/2.png", "label"] == "bags"
    assert rows.at["shop_b/loose.png", "status"] == "no_label"


def test_manifest_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    outputs = []
    for workers in (0, 2, 2):
        params = data_stage_params(tmp_path, root, ingest={"num_workers": workers, "chunksize": 2})
        ingest.run(params)
        outputs.append(params.paths.manifest.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0].decode().splitlines()) == 13


def test_presplit_source_normalises_split_names(tmp_path):
    root = tmp_path / "data"
    for i, (split, folder) in enumerate((("train", "train"), ("val", "valid"), ("test", "test"))):
        for k in range(2):
            make_image(root / folder / f"c{k}" / f"{split}.png", k, seed=10 * i + k)
    (root / "valid" / "c2").mkdir()
    make_image(root / "extras" / "c0" / "x.png", 0, seed=5)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0})

    assert ingest.run(params)["source"] == "presplit"

    rows = _manifest(params).set_index("path")
    assert rows.at["valid/c1/val.png", "split"] == "val" and rows.at["valid/c1/val.png", "label"] == "c1"
    assert rows.at["train/c0/train.png", "split"] == "train"
    assert rows.at["test/c1/test.png", "split"] == "test"
    assert rows.at["valid/c2/", "status"] == "empty_class_folder"
    assert rows.at["extras/c0/x.png", "status"] == "unknown_split"


def test_csv_source_reports_missing_escaping_and_unknown_split_rows(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    listing = tmp_path / "labels.csv"
    listing.write_text(
        "path,label,split\n"
        "class_0/img_000.png,cat,train\n"
        "./class_1/img_000.png,dog,Validation\n"
        "class_1/img_001.png,dog,holdout\n"
        "class_0/nope.png,cat,train\n"
        "../outside.png,cat,train\n"
        "class_0/img_001.png,,train\n"
    )
    params = data_stage_params(
        tmp_path, root, paths={"csv_manifest": str(listing)}, ingest={"num_workers": 0}
    )

    assert ingest.run(params)["source"] == "csv"

    rows = _manifest(params).set_index("path")
    assert (rows.at["class_0/img_000.png", "label"], rows.at["class_0/img_000.png", "status"]) == (
        "cat",
        "ok",
    )
    assert rows.at["class_1/img_000.png", "split"] == "val"
    assert rows.at["class_1/img_001.png", "status"] == "unknown_split"
    assert rows.at["class_0/nope.png", "status"] == "missing"
    assert rows.at["../outside.png", "status"] == "outside_root"
    assert rows.at["class_0/img_001.png", "status"] == "no_label"


@pytest.mark.parametrize("follow", [True, False])
def test_csv_listing_vets_links_like_the_folder_scan(tmp_path, follow):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    outside = make_image(tmp_path / "elsewhere" / "secret.png", 0)
    os.symlink(root / "class_0" / "img_000.png", root / "class_1" / "alias.png")
    os.symlink(root / "class_0", root / "linked_dir")
    os.symlink(outside, root / "class_0" / "outside.png")
    os.symlink(outside.parent, root / "outside_dir")
    os.symlink(root / "class_0" / "gone.png", root / "class_0" / "broken.png")
    listed = {
        "class_0/img_000.png": "ok",
        "class_1/alias.png": "ok" if follow else "symlink_not_followed",
        "linked_dir/img_001.png": "ok" if follow else "symlink_not_followed",
        "class_0/outside.png": "symlink_outside_root",
        "outside_dir/secret.png": "symlink_outside_root",
        "class_0/broken.png": "broken_symlink",
        "class_1": "not_an_image",
        "class_9/none.png": "missing",
    }
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\n" + "".join(f"{path},cat\n" for path in listed))
    params = data_stage_params(
        tmp_path,
        root,
        paths={"csv_manifest": str(listing)},
        ingest={"num_workers": 0, "follow_symlinks_inside_root": follow},
    )
    ingest.run(params)
    rows = _manifest(params).set_index("path")
    assert {path: rows.at[path, "status"] for path in listed} == listed


def test_csv_without_the_needed_columns_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    listing = tmp_path / "labels.csv"
    listing.write_text("file,class\nclass_0/img_000.png,cat\n")
    params = data_stage_params(
        tmp_path, root, paths={"csv_manifest": str(listing)}, ingest={"num_workers": 0}
    )
    with pytest.raises(PipelineError, match=r"labels.csv: expected a header with columns path,label"):
        ingest.run(params)


def test_symlinks_inside_the_root_follow_the_param(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    os.symlink(root / "class_0" / "img_000.png", root / "class_1" / "alias.png")
    os.symlink(root / "class_0", root / "class_1" / "linked_dir")
    os.symlink(root, root / "class_0" / "loop")
    os.symlink(root / "class_0" / "gone.png", root / "class_0" / "broken.png")

    followed = data_stage_params(tmp_path, root, ingest={"num_workers": 0})
    ingest.run(followed)
    rows = _manifest(followed).set_index("path")
    assert rows.at["class_1/alias.png", "status"] == "ok"
    assert rows.at["class_1/alias.png", "sha256"] == rows.at["class_0/img_000.png", "sha256"]
    assert rows.at["class_1/linked_dir/img_000.png", "label"] == "class_1"
    assert rows.at["class_0/loop", "status"] == "symlink_loop"
    assert rows.at["class_1/linked_dir/loop", "status"] == "symlink_loop"
    assert rows.at["class_0/broken.png", "status"] == "broken_symlink"

    refused = data_stage_params(
        tmp_path, root, ingest={"num_workers": 0, "follow_symlinks_inside_root": False}
    )
    ingest.run(refused)
    rows = _manifest(refused).set_index("path")
    assert rows.at["class_1/alias.png", "status"] == "symlink_not_followed"
    assert "class_1/linked_dir/img_000.png" not in rows.index


def test_inspect_rejects_truncated_files_even_if_pil_was_told_to_accept_them(tmp_path):
    make_image(tmp_path / "full.jpg", 0)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        row = images.inspect(str(tmp_path), 10**6, images.Candidate("cut.jpg", "a"))
        assert row["status"] == "truncated"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the caller's PIL settings are restored"
        assert images.inspect(str(tmp_path), 100, images.Candidate("full.jpg", "a"))["status"] == "too_large"
        assert Image.MAX_IMAGE_PIXELS == saved[1]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved[0]


@pytest.mark.parametrize(
    ("ingest_params", "paths", "message"),
    [
        ({}, {"data_root": "does/not/exist"}, r"paths.data_root: does/not/exist is not a folder"),
        ({"source": "csv"}, {}, r"ingest.source is csv but paths.csv_manifest is not set"),
        ({"source": "presplit"}, {}, r"ingest.source is presplit but .* has no train/ and val/"),
    ],
)
def test_bad_source_settings_are_clear_errors(tmp_path, ingest_params, paths, message):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    params = data_stage_params(tmp_path, root, paths=paths, ingest={"num_workers": 0, **ingest_params})
    with pytest.raises(PipelineError, match=message):
        ingest.run(params)


@pytest.mark.parametrize(
    ("name", "status"), [("photo.jpg", "ok"), ("cut.jpg", "truncated"), ("empty.png", "empty_file")]
)
def test_files_over_the_read_whole_limit_are_streamed_with_the_same_row(tmp_path, name, status):
    make_image(tmp_path / "photo.jpg", 0)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    candidate = images.Candidate(name, "a")

    read_whole = images.inspect(str(tmp_path), 10**6, candidate)
    streamed = images.inspect(str(tmp_path), 10**6, candidate, read_whole_limit=0)

    assert streamed == read_whole
    assert read_whole["status"] == status
    assert read_whole["size_bytes"] == (tmp_path / name).stat().st_size


@pytest.mark.parametrize(
    ("files", "workers", "expected"),
    [(70_000, 2, 1024), (100, 2, 13), (100, 0, 25), (3, 2, 1), (0, 2, 1)],
)
def test_tasks_hold_at_most_chunksize_files_and_each_worker_gets_four(files, workers, expected):
    assert ingest.files_per_task(files, 1024, workers) == expected


def _paths(count: int, prefix: str = "c/") -> list[images.Candidate]:
    return [images.Candidate(f"{prefix}{i:05d}.png", "c") for i in range(count)]


def test_task_ends_come_from_the_paths_so_a_new_file_changes_one_task():
    candidates = _paths(3000)
    ranges = ingest.task_ranges(candidates, 64)
    assert ranges[0][0] == 0 and ranges[-1][1] == 3000
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False))
    assert max(stop - start for start, stop in ranges) <= 64
    assert 20 <= 3000 / len(ranges) <= 40  # half of `most` on average, a little under with the forced cuts

    grown = sorted([*candidates, images.Candidate("c/01500-new.png", "c")], key=lambda c: c.path)
    changed = _tasks(grown, 64) - _tasks(candidates, 64)
    assert 1 <= len(changed) <= 2 and any("c/01500-new.png" in task for task in changed)


def _counting_inspect(monkeypatch, fail_on: str | None = None) -> list[str]:
    """images.inspect as ingest calls it, recording each path; raises on `fail_on` (a crash mid-stage)."""
    seen, real = [], images.inspect

    def inspect(root, max_pixels, candidate, **kwargs):
        if candidate.path == fail_on:
            raise RuntimeError("killed")
        seen.append(candidate.path)
        return real(root, max_pixels, candidate, **kwargs)

    monkeypatch.setattr(images, "inspect", inspect)
    return seen


def test_a_crashed_ingest_resumes_from_its_finished_tasks_and_writes_the_same_manifest(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=40)
    clean = data_stage_params(tmp_path / "clean", root, ingest={"num_workers": 0, "chunksize": 8})
    ingest.run(clean)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, "chunksize": 8})
    seen = _counting_inspect(monkeypatch, fail_on="class_1/img_010.png")

    with pytest.raises(RuntimeError):
        ingest.run(params)
    assert not params.paths.manifest.exists()  # nothing half-written
    finished = len(seen)
    assert finished >= 40

    monkeypatch.undo()  # the crash is over
    seen = _counting_inspect(monkeypatch)
    ingest.run(params)

    assert 0 < len(seen) <= 80 - finished + 8  # what had not finished, and the task the crash was in
    assert "class_0/img_000.png" not in seen
    assert params.paths.manifest.read_bytes() == clean.paths.manifest.read_bytes()
    details = read_json(params.paths.details("ingest"))
    assert details["rows_reused"] == 80 - len(seen) and details["status"] == {"ok": 80}


def test_a_rerun_inspects_only_the_tasks_of_new_and_changed_files(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=60)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, "chunksize": 16})
    ingest.run(params)
    chunk_folder = next(params.paths.cache_dir.glob("ingest-*"))
    before = {path.name for path in chunk_folder.glob("*.json")}
    seen = _counting_inspect(monkeypatch)

    ingest.run(params)
    assert seen == [] and read_json(params.paths.details("ingest"))["rows_reused"] == 120

    old_tasks = _tasks(_candidates_of(params), 16)
    make_image(root / "class_0" / "img_030b.png", 0, seed=99)  # a new image
    changed = root / "class_1" / "img_045.png"
    make_image(changed, 2, seed=5)  # the same name, new pixels
    ingest.run(params)

    new_tasks = _tasks(_candidates_of(params), 16)
    expected = {path for task in new_tasks - old_tasks for path in task}  # the task the new file fell in
    expected |= next(set(task) for task in new_tasks if "class_1/img_045.png" in task)
    assert sorted(seen) == sorted(expected) and len(expected) < 60  # not all 121
    rows = _manifest(params).set_index("path")
    assert rows.at["class_1/img_045.png", "sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    after = {path.name for path in chunk_folder.glob("*.json")}
    assert 2 <= len(before - after) <= 4  # the tasks of the new and the changed file, deleted
    assert len(after) == len(ingest.task_ranges(_candidates_of(params), 16))  # and nothing else stale kept


def _tasks(candidates: list[images.Candidate], most: int) -> set[tuple[str, ...]]:
    ranges = ingest.task_ranges(candidates, most)
    return {tuple(c.path for c in candidates[start:stop]) for start, stop in ranges}


def _candidates_of(params) -> list[images.Candidate]:
    rows = _manifest(params)[["path", "label"]].itertuples(index=False)
    return [images.Candidate(path, label) for path, label in rows]


@pytest.mark.slow
def test_ingest_killed_mid_run_resumes_from_the_tasks_it_finished(tmp_path):
    """A real SIGKILL of `python -m pipeline ingest` and its two workers, while they decode slow files at the
    end of the listing (large PNGs whose pixels compress to nothing)."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=150)
    for k in range(6):
        Image.new("RGB", (6000, 6000), (k, 0, 0)).save(root / "class_1" / f"zz_{k}.png")
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 2, "chunksize": 16})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    command = [sys.executable, "-m", "pipeline", "ingest", "--params", str(params_file)]
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    chunks = params.paths.cache_dir
    deadline = time.monotonic() + 60
    while (
        len(list(chunks.glob("ingest-*/*.json"))) < 10 and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [json.loads(path.read_text()) for path in chunks.glob("ingest-*/[!.]*.json")]  # not temps
    assert not params.paths.manifest.exists(), "ingest ended before the kill: the slow files were not slow"

    ingest.run(params)

    details = read_json(params.paths.details("ingest"))
    rows_finished = sum(sum(counts.values()) for _, counts, _, _ in finished)  # (text, counts, labels, notes)
    assert details["status"] == {"ok": 306} and 80 <= rows_finished <= details["rows_reused"] < 306
    clean = data_stage_params(tmp_path / "clean", root, ingest={"num_workers": 0})
    ingest.run(clean)
    assert params.paths.manifest.read_bytes() == clean.paths.manifest.read_bytes()


def test_unreadable_or_foreign_task_results_are_inspected_again(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=10)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, "chunksize": 4})
    ingest.run(params)
    expected = params.paths.manifest.read_bytes()
    results = sorted(next(params.paths.cache_dir.glob("ingest-*")).glob("*.json"))
    results[0].write_text("{not json")
    results[1].write_text('{"a": 1}')

    ingest.run(params)

    assert params.paths.manifest.read_bytes() == expected
    assert read_json(params.paths.details("ingest"))["rows_reused"] < 20


def test_names_that_are_not_utf8_are_quarantined_and_every_later_writer_copes(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    png = (root / "class_0" / "img_000.png").read_bytes()
    for raw in (b"class_0/bad\xff.png", b"caf\xe9/x.png"):  # a Latin-1 file name, a Latin-1 class folder
        file = os.path.join(os.fsencode(root), raw)
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb") as fh:
            fh.write(png)
    params = data_stage_params(
        tmp_path,
        root,
        ingest={"num_workers": 0},
        validate={"max_bad_fraction": 0.5},
        split={"test": 0.3, "val": 0.2, "train": 0.5},
    )

    assert ingest.run(params)["ok"] == 24

    rows = _manifest(params).set_index("path")
    assert rows.loc["class_0/bad\\xff.png", ["label", "status"]].tolist() == ["class_0", "non_utf8_name"]
    assert rows.loc["caf\\xe9/x.png", ["label", "status"]].tolist() == ["", "non_utf8_name"]
    validate.run(params)
    quarantine = pd.read_csv(params.paths.quarantine, dtype=str, keep_default_na=False)
    assert quarantine.to_dict("records") == [
        {"path": "caf\\xe9/x.png", "label": "", "reason": "non_utf8_name"},
        {"path": "class_0/bad\\xff.png", "label": "class_0", "reason": "non_utf8_name"},
    ]
    split_stage.run(params)
    splits = pd.read_csv(params.paths.splits, dtype=str, keep_default_na=False)
    assert len(splits) == 24 and not splits["path"].str.contains("\\\\").any()


def _csv_params(tmp_path, text: str, **sections):
    """Params reading the CSV manifest `text` (tmp_path/labels.csv) over 2 classes x 2 images."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    listing = tmp_path / "labels.csv"
    listing.write_text(text, encoding="utf-8")
    paths = {"csv_manifest": str(listing)}
    return data_stage_params(tmp_path, root, paths=paths, ingest={"num_workers": 0}, **sections)


def test_csv_rows_that_repeat_an_earlier_row_are_ignored_with_a_note(tmp_path, caplog):
    params = _csv_params(
        tmp_path,
        "path,label,split\n"
        "class_0/img_000.png,cat,train\n"
        "class_1/img_000.png,dog,val\n"
        "./class_0/img_000.png,cat,train\n"  # the same file, spelled another way
        "class_1/img_000.png,dog,validation\n",  # the same split, spelled another way
        validate={"min_images_per_class": 1},
    )

    with caplog.at_level("WARNING"):
        ingest.run(params)

    assert _manifest(params)["path"].tolist() == ["class_0/img_000.png", "class_1/img_000.png"]
    assert read_json(params.paths.details("ingest"))["repeated_csv_rows"] == 2
    assert f"{params.paths.csv_manifest}: ignored 2 row(s) that repeat an earlier row" in caplog.text
    assert "on line(s) 4, 5; delete them" in caplog.text
    assert validate.run(params)["usable"] == 2  # the manifest passes its schema: one row per file


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            "a/x.png,cat\nb/y.png,dog\n./a/x.png,dog\n",
            "1 file(s) listed again with another label or split: 'a/x.png' on lines 2 ('cat'), 4 ('dog'); "
            "decide each file's label (and split), delete its other row(s)",
        ),
        (
            "a/x.png,cat,train\na/x.png,cat,test\n",
            "'a/x.png' on lines 2 ('cat', split 'train'), 3 ('cat', split 'test');",
        ),
        ("a/x.png,cat\n,dog\n", "no path on line(s) 3; give each row its image's path"),
    ],
)
def test_csv_conflicts_are_refused_in_one_line_naming_the_csv_lines_and_the_fix(tmp_path, rows, expected):
    header = "path,label,split\n" if "train" in rows else "path,label\n"
    params = _csv_params(tmp_path, header + rows)
    with pytest.raises(PipelineError) as failure:
        ingest.run(params)
    message = str(failure.value)
    assert message.startswith(f"paths.csv_manifest: {params.paths.csv_manifest}: ") and "\n" not in message
    assert expected in message
    assert not params.paths.manifest.exists()


@pytest.mark.parametrize(
    ("label", "rule"),
    [
        ("cat/dog", "no / or \\, and not . or .."),
        ("../x", "no / or \\, and not . or .."),
        ("..", "no / or \\, and not . or .."),
        ("cat\\dog", "no / or \\, and not . or .."),
        (" cat", "no leading or trailing spaces"),
        ("cat ", "no leading or trailing spaces"),
        ("ca\tt", "no control characters (tab, line break, ...)"),
        ('"cat\ndog"', "no control characters (tab, line break, ...)"),  # quoted over two lines
    ],
)
def test_csv_labels_that_cannot_be_class_names_are_refused_naming_the_line_and_rule(tmp_path, label, rule):
    params = _csv_params(tmp_path, f"path,label\nclass_0/img_000.png,cat\nclass_0/img_001.png,{label}\n")
    shown = repr(label.strip('"') if label.startswith('"') else label)
    with pytest.raises(PipelineError) as failure:
        ingest.run(params)
    assert str(failure.value) == (
        f"paths.csv_manifest: {params.paths.csv_manifest}: 1 label(s) cannot be class names: line 3 {shown} "
        f"({rule}); correct these labels"
    )


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("cat ", "no leading or trailing spaces"),
        (" cat", "no leading or trailing spaces"),
        ("ca\tt", "no control characters (tab, line break, ...)"),
        ("cat\n", "no control characters (tab, line break, ...)"),
    ],
)
def test_class_folders_that_cannot_be_class_names_are_refused_naming_the_folder(tmp_path, name, rule):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    make_image(root / name / "a.png", 0)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0})
    with pytest.raises(PipelineError) as failure:
        ingest.run(params)
    assert str(failure.value) == (
        f"paths.data_root: 1 class folder name(s) under {root} cannot be class names: {name!r} ({rule}); "
        "rename these folders"
    )


def test_unicode_class_names_are_fine_from_folders_and_from_a_csv(tmp_path):
    root = tmp_path / "data"
    for k, name in enumerate(("café", "猫", "Ünïcødé ✓")):
        make_image(root / name / "a.png", k, seed=k)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0})
    ingest.run(params)
    assert set(_manifest(params)["label"]) == {"café", "猫", "Ünïcødé ✓"}

    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\ncafé/a.png,кошка\n猫/a.png,chat noir\n", encoding="utf-8")
    csv_params = data_stage_params(
        tmp_path, root, paths={"csv_manifest": str(listing)}, ingest={"num_workers": 0}
    )
    ingest.run(csv_params)
    assert _manifest(csv_params)[["path", "label", "status"]].values.tolist() == [
        ["café/a.png", "кошка", "ok"],
        ["猫/a.png", "chat noir", "ok"],
    ]


def test_dvc_blockers_are_the_entries_dvc_stats_and_fails_on(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    os.symlink("gone.png", root / "class_0" / "broken.png")
    os.symlink("loop.png", root / "class_0" / "loop.png")  # a link to itself: ELOOP, as dangling for DVC
    os.symlink("nowhere", root / "class_1" / ".hidden")  # DVC hashes hidden entries too
    os.symlink(root / "class_0", root / "linked")  # a folder link: DVC does not walk into it
    os.symlink(tmp_path / "elsewhere.png", root / "class_1" / "away.png")
    make_image(tmp_path / "elsewhere.png", 0)  # a live link that leaves the root is DVC's to hash, fine
    bad_folder = os.path.join(os.fsencode(root), b"caf\xe9")
    os.mkdir(bad_folder)
    os.symlink(b"gone", os.path.join(bad_folder, b"x\xff.png"))  # inside a bad folder: reported once

    dangling, non_utf8, special = images.dvc_blockers(root)

    assert dangling == ["class_0/broken.png", "class_0/loop.png", "class_1/.hidden"]
    assert [os.fsencode(name) for name in non_utf8] == [b"caf\xe9"]
    assert special == []  # regular files, folders and live links only


def _png(path, width, height, rows=None):
    """An RGB PNG of width x height written row by row (little memory however large); `rows` None writes a
    header that claims that size with almost no pixel data after it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        packer = zlib.compressobj(1)
        row = b"\0" + bytes(range(256)) * (3 * width // 256) + b"\7" * (3 * width % 256)
        data = b"".join(packer.compress(row) for _ in range(height if rows else 1))
        data += packer.flush(zlib.Z_FINISH if rows else zlib.Z_SYNC_FLUSH)  # unfinished: PIL says truncated
        fh.write(chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    ("side", "budget_mib", "status"),
    [(13000, None, "over_memory_budget"), (3000, 32, "over_memory_budget"), (3000, 40, "truncated")],
)
def test_an_image_over_the_memory_budget_is_never_decoded(tmp_path, caplog, side, budget_mib, status):
    """PIL holds 4 bytes per RGB pixel: 13000 x 13000 needs 645 MiB, over the default 640 (though under
    max_decode_pixels), 3000 x 3000 needs 34 MiB. A header-only PNG that is decoded comes out truncated."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    _png(root / "class_0" / "poster.png", side, side)
    budget = {} if budget_mib is None else {"max_decode_mib": budget_mib}
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, **budget})

    ingest.run(params)

    row = _manifest(params).set_index("path").loc["class_0/poster.png"]
    assert (row["status"], row["width"], row["height"], row["mode"]) == (status, str(side), str(side), "RGB")
    warned = "ingest.max_decode_mib" in caplog.text and "over_memory_budget" in caplog.text
    assert warned == (status == "over_memory_budget")


@pytest.mark.parametrize(
    ("name", "over", "within"),
    [
        ("flat.png", 3_900_000, 4_100_000),
        ("baseline.jpg", 60_000, 70_000),
        ("progressive.jpg", 3_000_000, 3_100_000),
    ],
)
def test_the_budget_counts_what_the_decode_holds(tmp_path, name, over, within):
    """1000 x 1000 RGB: a PNG is held whole (4 MB); a JPEG is decoded at 1/8 scale (125 x 125 x 4 bytes),
    but a progressive one also keeps every DCT coefficient (2 bytes, 1.5 per pixel at 4:2:0 sampling: 3 MB).
    """
    img = Image.new("RGB", (1000, 1000), (90, 120, 150))
    img.save(tmp_path / name, progressive=name.startswith("progressive"))
    candidate = images.Candidate(name, "a")

    assert (
        images.inspect(str(tmp_path), 10**8, candidate, max_decode_bytes=over)["status"]
        == "over_memory_budget"
    )
    assert images.inspect(str(tmp_path), 10**8, candidate, max_decode_bytes=within)["status"] == "ok"


@pytest.mark.parametrize("progressive", [False, True])
def test_the_reduced_jpeg_decode_still_proves_the_file_whole(tmp_path, progressive):
    """A JPEG is checked at 1/8 scale, but libjpeg reads it to the end: one byte missing is caught. Width and
    height are the EXIF-rotated full size."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    pixels = Image.radial_gradient("L").resize((640, 480)).convert("RGB")
    pixels.save(tmp_path / "whole.jpg", quality=90, progressive=progressive, exif=exif)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:-1])

    whole = images.inspect(str(tmp_path), 10**8, images.Candidate("whole.jpg", "a"), max_decode_bytes=10**8)
    cut = images.inspect(str(tmp_path), 10**8, images.Candidate("cut.jpg", "a"), max_decode_bytes=10**8)

    assert (whole["status"], whole["width"], whole["height"]) == ("ok", 480, 640)
    assert cut["status"] == "truncated"


_PEAK_RSS = """
import json, resource, sys
from pipeline.config import Params
from pipeline.stages import ingest
ingest.run(Params.load(sys.argv[1]))
print(json.dumps({who: resource.getrusage(getattr(resource, "RUSAGE_" + who.upper())).ru_maxrss
                  for who in ("self", "children")}))
"""


@pytest.mark.slow
def test_a_worker_stays_under_one_gib_on_a_150_megapixel_png(tmp_path):
    """12247 x 12247 RGB (150 MP, 572 MiB as PIL holds it) is decoded; a worker's peak RSS (the kernel's
    high-water mark, read in the stage's process once its workers are reaped) stays under 1 GiB. Decoded as
    before (EXIF-rotated and RGB-converted copies of the full image) it peaked at 1.7 GiB."""
    import json
    import subprocess
    import sys

    import yaml

    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    _png(root / "class_0" / "poster.png", 12247, 12247, rows=True)
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()), encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )

    peak_kib = json.loads(done.stdout.strip().splitlines()[-1])
    row = _manifest(params).set_index("path").loc["class_0/poster.png"]
    assert (row["status"], row["width"]) == ("ok", "12247")
    assert 572 * 1024 < peak_kib["children"] < 1024 * 1024, peak_kib


def test_an_image_whose_decode_takes_over_a_third_of_the_budget_is_left_to_the_cache_build(
    tmp_path, monkeypatch
):
    """The square's copies (upright, RGB) may take twice the decode, so ingest makes it only within the
    budget; such an image is still usable, and the cache build decodes it, and only it, itself."""
    import numpy as np

    from pipeline.data import cache
    from pipeline.models import resolve_data_config

    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    Image.new("RGB", (1000, 1000), (200, 30, 60)).save(root / "class_0" / "big.png")  # 4 MB: 3 x 4 > 10 MiB
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0, "max_decode_mib": 10})
    ingest.run(params)

    rows = _manifest(params)
    assert rows.set_index("path").at["class_0/big.png", "status"] == "ok"
    assert read_json(params.paths.details("ingest"))["squares_cached"] == len(rows) - 1
    decoded, load = [], cache._load
    monkeypatch.setattr(cache, "_load", lambda path, config: decoded.append(path) or load(path, config))
    names = [cache.identity(path, sha) for path, sha in zip(rows["path"], rows["sha256"], strict=True)]
    files = [root / path for path in rows["path"]]
    built = cache.build_cache(files, names, resolve_data_config(params.model), params.paths.cache_dir, 1)
    assert decoded == [root / "class_0" / "big.png"]
    assert np.all(cache.open_cache(built)[list(rows["path"]).index("class_0/big.png")][0] == 200)


def test_the_backbone_preprocessing_is_resolved_once_then_read_without_torch(tmp_path):
    """Resolving it imports timm and torch (2.5 s, and 400 MB every forked worker inherits); a later run
    reads it back from the cache, and a change of model.image_size resolves it anew."""
    code = (
        "import json, sys; from pipeline.config import ModelParams; from pipeline.stages import ingest; "
        "config = ingest._cache_config(ModelParams(image_size=int(sys.argv[2])), __import__('pathlib').Path("
        "sys.argv[1])); print(json.dumps([config['input_size'], 'torch' in sys.modules]))"
    )

    def resolve(size: int) -> list:
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path), str(size)], capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    assert resolve(64) == [[3, 64, 64], True]
    assert resolve(64) == [[3, 64, 64], False]
    assert resolve(96) == [[3, 96, 96], True]

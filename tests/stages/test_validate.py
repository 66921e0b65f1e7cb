"""Validate: reports on clean data, the schema gate, leakage across given splits, and how severities act."""

from __future__ import annotations

import logging
import re

import pandas as pd
import pytest
from helpers import assert_headline_metrics, data_stage_params, make_image, make_image_folder

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.stages import ingest, validate


def _ingested(tmp_path, root, **sections):
    params = data_stage_params(tmp_path, root, ingest={"num_workers": 0}, **sections)
    ingest.run(params)
    return params


def test_clean_dataset_passes_and_writes_every_report(image_folder, tmp_path):
    params = _ingested(tmp_path, image_folder)

    summary = validate.run(params)

    assert summary == {"files": 36, "usable": 36, "quarantined": 0, "classes": 3, "errors": 0, "warnings": 0}
    assert params.paths.validated.read_bytes() == params.paths.manifest.read_bytes()
    assert params.paths.quarantine.read_text() == "path,label,reason\n"
    metrics = read_json(params.paths.metrics("validate"))
    assert metrics == summary
    assert_headline_metrics(metrics, ["class_0", "class_1", "class_2"])
    details = read_json(params.paths.details("validate"))
    assert details["images_per_class"] == {"class_0": 12, "class_1": 12, "class_2": 12}
    assert details["rows"] == 36 and details["status"] == {"ok": 36}
    assert all(rule["passed"] for rule in details["rules"].values())
    assert details["rules"]["min_side"]["observed"] == 32
    report = params.paths.reports_dir / "validate"
    assert (report / "class_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "data_docs" / "index.html").is_file()
    pages = {page.name for page in (report / "data_docs" / "validations").rglob("*.html")}
    assert pages == {f"manifest-{frame}.html" for frame in ("files", "duplicates", "classes", "summary")}
    files_page = next((report / "data_docs" / "validations").rglob("manifest-files.html")).read_text()
    assert "min_side" in files_page and "pixels" in files_page  # GX's own views show the checked columns
    sections = _sections((report / "index.html").read_text(encoding="utf-8"))
    assert list(sections) == ["headline", "rules", "classes", "quarantine", "data-docs", "raw"]
    assert '<div class="value good">passed</div>' in sections["headline"]
    assert (
        sections["rules"].count("<td>passed</td>") == 8
        and "each image: min_side \u2265 16" in sections["rules"]
    )
    assert '<a href="data_docs/index.html">' in sections["data-docs"] and "internet" in sections["data-docs"]


def _sections(page: str) -> dict[str, str]:
    for forbidden in ("http://", "https://", "<script", "<link", "url("):
        assert forbidden not in page, forbidden
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.S))


def test_page_shows_the_verdict_every_rule_and_the_first_rows_of_the_quarantine(image_folder, tmp_path):
    for i in range(53):  # shorter side 8 px < validate.min_side: quarantined (a warning)
        make_image(image_folder / "class_1" / f"tiny_{i:02d}.png", 1, size=8, seed=900 + i)
    for i in range(3):  # 3 < validate.min_images_per_class: an error
        make_image(image_folder / "rare" / f"{i}.png", 2, seed=500 + i)
    params = _ingested(tmp_path, image_folder)
    with pytest.raises(PipelineError):
        validate.run(params)

    sections = _sections((params.paths.reports_dir / "validate" / "index.html").read_text(encoding="utf-8"))
    headline = sections["headline"]
    assert '<div class="value bad">FAILED (1 error(s))</div>' in headline
    assert "rule min_images_per_class failed: classes [&#x27;rare&#x27; (3)]" in headline
    for label, value in (
        ("files", 92),
        ("usable", 39),
        ("quarantined", 53),
        ("classes with usable images", 4),
    ):
        assert f'{value}</div><div class="label">{label}</div>' in headline, label
    rules = dict(re.findall(r"<tr><td>(\w+)</td><td>\w+</td><td>([^<]+)</td>", sections["rules"]))
    assert rules["min_side"] == "FAILED (warning)" and rules["min_images_per_class"] == "FAILED (error)"
    assert rules["max_pixels"] == "passed" and len(rules) == 8
    assert "53 image(s) smaller than 16 px on a side" in sections["rules"]
    quarantine = sections["quarantine"]
    assert quarantine.count("<td>min_side</td>") == 50  # the first 50 rows, then a count of the rest
    assert "... and 3 more in" in quarantine and str(params.paths.quarantine) in quarantine
    assert "data:image/png;base64," in sections["classes"] and "<td>rare</td>" in sections["classes"]


@pytest.mark.parametrize("line_break_in_a_path", [False, True])
def test_validated_holds_the_manifest_rows_of_the_usable_files(tmp_path, line_break_in_a_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    make_image(root / "class_1" / "tiny.png", 1, size=8)  # below validate.min_side: quarantined (warning)
    if line_break_in_a_path:  # quoted over two lines in the manifest: the rows are formatted, not copied
        make_image(root / "class_0" / "two\nlines.png", 0, seed=99)
    params = _ingested(tmp_path, root)

    validate.run(params)

    manifest = pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False)
    validated = pd.read_csv(params.paths.validated, dtype=str, keep_default_na=False)
    usable = manifest[manifest["path"] != "class_1/tiny.png"].reset_index(drop=True)
    pd.testing.assert_frame_equal(validated, usable)
    assert ("class_0/two\nlines.png" in set(validated["path"])) == line_break_in_a_path
    kept = [line for line in params.paths.manifest.read_text().splitlines(True) if "tiny.png" not in line]
    assert params.paths.validated.read_text() == "".join(kept)


def test_schema_violations_name_the_columns_and_lines(image_folder, tmp_path):
    params = _ingested(tmp_path, image_folder)
    manifest = pd.read_csv(params.paths.manifest, dtype=str, keep_default_na=False)
    manifest.loc[1, "path"] = manifest.loc[0, "path"]
    manifest.loc[2, "status"] = "fine"
    manifest.loc[3, "width"] = "wide"
    manifest.to_csv(params.paths.manifest, index=False)

    with pytest.raises(PipelineError) as caught:
        validate.run(params)

    message = str(caught.value)
    assert "does not match the manifest schema" in message and "re-run `python -m pipeline ingest`" in message
    assert "column 'path': field_uniqueness failed at lines [2, 3]" in message
    assert "column 'status': isin" in message and "'fine'" in message
    assert "column 'width'" in message and "'wide'" in message


def test_missing_manifest_says_to_run_ingest(tmp_path):
    params = data_stage_params(tmp_path, tmp_path)
    with pytest.raises(PipelineError, match=r"paths.manifest: .* not found; run `python -m pipeline ingest`"):
        validate.run(params)


@pytest.fixture
def leaky_presplit(tmp_path):
    root = tmp_path / "data"
    for s, split in enumerate(("train", "val", "test")):
        for k in range(2):
            for i in range(4):
                make_image(root / split / f"c{k}" / f"{i}.png", k, seed=100 * s + 10 * k + i)
    (root / "test" / "c0" / "copy.png").write_bytes((root / "train" / "c0" / "0.png").read_bytes())
    return root


def test_split_leakage_is_an_error_by_default(leaky_presplit, tmp_path):
    params = _ingested(tmp_path, leaky_presplit, validate={"min_images_per_class": 2})
    with pytest.raises(PipelineError) as caught:
        validate.run(params)
    message = str(caught.value)
    assert "rule split_leakage failed: 1 group(s) of identical files in two splits" in message
    assert "'test/c0/copy.png' (test) = 'train/c0/0.png' (train)" in message
    assert "validate.severity.split_leakage: warning" in message


def test_a_large_group_of_copies_is_named_by_its_first_files_and_its_size(leaky_presplit, tmp_path):
    for i in range(4):  # six copies of one file in all: a blank image in a big data set has hundreds
        (leaky_presplit / "val" / "c0" / f"copy{i}.png").write_bytes(
            (leaky_presplit / "train" / "c0" / "0.png").read_bytes()
        )
    params = _ingested(tmp_path, leaky_presplit, validate={"min_images_per_class": 2})
    with pytest.raises(PipelineError) as caught:
        validate.run(params)
    message = str(caught.value)
    assert "1 group(s) of identical files in two splits" in message
    named = "'test/c0/copy.png' (test) = 'train/c0/0.png' (train) = 'val/c0/copy0.png' (val) = ... (6 files)"
    assert named in message and "copy1" not in message


def test_split_leakage_as_warning_quarantines_the_copy_outside_train(leaky_presplit, tmp_path, caplog):
    params = _ingested(
        tmp_path,
        leaky_presplit,
        validate={"min_images_per_class": 2, "severity": {"split_leakage": "warning"}},
    )
    with caplog.at_level(logging.WARNING):
        validate.run(params)
    assert "rule split_leakage (warning)" in caplog.text
    quarantine = pd.read_csv(params.paths.quarantine, dtype=str)
    assert quarantine.to_dict("records") == [
        {"path": "test/c0/copy.png", "label": "c0", "reason": "split_leakage"}
    ]
    validated = pd.read_csv(params.paths.validated, dtype=str)
    assert "train/c0/0.png" in set(validated["path"])


def test_a_rule_set_off_is_neither_checked_nor_excluding(image_folder, tmp_path):
    make_image(image_folder / "class_0" / "tiny.png", 0, size=8)
    params = _ingested(tmp_path, image_folder, validate={"severity": {"min_side": "off"}})

    validate.run(params)

    assert "class_0/tiny.png" in set(pd.read_csv(params.paths.validated)["path"])
    assert read_json(params.paths.details("validate"))["rules"]["min_side"] == {"severity": "off"}


def test_small_class_is_kept_as_a_warning_and_fails_as_an_error(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    for i in range(3):
        make_image(root / "rare" / f"{i}.png", 2, seed=500 + i)
    warn = _ingested(tmp_path, root, validate={"severity": {"min_images_per_class": "warning"}})
    with caplog.at_level(logging.WARNING):
        validate.run(warn)
    assert "classes ['rare' (3)] have fewer than 10 usable images" in caplog.text
    assert (pd.read_csv(warn.paths.validated)["label"] == "rare").sum() == 3

    fail = data_stage_params(tmp_path, root)  # default: min_images_per_class is an error
    with pytest.raises(PipelineError) as caught:
        validate.run(fail)
    assert str(caught.value).startswith(
        "rule min_images_per_class failed: classes ['rare' (3)] have fewer than 10 usable images; "
        "add images or lower validate.min_images_per_class "
        "(or set validate.severity.min_images_per_class: warning)"
    )
    assert not fail.paths.validated.exists(), "a failed validate must not leave the previous validated rows"
    assert read_json(fail.paths.metrics("validate"))["errors"] == 1
    rule = read_json(fail.paths.details("validate"))["rules"]["min_images_per_class"]
    assert (
        rule["passed"] is False and rule["detail"] == "classes ['rare' (3)] have fewer than 10 usable images"
    )


def test_one_class_is_told_to_add_a_second_class_not_to_lower_min_classes(tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        make_image(root / "cats" / f"{i}.png", 0, seed=i)
    with pytest.raises(PipelineError) as caught:
        validate.run(_ingested(tmp_path, root))
    first = str(caught.value).splitlines()[0]
    assert first == (
        "rule min_classes failed: 1 class(es) with usable images ['cats'], need at least 2; a classifier "
        "needs at least 2 classes: add a second class (a folder of its images under paths.data_root, or rows "
        "with its label in paths.csv_manifest)"
    )


def test_fewer_classes_than_min_classes_above_2_may_lower_the_param(image_folder, tmp_path):
    with pytest.raises(PipelineError) as caught:
        validate.run(_ingested(tmp_path, image_folder, validate={"min_classes": 4}))
    assert str(caught.value).splitlines()[0] == (
        "rule min_classes failed: 3 class(es) with usable images ['class_0', 'class_1', 'class_2'], need at "
        "least 4; add class folders or lower validate.min_classes "
        "(or set validate.severity.min_classes: warning)"
    )


@pytest.mark.parametrize(("classes", "widest"), [(12, 800), (1000, 1300)])
def test_the_class_plot_keeps_a_readable_width_with_a_thousand_classes(classes, widest):
    """A named bar per class made 1,000 classes a 50,200 px wide image that took 5.8 s to draw."""
    import io

    from PIL import Image

    from pipeline.stages.validate import page

    labels = [f"class_{k:04d}" for k in range(classes)]
    counts = pd.DataFrame({"label": labels, "images": [100 + k % 7 for k in range(classes)]})
    manifest = pd.DataFrame({"path": [f"{label}/0.png" for label in labels], "label": labels, "status": "ok"})

    png = page.plot_distribution(counts, manifest, {labels[3]: "min_side"}, 10)

    assert Image.open(io.BytesIO(png)).width <= widest

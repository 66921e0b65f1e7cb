"""report.html and its figures: self-contained, escaped, every section present; dvclive curves read."""

from __future__ import annotations

import base64
import re
from io import BytesIO

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import report
from pipeline.calibration import reliability

EVIL = "<script>alert(1)</script>"


def _is_png(data: bytes) -> tuple[int, int]:
    with Image.open(BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def figures() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, size=40)
    rel = reliability(probs, labels, 10)
    tile = report.Tile(Image.new("RGB", (20, 20), (200, 10, 10)), "true: a\npred: b (0.91)")
    return {
        "confusion_matrix": report.confusion_png(
            np.array([[3, 1, 0], [0, 2, 2], [1, 0, 4]]), ["a", "b", EVIL]
        ),
        "reliability": report.reliability_png(rel, rel, 1.5),
        "per_class_f1": report.per_class_f1_png(["a", "b", EVIL], [0.5, 1.0, 0.0]),
        "mistakes": report.mistakes_png([tile] * 5, "none"),
    }


def _data(figures: dict[str, bytes], **overrides) -> report.ReportData:
    fields = dict(
        run_summary=[("backbone", "test_efficientnet"), ("learning rate", 1e-5)],
        class_names=["a", "b", EVIL],
        split_counts=pd.DataFrame(
            {"train": [5, 5, 5], "test": [2, 2, 2]}, index=pd.Index(["a", "b", EVIL], name="class")
        ),
        stage_metrics={"validate": {"quarantined": 4, "per_class": {"a": 10}}, "split": None},
        test_metrics=[("accuracy", 0.75), ("n_test", 6)],
        per_class=pd.DataFrame(
            {
                "class": ["a", "b", EVIL],
                "precision": [1.0, 0.5, 0.0],
                "recall": [0.5, 0.5, 0.0],
                "f1": [0.66, 0.5, 0.0],
                "support": [2, 2, 2],
            }
        ),
        mistakes=pd.DataFrame(
            {"path": [f"x/{EVIL}.png"], "label": ["a"], "pred": ["b"], "confidence": [0.9]}
        ),
        figures=figures,
        curves_png=None,
        curves_note="No training curves found under dvclive/plots/metrics",
    )
    fields.update(overrides)
    return report.ReportData(**fields)


def test_figures_are_pngs_including_the_empty_gallery(figures):
    for name, data in figures.items():
        width, height = _is_png(data)
        assert width > 100 and height > 100, name
    assert _is_png(report.mistakes_png([], "No mistakes on the test split"))[0] > 100


def test_report_is_self_contained_and_escapes_text(figures):
    page = report.render_report(_data(figures))
    for forbidden in ("http://", "https://", 'src="http', "<script", "<link", "url("):
        assert forbidden not in page, forbidden
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    for encoded in images:
        _is_png(base64.b64decode(encoded))


def test_report_has_every_section_and_the_figures_it_was_given(figures):
    page = report.render_report(_data(figures))
    for title in (
        "Run summary",
        "Data summary",
        "Training curves",
        "Test metrics",
        "Per-class metrics",
        "Confusion matrix",
        "Calibration",
        "Most confident mistakes",
    ):
        assert f"<h2>{title}</h2>" in page
    assert "test_efficientnet" in page and "1e-05" in page  # small numbers are not printed as 0.0000
    assert "<strong>quarantined</strong>: 4" in page and "per_class.a" in page
    assert "No metrics file from the split stage." in page
    assert "No training curves found" in page
    assert "0.7500" in page


def test_report_embeds_training_curves_when_given(figures):
    page = report.render_report(_data(figures, curves_png=figures["reliability"]))
    assert "No training curves found" not in page
    assert page.count("data:image/png;base64,") == 5


def test_read_training_curves_reads_dvclive_tsvs(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loss.tsv").write_text("step\tloss\n0\t1.5\n1\t1.0\n")
    (tmp_path / "val_acc.tsv").write_text("timestamp\tstep\tval_acc\n111\t0\t0.4\n222\t1\t0.6\n")
    (tmp_path / "notes.tsv").write_text("a\tb\n1\t2\n")  # no step column: not a curve
    curves = report.read_training_curves(tmp_path)
    assert set(curves) == {"train/loss", "val_acc"}
    assert curves["train/loss"]["value"].tolist() == [1.5, 1.0]
    assert curves["val_acc"]["step"].tolist() == [0, 1] and curves["val_acc"]["value"].tolist() == [0.4, 0.6]
    _is_png(report.training_curves_png(curves))


@pytest.mark.parametrize(
    ("name", "panel"),
    [("train/loss", "loss"), ("val/loss", "loss"), ("val_acc", "acc"), ("train/acc", "acc"), ("lr", "lr")],
)
def test_train_and_val_series_share_a_panel(name, panel):
    assert report._panel_of(name) == panel

"""report.html and its figures: self-contained, escaped, every section present; dvclive curves read."""

from __future__ import annotations

import base64
import re
from io import BytesIO

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline.calibration import reliability
from pipeline.pages import report

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
        test_metrics={
            "accuracy": 0.75,
            "balanced_accuracy": 0.625,
            "f1_macro": 0.5,
            "ece_after": 0.0321,
            "n_test": 6,
        },
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
        links={name: f"../{name}/index.html" for name in report.LINKED},
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
    for key, title in report.SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    assert "test_efficientnet" in page and "1e-05" in page  # small numbers are not printed as 0.0000
    assert "<strong>quarantined</strong>: 4" in page and "per_class.a" in page
    assert "No metrics file from the split stage." in page
    assert "No training curves found" in page
    assert "0.7500" in page


def _section(page: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', page, re.S).group(1)


def test_report_reads_headline_first_then_curves_then_detail_then_raw_tables(figures):
    page = report.render_report(_data(figures, curves_png=figures["reliability"]))
    starts = [
        page.index(f'<section id="{key}">')
        for key in ("headline", "curves", "per-class", "confusion", "mistakes", "data", "raw")
    ]
    assert starts == sorted(starts)
    headline = _section(page, "headline")
    for figure in ("75.0%", "62.5%", "0.500", "0.032"):  # accuracy, balanced accuracy, macro F1, ECE
        assert figure in headline, figure
    assert '<a href="../export/index.html">' in headline and "Quantize and export: see" in headline
    raw = _section(page, "raw")
    assert raw.count("<details>") == 4  # run settings, test metrics, validate and split stage metrics
    assert raw.count("<table>") == 3  # the split stage wrote no metrics file
    assert "<details>" not in page.split('<section id="raw">')[0]  # nothing above the raw tables is hidden
    assert '<a href="../validate/index.html">' in _section(page, "data")


def test_report_embeds_training_curves_when_given(figures):
    page = report.render_report(_data(figures, curves_png=figures["reliability"], curves_note="Per epoch."))
    assert "No training curves found" not in page and "Per epoch." in _section(page, "curves")
    assert page.count("data:image/png;base64,") == 5


def _curves(epochs: int, head_epochs: int | None) -> dict[str, pd.DataFrame]:
    """dvclive-like series as read_training_curves returns them; head_only 1 for the first head_epochs."""
    epoch = np.arange(1, epochs + 1)
    curves = {
        name: pd.DataFrame({"epoch": epoch, "value": np.linspace(1.0, 0.5, epochs)})
        for name in ("train/loss", "val/loss", "val/acc", "lr")
    }
    speed = np.where(epoch <= (head_epochs or 0), 5000.0, 50.0)
    curves["images_per_s"] = pd.DataFrame({"epoch": epoch, "value": speed})
    if head_epochs is not None:
        curves["head_only"] = pd.DataFrame({"epoch": epoch, "value": (epoch <= head_epochs).astype(float)})
    return curves


def test_read_training_curves_numbers_epochs_from_one(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loss.tsv").write_text("step\tloss\n0\t1.5\n1\t1.0\n")
    (tmp_path / "val_acc.tsv").write_text("timestamp\tstep\tval_acc\n111\t0\t0.4\n222\t1\t0.6\n")
    (tmp_path / "notes.tsv").write_text("a\tb\n1\t2\n")  # no step column: not a curve
    curves = report.read_training_curves(tmp_path)
    assert set(curves) == {"train/loss", "val_acc"}
    assert curves["train/loss"]["value"].tolist() == [1.5, 1.0]
    assert curves["val_acc"]["epoch"].tolist() == [1, 2] and curves["val_acc"]["value"].tolist() == [0.4, 0.6]
    _is_png(report.training_curves_png(curves))


@pytest.mark.parametrize(
    ("flags", "spans"),
    [
        ([1, 1, 0, 0, 0], [(1, 2)]),
        ([0, 0, 0], []),
        ([1, 1, 1], [(1, 3)]),
        ([1, 0, 1, 1, 0], [(1, 1), (3, 4)]),
    ],
)
def test_head_only_spans(flags, spans):
    frame = pd.DataFrame({"epoch": range(1, len(flags) + 1), "value": [float(f) for f in flags]})
    assert report.head_only_spans({"head_only": frame}) == spans


def test_curves_are_per_epoch_with_the_head_only_phase_shaded():
    fig = report.training_curves_figure(_curves(epochs=6, head_epochs=2))
    axes = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert "head_only" not in " ".join(axes)  # the phase marks the panels, it is not a panel itself
    for title, ax in axes.items():
        assert ax.get_xlabel() == "epoch", title
        assert ax.get_xlim() == (0.5, 6.5), title
        spans = [p.get_x() for p in ax.patches if isinstance(p, Rectangle) and p.get_width() == 2.0]
        assert spans == [0.5], title  # epochs 1-2 shaded
        boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
        assert boundaries == [2.5], title  # one line where fine-tuning starts
        for line in ax.lines:
            if line.get_linestyle() != "--" and title != "images/s (fine-tuning epochs only)":
                assert list(line.get_xdata()) == [1, 2, 3, 4, 5, 6], title
    speed = axes["images/s (fine-tuning epochs only)"].lines[0]
    assert list(speed.get_xdata()) == [3, 4, 5, 6] and set(speed.get_ydata()) == {50.0}
    assert "Shaded: head-only epochs (1-2)" in report.curves_note(_curves(6, 2))
    assert "Every epoch trained the head only" in report.curves_note(_curves(3, 3))


def test_curves_without_a_phase_series_mark_nothing_and_keep_every_epoch():
    fig = report.training_curves_figure(_curves(epochs=4, head_epochs=None))
    axes = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert list(axes["images/s"].lines[0].get_xdata()) == [1, 2, 3, 4]
    assert not any(ax.patches for ax in axes.values())
    assert "Shaded" not in report.curves_note(_curves(4, None))
    assert report.training_curves_png({"head_only": _curves(2, 1)["head_only"]}) is None


@pytest.mark.parametrize(
    ("name", "panel"),
    [
        ("train/loss", "loss"),
        ("val/loss", "loss"),
        ("val_acc", "acc"),
        ("train/acc", "acc"),
        ("lr", "lr"),
        ("images_per_s", "images_per_s"),
    ],
)
def test_train_and_val_series_share_a_panel(name, panel):
    assert report._panel_of(name) == panel


def test_with_many_classes_the_confusion_matrix_shows_those_with_the_most_mistakes(monkeypatch):
    classes = 200
    matrix = np.diag(np.full(classes, 50))
    matrix[7, 150], matrix[150, 7], matrix[33, 34] = 9, 6, 4  # 7 and 150 mixed up most, then 33 and 34
    assert report._most_mistaken(matrix, 3).tolist() == [7, 33, 150]  # a tie goes to the first class
    assert report._most_mistaken(matrix[:3, :3], 40).tolist() == [0, 1, 2]  # few classes: all, in order
    drawn = []
    figure = report._figure
    monkeypatch.setattr(report, "_figure", lambda *size: drawn.append(figure(*size)) or drawn[-1])
    report.confusion_png(matrix, [f"class{i:03d}" for i in range(classes)])
    ticks = [label.get_text() for label in drawn[0].axes[0].get_xticklabels()]
    assert len(ticks) == report.PLOTTED_CLASSES_MAX and {"class007", "class150", "class033"} <= set(ticks)


def test_with_many_classes_the_f1_chart_shows_the_lowest():
    f1 = np.linspace(0.5, 1.0, 1000)
    tall = Image.open(BytesIO(report.per_class_f1_png([f"c{i}" for i in range(1000)], f1)))
    forty = Image.open(BytesIO(report.per_class_f1_png([f"c{i}" for i in range(40)], f1[:40])))
    assert tall.size[1] <= forty.size[1] * 1.05  # 40 bars, not 1,000 (a 300-inch figure)

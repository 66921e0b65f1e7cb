"""Evaluation figures (PNG bytes) and the self-contained `report.html` that shows a whole run.

Figures use `matplotlib.figure.Figure` with the Agg canvas directly, so nothing touches pyplot's global state
and importing this module configures nothing. The HTML has inline CSS and base64-embedded PNGs only: it opens
offline, from a file, anywhere (DVC's own plots HTML pulls vega from a CDN and does not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.calibration import Reliability
from pipeline.config import PathsParams
from pipeline.io import read_optional_json
from pipeline.pages import page

_ANNOTATE_MAX_CLASSES = 20  # beyond this, numbers inside confusion cells become unreadable
_MAX_CURVE_PANELS = 6
_MAX_EPOCH_TICKS = 20  # up to this many epochs, every one is labelled
_SPLIT_TOKENS = {"train", "training", "val", "valid", "validation", "test", "eval"}
_THROUGHPUT_PANEL = "images_per_s"
HEAD_ONLY_SERIES = "head_only"  # the dvclive series (pipeline.stages.train) that marks each epoch's phase


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()


# Beyond this many classes the confusion matrix and the F1 bars show the classes with the most mistakes
# (a thousand classes: 2,000 tick labels took matplotlib minutes and no reader finds a cell among a million).
PLOTTED_CLASSES_MAX = 40


def _most_mistaken(matrix: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the `limit` classes with the most mistakes (images of them missed, plus images predicted as
    them wrongly), in class order; all classes when there are no more than `limit`."""
    if len(matrix) <= limit:
        return np.arange(len(matrix))
    wrong = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
    return np.sort(np.argsort(-wrong, kind="stable")[:limit])


def confusion_png(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Counts and row-normalised (per-true-class recall) confusion matrices side by side. Rows: true class.
    More than PLOTTED_CLASSES_MAX classes: those with the most mistakes (row-normalised over all columns)."""
    shown = _most_mistaken(matrix, PLOTTED_CLASSES_MAX)
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    matrix, normalised = matrix[np.ix_(shown, shown)], normalised[np.ix_(shown, shown)]
    names = [class_names[i] for i in shown]
    k = len(names)
    side = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig = _figure(2 * side + 1.5, side)
    subset = "" if k == len(row_sums) else f" ({k} of {len(row_sums)} classes: most mistakes)"
    panels = ((matrix, "Counts" + subset, "{:d}"), (normalised, "Row-normalised", "{:.2f}"))
    for ax, (data, title, fmt) in zip(fig.subplots(1, 2), panels, strict=True):
        image = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
        if k <= _ANNOTATE_MAX_CLASSES:
            threshold = data.max() / 2 if data.max() > 0 else 1
            for (i, j), value in np.ndenumerate(data):
                colour = "white" if value > threshold else "black"
                text = fmt.format(int(value) if fmt == "{:d}" else value)
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    return _png(fig)


def reliability_png(before: Reliability, after: Reliability, temperature: float) -> bytes:
    """Reliability diagrams before and after temperature scaling: accuracy per confidence bin vs diagonal."""
    fig = _figure(10, 4.5)
    panels = (
        (before, f"Before (T = 1): ECE {before.ece:.3f}"),
        (after, f"After (T = {temperature:.3g}): ECE {after.ece:.3f}"),
    )
    for ax, (rel, title) in zip(fig.subplots(1, 2, sharey=True), panels, strict=True):
        width = np.diff(rel.edges)
        left = rel.edges[:-1]
        filled = rel.counts > 0
        ax.bar(
            left[filled],
            rel.accuracy[filled],
            width=width[filled],
            align="edge",
            color="tab:blue",
            edgecolor="black",
            label="accuracy",
        )
        gap_bottom = np.minimum(rel.accuracy, rel.confidence)[filled]
        gap = np.abs(rel.accuracy - rel.confidence)[filled]
        ax.bar(
            left[filled],
            gap,
            bottom=gap_bottom,
            width=width[filled],
            align="edge",
            color="tab:red",
            alpha=0.35,
            hatch="//",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("Confidence (top-1 probability)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
    fig.axes[0].set_ylabel("Accuracy")
    return _png(fig)


def per_class_f1_png(class_names: Sequence[str], f1: Sequence[float]) -> bytes:
    """F1 per class, one bar each; more than PLOTTED_CLASSES_MAX classes: the lowest ones."""
    f1 = np.asarray(f1, dtype=float)
    shown = np.arange(len(f1))
    if len(f1) > PLOTTED_CLASSES_MAX:
        shown = np.sort(np.argsort(f1, kind="stable")[:PLOTTED_CLASSES_MAX])
    k = len(shown)
    fig = _figure(7, max(2.5, 0.3 * k + 1.2))
    ax = fig.subplots()
    positions = np.arange(k)
    ax.barh(positions, f1[shown], color="tab:green")
    ax.set_yticks(positions, [class_names[i] for i in shown])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    lowest = "" if k == len(f1) else f" (the {k} lowest of {len(f1)} classes)"
    ax.set_xlabel("F1 on the test split" + lowest)
    for y, value in zip(positions, f1[shown], strict=True):
        ax.text(min(value + 0.01, 0.9), y, f"{value:.2f}", va="center", fontsize=8)
    return _png(fig)


def coverage_png(conformal: dict[str, Any]) -> bytes:
    """Conformal sets on the test split: coverage per class against the 1 - alpha target (left), and images
    and coverage per set size (right). `conformal`: evaluate's details["conformal"]."""
    target = 1.0 - conformal["alpha"]
    per_class = conformal["coverage_per_class"]
    by_size = {int(size): figures for size, figures in conformal["coverage_by_size"].items()}
    fig = _figure(11, max(3.0, 0.3 * len(per_class) + 1.4))
    left, right = fig.subplots(1, 2)
    positions = np.arange(len(per_class))
    values = list(per_class.values())
    left.barh(positions, values, color=["tab:red" if v < target else "tab:blue" for v in values])
    left.axvline(target, color="black", linestyle="--", linewidth=1, label=f"1 - alpha = {target:.2f}")
    left.set_yticks(positions, list(per_class))
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("Coverage: true class in the set (test split)")
    left.legend(loc="lower left", fontsize=8)
    sizes = sorted(by_size)
    right.bar(sizes, [by_size[s]["images"] for s in sizes], color="tab:gray")
    for size in sizes:
        right.annotate(
            f"{by_size[size]['coverage']:.0%}",
            (size, by_size[size]["images"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_xticks(sizes)
    right.set_xlabel("Set size (classes); label: coverage of those sets")
    right.set_ylabel("Test images")
    return _png(fig)


@dataclass(frozen=True)
class Tile:
    image: Image.Image
    title: str


def mistakes_png(tiles: Sequence[Tile], empty_message: str) -> bytes:
    """A grid of image tiles with their titles; a PNG carrying `empty_message` when there are none."""
    if not tiles:
        fig = _figure(6, 1.5)
        fig.text(0.5, 0.5, empty_message, ha="center", va="center", fontsize=14)
        return _png(fig)
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    fig = _figure(2.8 * cols, 3.1 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, tile in zip(axes, tiles, strict=False):
        ax.imshow(np.asarray(tile.image), interpolation="nearest")
        ax.set_title(tile.title, fontsize=8)
    return _png(fig)


def read_training_curves(folder: Path) -> dict[str, pd.DataFrame]:
    """dvclive metric TSVs under `folder` -> {name relative to folder: frame of (epoch, value)}.

    train logs one dvclive step per epoch, so step 0..N-1 is epoch 1..N, the count its log lines use."""
    curves: dict[str, pd.DataFrame] = {}
    for tsv in sorted(Path(folder).rglob("*.tsv")):
        frame = pd.read_csv(tsv, sep="\t")
        values = [c for c in frame.columns if c not in ("step", "timestamp")]
        if "step" not in frame.columns or not values:
            continue
        column = tsv.stem if tsv.stem in values else values[-1]
        name = tsv.relative_to(folder).with_suffix("").as_posix()
        curves[name] = pd.DataFrame({"epoch": frame["step"] + 1, "value": frame[column]})
    return curves


def _panel_of(name: str) -> str:
    """'train/loss', 'val/loss', 'val_loss' -> 'loss': series that differ only by split share a panel."""
    tokens = [t for t in re.split(r"[/_\-.]", name.lower()) if t and t not in _SPLIT_TOKENS]
    return "_".join(tokens) or name


def head_only_spans(curves: dict[str, pd.DataFrame]) -> list[tuple[int, int]]:
    """(first, last) epochs of each run of head-only epochs (train's `head_only` series is 1 for an epoch that
    trained the head on cached backbone features); [] when the series is missing or all zero."""
    frame = curves.get(HEAD_ONLY_SERIES)
    if frame is None:
        return []
    epochs = sorted(int(e) for e, v in zip(frame["epoch"], frame["value"], strict=True) if v > 0.5)
    spans: list[tuple[int, int]] = []
    for epoch in epochs:
        if spans and spans[-1][1] == epoch - 1:
            spans[-1] = (spans[-1][0], epoch)
        else:
            spans.append((epoch, epoch))
    return spans


def _throughput_of_one_phase(frame: pd.DataFrame, spans: list[tuple[int, int]]) -> tuple[pd.DataFrame, str]:
    """images/s of the fine-tuning epochs only (head-only epochs on cached features run 10-100x faster and
    would flatten the rest), or of the head-only ones when there are no others; with the panel's title."""
    head = frame["epoch"].apply(lambda e: any(a <= e <= b for a, b in spans))
    if not head.any():
        return frame, "images/s"
    if head.all():
        return frame, "images/s (head-only epochs, cached features)"
    return frame[~head], "images/s (fine-tuning epochs only)"


def training_curves_figure(curves: dict[str, pd.DataFrame]) -> Any:
    """One panel per metric (loss first, then accuracy) against the epoch, train and val series overlaid,
    head-only epochs shaded and a dashed line where a phase ends."""
    spans = head_only_spans(curves)
    panels: dict[str, list[str]] = {}
    for name in curves:
        if name != HEAD_ONLY_SERIES:
            panels.setdefault(_panel_of(name), []).append(name)
    order = sorted(panels, key=lambda p: (0 if "loss" in p else 1 if "acc" in p else 2, p))[
        :_MAX_CURVE_PANELS
    ]
    last_epoch = max(int(frame["epoch"].max()) for frame in curves.values())
    cols = min(2, len(order))
    rows = math.ceil(len(order) / cols)
    fig = _figure(5.5 * cols, 3.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(order) :]:
        ax.axis("off")
    for index, (ax, panel) in enumerate(zip(axes, order, strict=False)):
        title = panel
        for name in panels[panel]:
            frame = curves[name]
            if panel == _THROUGHPUT_PANEL:
                frame, title = _throughput_of_one_phase(frame, spans)
            ax.plot(frame["epoch"], frame["value"], marker="o", markersize=3, label=name)
        _mark_phases(ax, spans, last_epoch, labelled=index == 0)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)
        if last_epoch <= _MAX_EPOCH_TICKS:
            ax.set_xticks(range(1, last_epoch + 1))
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return fig


def _mark_phases(ax: Any, spans: list[tuple[int, int]], last_epoch: int, labelled: bool) -> None:
    for i, (first, last) in enumerate(spans):
        label = "head only (cached features)" if labelled and i == 0 else None
        ax.axvspan(first - 0.5, last + 0.5, color="tab:gray", alpha=0.18, label=label)
        for edge in (first - 0.5, last + 0.5):
            if 0.5 < edge < last_epoch + 0.5:  # a phase boundary inside the plot
                ax.axvline(edge, color="tab:gray", linestyle="--", linewidth=1)


def training_curves_png(curves: dict[str, pd.DataFrame]) -> bytes | None:
    """The curves figure as PNG; None when there is no metric to plot."""
    if not any(name != HEAD_ONLY_SERIES for name in curves):
        return None
    return _png(training_curves_figure(curves))


def curves_note(curves: dict[str, pd.DataFrame]) -> str:
    """What the curves figure shows, in words, for the report."""
    text = "Per epoch, numbered as the training log counts them (1 = the first epoch)."
    spans = head_only_spans(curves)
    if not spans:
        return text
    head = sum(b - a + 1 for a, b in spans)
    if head == max(int(frame["epoch"].max()) for frame in curves.values()):
        return text + " Every epoch trained the head only, on cached backbone features."
    epochs = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    return text + (
        f" Shaded: head-only epochs ({epochs}), where only the head trains, on cached backbone features; "
        "the others fine-tune the backbone on images. images/s shows the fine-tuning epochs only."
    )


@dataclass
class ReportData:
    """Everything the report shows; figures are PNG bytes."""

    run_summary: list[tuple[str, Any]]
    class_names: list[str]
    split_counts: pd.DataFrame  # rows: class, columns: split (+ total)
    stage_metrics: dict[str, Any]  # stage name -> its metrics JSON, or None if the file does not exist
    test_metrics: dict[str, Any]  # the evaluate stage's flat metrics (per-class figures left out)
    per_class: pd.DataFrame  # columns: class, precision, recall, f1, support
    mistakes: pd.DataFrame  # columns: path, label, pred, confidence (the ones in the gallery)
    links: dict[str, str]  # stage (LINKED) -> its page, relative to the report's folder
    figures: dict[str, bytes] = field(
        default_factory=dict
    )  # confusion_matrix, reliability, per_class_f1, mistakes
    curves_png: bytes | None = None
    curves_note: str = ""
    trust: dict[str, Any] = field(default_factory=dict)  # evaluate's details "conformal" and "unknown"


def collect(
    paths: PathsParams,
    run_summary: list[tuple[str, Any]],
    splits: pd.DataFrame,
    test_metrics: dict[str, Any],
    per_class: dict[str, dict[str, float]],
    mistakes: pd.DataFrame,
    figures: dict[str, bytes],
    links: dict[str, str],
    trust: dict[str, Any] | None = None,
) -> ReportData:
    """The report's data: what evaluate computed, plus what earlier stages wrote (their metrics and details
    files, the dvclive training curves) read from `paths`. `links`: the pages of the stages the report links
    to (`LINKED`), relative to the report's folder."""
    curves_dir = paths.curves_dir
    series = read_training_curves(curves_dir) if curves_dir.is_dir() else {}
    curves_png = training_curves_png(series)
    class_names = list(per_class)
    return ReportData(
        run_summary=run_summary,
        class_names=class_names,
        split_counts=_split_counts(splits),
        stage_metrics={stage: _stage_figures(paths, stage) for stage in ("validate", "split")},
        test_metrics=test_metrics,
        per_class=pd.DataFrame(
            [{"class": name, **per_class[name]} for name in class_names],
            columns=["class", "precision", "recall", "f1", "support"],
        ),
        mistakes=mistakes,
        links=links,
        figures=figures,
        trust=trust or {},
        curves_png=curves_png,
        curves_note=curves_note(series)
        if curves_png
        else f"No training curves found under {curves_dir} (the train stage writes them via dvclive).",
    )


def _split_counts(splits: pd.DataFrame) -> pd.DataFrame:
    counts = pd.crosstab(splits["label"], splits["split"])
    counts = counts[[s for s in ("train", "val", "test") if s in counts.columns]]
    counts["total"] = counts.sum(axis=1)
    counts.index.name = "class"
    counts.columns.name = None
    return counts


def _stage_figures(paths: PathsParams, stage: str) -> dict | None:
    """A data stage's metrics with its details file under "details"; None when it wrote no metrics."""
    metrics, details = (read_optional_json(path) for path in (paths.metrics(stage), paths.details(stage)))
    return metrics if metrics is None or details is None else {**metrics, "details": details}


LINKED = ("export", "validate", "audit")  # the stages whose pages the report links to (ReportData.links)
_EXPORT_LINE = "Quantize and export: see {link} (missing if those stages did not complete)."
_CALIBRATION_NOTE = (
    "One temperature T, fitted on the validation split by minimising the negative log-likelihood, divides "
    "the logits: probabilities become softmax(logits / T); the argmax is unchanged. Left: raw probabilities "
    "on the test split; right: after scaling. ECE: mean |accuracy - confidence| over equal-width bins."
)
_MISTAKES_NOTE = "Wrong test predictions with the highest confidence (raw softmax), most confident first."

# Headline first, then how training went, then the detail; raw key/value tables last.
SECTIONS = (
    ("headline", "Headline"),
    ("curves", "Training curves"),
    ("per-class", "Per-class metrics"),
    ("confusion", "Confusion matrix"),
    ("calibration", "Calibration"),
    ("trust", "Prediction sets and unknown inputs"),
    ("mistakes", "Most confident mistakes"),
    ("data", "Data"),
    ("raw", "Raw figures"),
)


def render_report(data: ReportData) -> str:
    """The whole run as one HTML string: inline CSS, embedded PNGs, every text escaped."""
    bodies = {
        "headline": _headline(data),
        "curves": page.note(data.curves_note)
        + (page.image(data.curves_png, "training curves per epoch") if data.curves_png else ""),
        "per-class": page.table(list(data.per_class.columns), data.per_class.itertuples(index=False))
        + page.image(data.figures["per_class_f1"], "per-class F1"),
        "confusion": page.image(data.figures["confusion_matrix"], "confusion matrix"),
        "calibration": page.note(_CALIBRATION_NOTE)
        + page.image(data.figures["reliability"], "reliability diagram"),
        "trust": _trust(data),
        "mistakes": page.note(_MISTAKES_NOTE)
        + page.image(data.figures["mistakes"], "most confident mistakes")
        + (
            page.table(list(data.mistakes.columns), data.mistakes.itertuples(index=False))
            if len(data.mistakes)
            else ""
        ),
        "data": _data_summary(data),
        "raw": _raw_tables(data),
    }
    return page.document("Evaluation report", [(key, title, bodies[key]) for key, title in SECTIONS])


def _trust(data: ReportData) -> str:
    """Coverage and set sizes of the conformal sets, and the unknown-input detector, in plain words."""
    sets, flagged = data.trust.get("conformal"), data.trust.get("unknown")
    if not sets or not flagged:
        return page.note("No prediction sets or unknown-input detector: the evaluate stage computed none.")
    target = 1 - sets["alpha"]
    figures = [
        (
            f"coverage (target >= {target:.0%})",
            f"{sets['coverage']:.1%}",
            "good" if sets["coverage"] >= target - 0.02 else "warn",
        ),
        ("mean set size", f"{sets['set_size_mean']:.2f}", ""),
        ("median set size", f"{sets['set_size_median']:g}", ""),
        ("single-class sets", f"{sets['singleton_share']:.1%}", ""),
        (f"worst class: {sets['worst_class']}", f"{sets['worst_class_coverage']:.1%}", ""),
        ("test images marked unknown", f"{flagged['test_unknown_rate']:.1%}", ""),
    ]
    return (
        page.cards(figures)
        + page.note(
            f"Prediction sets ({sets['method']}, alpha {sets['alpha']:g}): calibrated on the validation "
            f"split after temperature scaling, each set holds the true class for at least {target:.0%} of "
            "images like the training data, on average over images (not for every class: see the worst "
            "one). A set of one class is a confident answer; a larger set says which classes the model "
            "cannot tell apart."
        )
        + page.image(data.figures["coverage"], "coverage per class and per set size")
        + page.note(
            f"Unknown inputs ({flagged['detector']} detector): an image scoring below "
            f"{flagged['threshold']:.4g} is marked unknown; the threshold keeps {flagged['tpr']:.0%} of "
            f"validation images, so about {1 - flagged['tpr']:.0%} of ordinary images are marked too. On the "
            f"test split: {_shown(flagged.get('unknown_rate_correct'), '{:.1%}')} of correct predictions and "
            f"{_shown(flagged.get('unknown_rate_mistakes'), '{:.1%}')} of mistakes."
        )
    )


def _headline(data: ReportData) -> str:
    m, settings = data.test_metrics, dict(data.run_summary)
    figures = [
        ("test accuracy", m.get("accuracy"), "{:.1%}"),
        ("balanced accuracy", m.get("balanced_accuracy"), "{:.1%}"),
        ("macro F1", m.get("f1_macro"), "{:.3f}"),
        (f"ECE, calibrated (raw: {_shown(m.get('ece_before'), '{:.3f}')})", m.get("ece_after"), "{:.3f}"),
        (f"top-{m.get('top_k', 'k')} accuracy", m.get("top_k_accuracy"), "{:.1%}"),
        ("test images", m.get("n_test"), "{}"),
    ]
    run = ", ".join(
        f"{key} {page.fmt(settings[key])}"
        for key in ("backbone", "weights", "strategy", "epochs", "input size")
        if settings.get(key) is not None
    )
    export_line = _EXPORT_LINE.format(link=page.link(data.links["export"], data.links["export"]))
    return (
        page.cards((label, _shown(value, spec), "") for label, value, spec in figures if value is not None)
        + f"<p>Model: {page.esc(run)}; {len(data.class_names)} classes.</p>"
        + f"<p>{export_line}</p>"
    )


def _shown(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _data_summary(data: ReportData) -> str:
    counts = data.split_counts.reset_index()
    validate = data.stage_metrics.get("validate") or {}
    parts = [
        "<h3>Images per class and split (splits file)</h3>",
        page.table(list(counts.columns), counts.itertuples(index=False)),
    ]
    quarantined = [
        (k, v) for k, v in page.flatten(validate) if "quarantin" in k.lower() and isinstance(v, int | float)
    ]
    parts.extend(f"<p><strong>{page.esc(k)}</strong>: {page.esc(page.fmt(v))}</p>" for k, v in quarantined)
    link = page.link(data.links["validate"], data.links["validate"])
    parts.append(f"<p>Data checks (rules, class distribution, quarantine): see {link}.</p>")
    audit = page.link(data.links["audit"], data.links["audit"])
    parts.append(f"<p>Data audit (likely label errors, near-duplicates, drift): see {audit}.</p>")
    return "".join(parts)


def _raw_tables(data: ReportData) -> str:
    classes = ", ".join(data.class_names)
    settings = [*data.run_summary, ("classes", f"{len(data.class_names)}: {classes}")]
    parts = [
        page.details("Run settings", page.table(["item", "value"], settings)),
        page.details("Test metrics (metrics/evaluate.json)", page.key_values(data.test_metrics)),
    ]
    for stage, metrics in data.stage_metrics.items():
        body = (
            page.note(f"No metrics file from the {stage} stage.")
            if metrics is None
            else page.key_values(metrics)
        )
        parts.append(page.details(f"{stage} stage metrics", body))
    return "".join(parts)

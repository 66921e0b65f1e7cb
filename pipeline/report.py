"""Evaluation figures (PNG bytes) and the self-contained `report.html` that shows a whole run.

Figures use `matplotlib.figure.Figure` with the Agg canvas directly, so nothing touches pyplot's global state
and importing this module configures nothing. The HTML has inline CSS and base64-embedded PNGs only: it opens
offline, from a file, anywhere (DVC's own plots HTML pulls vega from a CDN and does not).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.calibration import Reliability

_ANNOTATE_MAX_CLASSES = 20  # beyond this, numbers inside confusion cells become unreadable
_MAX_CURVE_PANELS = 6
_SPLIT_TOKENS = {"train", "training", "val", "valid", "validation", "test", "eval"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()


def confusion_png(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Counts and row-normalised (per-true-class recall) confusion matrices side by side. Rows: true class."""
    k = len(class_names)
    side = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig = _figure(2 * side + 1.5, side)
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    panels = ((matrix, "Counts", "{:d}"), (normalised, "Row-normalised", "{:.2f}"))
    for ax, (data, title, fmt) in zip(fig.subplots(1, 2), panels, strict=True):
        image = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
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
    k = len(class_names)
    fig = _figure(7, max(2.5, 0.3 * k + 1.2))
    ax = fig.subplots()
    positions = np.arange(k)
    ax.barh(positions, f1, color="tab:green")
    ax.set_yticks(positions, class_names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test split")
    for y, value in zip(positions, f1, strict=True):
        ax.text(min(value + 0.01, 0.9), y, f"{value:.2f}", va="center", fontsize=8)
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
    """dvclive metric TSVs under `folder` -> {name relative to folder: frame of (step, value)}."""
    curves: dict[str, pd.DataFrame] = {}
    for tsv in sorted(Path(folder).rglob("*.tsv")):
        frame = pd.read_csv(tsv, sep="\t")
        values = [c for c in frame.columns if c not in ("step", "timestamp")]
        if "step" not in frame.columns or not values:
            continue
        column = tsv.stem if tsv.stem in values else values[-1]
        name = tsv.relative_to(folder).with_suffix("").as_posix()
        curves[name] = frame[["step", column]].rename(columns={column: "value"})
    return curves


def _panel_of(name: str) -> str:
    """'train/loss', 'val/loss', 'val_loss' -> 'loss': series that differ only by split share a panel."""
    tokens = [t for t in re.split(r"[/_\-.]", name.lower()) if t and t not in _SPLIT_TOKENS]
    return "_".join(tokens) or name


def training_curves_png(curves: dict[str, pd.DataFrame]) -> bytes:
    """One panel per metric (loss first, then accuracy), train and val series overlaid."""
    panels: dict[str, list[str]] = {}
    for name in curves:
        panels.setdefault(_panel_of(name), []).append(name)
    order = sorted(panels, key=lambda p: (0 if "loss" in p else 1 if "acc" in p else 2, p))[
        :_MAX_CURVE_PANELS
    ]
    cols = min(2, len(order))
    rows = math.ceil(len(order) / cols)
    fig = _figure(5.5 * cols, 3.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(order) :]:
        ax.axis("off")
    for ax, panel in zip(axes, order, strict=False):
        for name in panels[panel]:
            frame = curves[name]
            ax.plot(frame["step"], frame["value"], marker="o", markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return _png(fig)


@dataclass
class ReportData:
    """Everything the report shows; figures are PNG bytes."""

    run_summary: list[tuple[str, Any]]
    class_names: list[str]
    split_counts: pd.DataFrame  # rows: class, columns: split (+ total)
    stage_metrics: dict[str, Any]  # stage name -> its metrics JSON, or None if the file does not exist
    test_metrics: list[tuple[str, Any]]
    per_class: pd.DataFrame  # columns: class, precision, recall, f1, support
    mistakes: pd.DataFrame  # columns: path, label, pred, confidence (the ones in the gallery)
    figures: dict[str, bytes] = field(
        default_factory=dict
    )  # confusion_matrix, reliability, per_class_f1, mistakes
    curves_png: bytes | None = None
    curves_note: str = ""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.3rem}h2{margin-top:2.2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.5rem 0}
nav a{margin-right:1rem}.note{color:#666;font-style:italic}
"""

_CALIBRATION_NOTE = (
    "One temperature T, fitted on the validation split by minimising the negative log-likelihood, divides "
    "the logits: probabilities become softmax(logits / T); the argmax is unchanged. Left: raw probabilities "
    "on the test split; right: after scaling. ECE: mean |accuracy - confidence| over equal-width bins."
)
_MISTAKES_NOTE = "Wrong test predictions with the highest confidence (raw softmax), most confident first."

_SECTIONS = (
    ("summary", "Run summary"),
    ("data", "Data summary"),
    ("curves", "Training curves"),
    ("metrics", "Test metrics"),
    ("per-class", "Per-class metrics"),
    ("confusion", "Confusion matrix"),
    ("calibration", "Calibration"),
    ("mistakes", "Most confident mistakes"),
)


def render_report(data: ReportData) -> str:
    """The whole run as one HTML string: inline CSS, embedded PNGs, every text escaped."""
    bodies = {
        "summary": _summary(data),
        "data": _data_summary(data),
        "curves": _image(data.curves_png, "training curves") if data.curves_png else _note(data.curves_note),
        "metrics": _table(["metric", "value"], data.test_metrics),
        "per-class": _table(list(data.per_class.columns), data.per_class.itertuples(index=False))
        + _image(data.figures["per_class_f1"], "per-class F1"),
        "confusion": _image(data.figures["confusion_matrix"], "confusion matrix"),
        "calibration": _note(_CALIBRATION_NOTE) + _image(data.figures["reliability"], "reliability diagram"),
        "mistakes": _note(_MISTAKES_NOTE)
        + _image(data.figures["mistakes"], "most confident mistakes")
        + (
            _table(list(data.mistakes.columns), data.mistakes.itertuples(index=False))
            if len(data.mistakes)
            else ""
        ),
    }
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title in _SECTIONS)
    sections = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{bodies[key]}</section>' for key, title in _SECTIONS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Evaluation report</title><style>{_CSS}</style></head>"
        f"<body><h1>Evaluation report</h1><nav>{nav}</nav>{sections}</body></html>\n"
    )


def _summary(data: ReportData) -> str:
    classes = ", ".join(data.class_names)
    return _table(["item", "value"], [*data.run_summary, ("classes", f"{len(data.class_names)}: {classes}")])


def _data_summary(data: ReportData) -> str:
    counts = data.split_counts.reset_index()
    parts = [
        "<h3>Images per class and split (splits file)</h3>",
        _table(list(counts.columns), counts.itertuples(index=False)),
    ]
    for stage, metrics in data.stage_metrics.items():
        parts.append(f"<h3>{_esc(stage)} stage metrics</h3>")
        if metrics is None:
            parts.append(_note(f"No metrics file from the {stage} stage."))
            continue
        flat = list(_flatten(metrics))
        quarantined = [(k, v) for k, v in flat if "quarantin" in k.lower() and isinstance(v, int | float)]
        parts.extend(f"<p><strong>{_esc(k)}</strong>: {_esc(_format(v))}</p>" for k, v in quarantined)
        parts.append(_table(["key", "value"], flat))
    return "".join(parts)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        text = json.dumps(value, default=str)
        yield prefix, text if len(text) <= 300 else text[:297] + "..."
    else:
        yield prefix, value


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_esc(_format(v))}</td>'
            if isinstance(v, int | float | np.number) and not isinstance(v, bool)
            else f"<td>{_esc(_format(v))}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{encoded}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'

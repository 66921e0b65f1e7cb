"""The validation page (`index.html`, self-contained: it opens offline) and its class-distribution plot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import ValidateParams
from pipeline.data.labels import SINGLE, LabelSets
from pipeline.pages import page
from pipeline.stages.validate.gx import DOCS_DIR
from pipeline.stages.validate.label_sets import MERGED
from pipeline.stages.validate.rules import RULES

if TYPE_CHECKING:  # the package imports this module: the name only for annotations
    from pipeline.stages.validate import Checked

_QUARANTINE_SHOWN = 50  # rows of the quarantine list on the page
_NAMED_CLASSES = 60  # up to this many classes the plot has a named bar per class (32 inches wide at 60)
_STEPPED_WIDTH = 12.0  # inches: the plot of more classes
_BOUND = {"min_value": "\u2265", "max_value": "\u2264"}  # >=, <=
_SUBJECT = {
    "files": "each image: ",
    "duplicates": "each repeated content: ",
    "classes": "each class: ",
    "summary": "",
}
_DOCS_NOTE = (
    "Great Expectations' own rendering of the same checks. It loads its styling and scripts from the "
    "internet (CDNs): offline it shows unstyled."
)


def plot_distribution(
    classes: pd.DataFrame,
    manifest: pd.DataFrame,
    excluded: dict[str, str],
    min_images_per_class: int,
    sets: LabelSets = SINGLE,
) -> bytes:
    """Usable and quarantined images per class (a multilabel task's: per label, `sets`), stacked, with the
    `validate.min_images_per_class` line: a named bar per class up to _NAMED_CLASSES classes, else one
    stepped outline over all of them at a fixed width (a bar and a label per class made 1,000 classes a
    50,200 px wide image that took 5.8 s)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    left_out = [path for path, why in excluded.items() if why != MERGED]  # a merged copy's labels are kept
    dropped = manifest[((manifest["status"] != "ok") | manifest["path"].isin(left_out))]
    dropped = sets.counts(dropped[dropped["status"] != "empty_class_folder"]["label"])
    dropped = dropped.reindex(classes["label"], fill_value=0).to_numpy()
    kept = classes["images"].to_numpy()
    named = len(classes) <= _NAMED_CLASSES
    width = max(4.0, 0.5 * len(classes) + 2) if named else _STEPPED_WIDTH
    figure = Figure(figsize=(width, 3.5), layout="constrained")
    axes = figure.add_subplot()
    if named:
        axes.bar(classes["label"], kept, label="usable", color="#4c72b0")
        axes.bar(classes["label"], dropped, bottom=kept, label="quarantined", color="#dd8452")
        axes.tick_params(axis="x", labelrotation=45)
    else:
        edges = np.arange(len(classes) + 1)
        axes.stairs(kept, edges, fill=True, label="usable", color="#4c72b0")
        axes.stairs(kept + dropped, edges, baseline=kept, fill=True, label="quarantined", color="#dd8452")
        axes.set_xlim(0, len(classes))
        axes.set_xlabel(f"{len(classes)} classes in name order (each one's count: the table below)")
    axes.axhline(min_images_per_class, color="grey", linestyle="--", label="min_images_per_class")
    axes.set_ylabel("images")
    axes.set_title("Images per class")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def render(checked: Checked, distribution_png: bytes, settings: ValidateParams, quarantine: Path) -> str:
    """The validation view: headline and verdict, every rule, the class distribution, the quarantine
    (`quarantine`: the CSV that lists it whole)."""
    classes = page.image(distribution_png, "images per class") + page.table(
        ["class", "usable images"], checked.details["images_per_class"].items()
    )
    docs = f"<p>{page.link(f'{DOCS_DIR}/index.html', 'Data Docs')}</p>" + page.note(_DOCS_NOTE)
    multilabel = checked.sets.multilabel
    sections = [
        ("headline", "Headline", _headline(checked)),
        ("rules", "Rules", _rules_table(checked, settings)),
        ("classes", "Label distribution" if multilabel else "Class distribution", classes),
        *([("label-sets", "Label sets", _label_sets(checked.details["multilabel"]))] if multilabel else []),
        ("quarantine", "Quarantine", _quarantine_list(checked.quarantine, quarantine)),
        ("data-docs", "Great Expectations Data Docs", docs),
        ("raw", "Raw figures", _raw(checked)),
    ]
    return page.document("Data validation", sections)


def _label_sets(figures: dict) -> str:
    """A multilabel task's label sets (`label_sets.figures`): how many labels an image has, each label's
    positives and negatives, and which labels go together."""
    cards = page.cards(
        [
            ("images", figures["images"], ""),
            ("labels", figures["labels"], ""),
            ("labels per image (cardinality)", f"{figures['cardinality']:.2f}", ""),
            ("density (cardinality / labels)", f"{figures['density']:.3f}", ""),
            ("images with no label", figures["no_label"], ""),
            ("distinct label sets", figures["label_sets"], ""),
            ("identical files merged", figures["merged_copies"], ""),
        ]
    )
    counts = page.table(
        ["label", "positives", "negatives"],
        [(name, n, figures["negatives"][name]) for name, n in figures["positives"].items()],
    )
    if figures["cooccurrence"] is not None:
        names = list(figures["cooccurrence"])
        together = page.table(["", *names], [(r, *figures["cooccurrence"][r].values()) for r in names])
        together = "<p>Images with both labels (the diagonal: each label's positives).</p>" + together
    else:
        together = "<p>The pairs of labels that share most images.</p>" + page.table(
            ["label", "label", "images with both"], figures["most_together"]
        )
    never = figures["never_together"]
    pairs = [
        ("Always together: every image with one has the other", ["label", "label", "images"],
         figures["always_together"]),
        ("One implies the other: every image of the first also has the second",
         ["label", "implies", "images"], figures["implies"]),
        (f"Never together: {never['pairs']} pair(s) share no image; those that would share most by chance "
         "(if they are exclusive by design, a single-label task may suit them better)",
         ["label", "label", "images expected if independent"], never["most_expected"]),
    ]  # fmt: skip
    listed = "".join(
        f"<h3>{page.esc(title)}</h3>" + (page.table(header, rows) if rows else "<p>None.</p>")
        for title, header, rows in pairs
    )
    return cards + counts + "<h3>Co-occurrence</h3>" + together + listed


def _raw(checked: Checked) -> str:
    return page.details("metrics/validate.json", page.key_values(checked.metrics)) + page.details(
        "details.json", page.key_values(checked.details)
    )


def _quarantine_list(quarantine: pd.DataFrame, csv_path: Path) -> str:
    """The first rows of the quarantine and how many more the CSV holds."""
    if quarantine.empty:
        return f"<p>No file was excluded ({page.esc(csv_path)} is empty).</p>"
    shown = quarantine.head(_QUARANTINE_SHOWN)
    more = len(quarantine) - len(shown)
    return (
        f"<p><strong>{len(quarantine)}</strong> file(s) excluded, each with its reason; all of them are "
        f"listed in {page.esc(csv_path)}.</p>"
        + page.table(list(shown.columns), shown.itertuples(index=False))
        + (page.note(f"... and {more} more in {csv_path}.") if more > 0 else "")
    )


def _headline(checked: Checked) -> str:
    m = checked.metrics
    if checked.messages:
        verdict, tone = f"FAILED ({len(checked.messages)} error(s))", "bad"
    elif m["warnings"]:
        verdict, tone = f"passed, {m['warnings']} warning(s)", "warn"
    else:
        verdict, tone = "passed", "good"
    figures = [
        ("files", m["files"], ""),
        ("usable", m["usable"], ""),
        ("quarantined", m["quarantined"], "warn" if m["quarantined"] else ""),
        ("classes with usable images", m["classes"], ""),
        ("verdict", verdict, tone),
    ]
    reasons = "".join(f"<li>{page.esc(line)}</li>" for line in checked.messages)
    return page.cards(figures) + (f"<p>The stage fails because:</p><ul>{reasons}</ul>" if reasons else "")


def _rules_table(checked: Checked, settings: ValidateParams) -> str:
    rows = []
    for rule, spec in RULES.items():
        outcome = checked.outcomes.get(rule)
        check = f"{_SUBJECT[spec.frame]}{spec.column} {_BOUND[spec.bound]} {spec.threshold(settings):g}"
        if outcome is None:
            rows.append((rule, "off", "not checked", check, "-", "-"))
            continue
        result = "passed" if outcome.passed else f"FAILED ({outcome.severity})"
        observed = "-" if outcome.observed is None else f"{outcome.observed:.4g}"
        found = outcome.detail or "nothing wrong"
        fix = "" if outcome.passed else f"; fix: {spec.fix}"
        rows.append((rule, outcome.severity, result, check, observed, found + fix))
    header = ["rule", "severity", "outcome", "checks", "worst value", "what it found"]
    return page.table(header, rows)

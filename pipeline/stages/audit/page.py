"""The audit page (`index.html`, self-contained: thumbnails embedded, it opens offline): the label suspects
(given vs suggested label), the near-duplicate groups (those across splits and labels first), the drift."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image

from pipeline.config import AuditParams
from pipeline.pages import page
from pipeline.preprocess import open_rgb

if TYPE_CHECKING:  # the package imports this module: the name only for annotations
    from pipeline.stages.audit import Found

_THUMB = 96  # pixels, the longer side of a thumbnail
_GROUP_MEMBERS_SHOWN = 6
_FIGURE = 'style="display:inline-block;margin:.3rem;width:{w}px;vertical-align:top;font-size:.8rem"'
_SUSPECTS_NOTE = (
    "Out-of-sample probabilities of a k-fold linear probe on the backbone's embeddings (a logistic "
    "regression; a linear discriminant above 50,000 images), ranked by cleanlab (confident learning). "
    "Each image: its given label, the label the classifier suggests, and the "
    "probability it gives the given label (low = suspicious). Look before you relabel: the classifier is "
    "only as good as a linear probe."
)
_GROUPS_NOTE = (
    "Images that are the same picture after re-encoding, resizing, cropping, a colour change or a flip "
    "(embedding cosine similarity, then the pixels of nearest neighbours, aligned). Split keeps each group "
    "in one split; groups across given splits are leakage, groups across labels are label conflicts."
)


def thumbnail(path: Path) -> bytes:
    """A PNG thumbnail of at most _THUMB pixels a side (small images scaled up, without smoothing)."""
    try:
        image = open_rgb(path)  # as training sees it: EXIF rotation, transparency on white, sRGB
    except OSError:
        image = Image.new("RGB", (_THUMB, _THUMB), "grey")
    scale = _THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tile(path: Path, caption: str) -> str:
    figure = _FIGURE.format(w=_THUMB + 16)
    text = page.esc(caption).replace("\n", "<br>")
    return f"<figure {figure}>{page.image(thumbnail(path), caption)}<figcaption>{text}</figcaption></figure>"


def render(found: Found, files: list[Path], settings: AuditParams) -> str:
    """The whole page."""
    where = dict(zip(found.table["path"], files, strict=True))
    sections = [
        ("headline", "Headline", _headline(found)),
        ("suspects", "Likely label errors", _suspects(found.suspects, where, settings)),
        ("groups", "Near-duplicate groups", _groups(found, where, settings.shown)),
        ("drift", "Drift since the champion", _drift(found.drift)),
        ("raw", "Raw figures", page.details("metrics/audit.json", page.key_values(found.metrics))
         + page.details("details.json", page.key_values(found.details))),
    ]  # fmt: skip
    return page.document("Data audit", sections)


def _headline(found: Found) -> str:
    m = found.metrics
    tone = "bad" if found.errors else "warn" if found.warnings else "good"
    verdict = (
        f"FAILED ({len(found.errors)} error(s))" if found.errors else f"{len(found.warnings)} warning(s)"
    )
    drift_tone = "bad" if found.drift.get("drifted") else ""
    cards = [
        ("images", m["images"], ""),
        ("near-duplicate groups", m["near_duplicate_groups"], "warn" if m["near_duplicate_groups"] else ""),
        ("groups across splits", m["cross_split_groups"], "bad" if m["cross_split_groups"] else ""),
        ("groups across labels", m["cross_label_groups"], "warn" if m["cross_label_groups"] else ""),
        ("likely label errors", m["label_issues"], "warn" if m["label_issues"] else ""),
        ("their probe, out of fold", _probe(found), ""),
        ("quarantined", m["quarantined"], ""),
        ("drift", found.drift["status"] if "auc" in found.drift else "not measured", drift_tone),
        ("verdict", verdict, tone),
    ]
    lines = "".join(f"<li>{page.esc(line)}</li>" for line in [*found.errors, *found.warnings])
    return page.cards(cards) + (f"<ul>{lines}</ul>" if lines else "")


def _probe(found: Found) -> str:
    """How well the probe behind the label-error ranking predicts the given labels on images it did not
    fit: accuracy, or mAP for label sets."""
    for key, figure in found.metrics.items():
        if key.startswith("label_probe_") and figure is not None:
            return f"{figure:.3f} {'mAP' if key.endswith('_map') else 'accuracy'}"
    return "not run"


def _suspects(suspects: pd.DataFrame, where: dict[str, Path], settings: AuditParams) -> str:
    if suspects.empty:
        return f"<p>No likely label error found ({page.esc(settings.label_issues)}).</p>"
    shown = suspects.head(settings.shown)
    captions = (
        f"given: {r.label}\nsuggested: {r.suggested_label}\np = {r.label_quality:.3f}"
        for r in shown.itertuples()
    )
    tiles = "".join(
        _tile(where[path], caption) for path, caption in zip(shown["path"], captions, strict=True)
    )
    more = len(suspects) - len(shown)
    columns = ["path", "label", "suggested_label", "label_quality", "quarantined"]
    return (
        page.note(_SUSPECTS_NOTE)
        + f"<p><strong>{len(suspects)}</strong> image(s) flagged, most likely first.</p>"
        + f"<div>{tiles}</div>"
        + (page.note(f"... and {more} more in images.csv (label_issue: True).") if more > 0 else "")
        + page.details("table", page.table(columns, shown[columns].itertuples(index=False)))
    )


def _groups(found: Found, where: dict[str, Path], shown: int) -> str:
    if found.groups.empty:
        return "<p>No near-duplicate group (identical files are validate's).</p>"
    members = found.table[found.table["group_size"] > 1].groupby("group", sort=False)
    blocks = []
    for group in found.groups.head(shown).itertuples():
        rows = members.get_group(group.group).head(_GROUP_MEMBERS_SHOWN)
        tiles = "".join(
            _tile(where[r.path], f"{r.label}\n{r.split or 'no given split'}\n{Path(r.path).name}")
            for r in rows.itertuples()
        )
        counts = f"{group.images} images, {group.labels} label(s), {group.splits} split(s)"
        title = f"group {group.group[:12]}: {counts}"
        blocks.append(f"<h3>{page.esc(title)}</h3><div>{tiles}</div>")
    more = len(found.groups) - len(blocks)
    tail = page.note(f"... and {more} more groups in images.csv (group_size > 1).") if more > 0 else ""
    return page.note(_GROUPS_NOTE) + "".join(blocks) + tail


def _drift(drift: dict) -> str:
    rows = [(key, value) for key, value in page.flatten(drift) if not key.startswith("priors")]
    priors = drift.get("priors")
    table = ""
    if priors:
        classes = sorted(set(priors["champion_train"]) | set(priors["new"]))
        table = page.table(
            ["class", "champion's train images", "new images"],
            [(c, priors["champion_train"].get(c, 0), priors["new"].get(c, 0)) for c in classes],
        )
    note = page.note(
        "auc: cross-validated ROC AUC of a classifier telling the new images' embeddings from those of the "
        "champion's training images (0.5: indistinguishable); prior_shift: total variation distance between "
        "their class distributions."
    )
    return note + page.table(["figure", "value"], rows) + table

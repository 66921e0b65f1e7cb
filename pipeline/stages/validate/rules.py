"""The manifest schema (pandera), the data rules and what they decide: which files each failed rule excludes
and how each failure reads. Also the frames the rules check: files, repeated contents, classes, summary."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from pipeline.config import ValidateParams
from pipeline.data.images import MANIFEST_COLUMNS, SPLITS, STATUSES, first_few
from pipeline.data.labels import LabelSets
from pipeline.errors import PipelineError

_SPLIT_ORDER = {name: rank for rank, name in enumerate(SPLITS)}
_SHOWN = 8  # offenders named in one message
_COPIES_SHOWN = 3  # files named of one group of identical files
MANIFEST_HEADER = ",".join(MANIFEST_COLUMNS)


class ManifestSchema(pa.DataFrameModel):
    """The manifest `ingest` writes: one row per candidate file, unique paths, known statuses."""

    path: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    label: Series[str]
    split: Series[str] = pa.Field(isin=["", *SPLITS])
    sha256: Series[str] = pa.Field(str_matches=r"^(?:[0-9a-f]{64})?$")
    size_bytes: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    format: Series[str]
    width: Series[pd.Int64Dtype] = pa.Field(gt=0, nullable=True)
    height: Series[pd.Int64Dtype] = pa.Field(gt=0, nullable=True)
    mode: Series[str]
    status: Series[str] = pa.Field(isin=list(STATUSES))

    class Config:
        strict = True
        coerce = True

    @pa.dataframe_check
    def ok_rows_are_complete(cls, df: pd.DataFrame) -> Series[bool]:
        """A usable row needs a label, a hash and a size."""
        complete = (df["label"] != "") & (df["sha256"] != "") & df["width"].notna() & df["height"].notna()
        return (df["status"] != "ok") | complete


class MultilabelManifestSchema(ManifestSchema):
    """A multilabel task's manifest: a usable row's label set may be empty (an image of no label)."""

    @pa.dataframe_check
    def ok_rows_are_complete(cls, df: pd.DataFrame) -> Series[bool]:
        """A usable row needs a hash and a size."""
        complete = (df["sha256"] != "") & df["width"].notna() & df["height"].notna()
        return (df["status"] != "ok") | complete


@dataclass(frozen=True)
class Rule:
    """One data rule = one GX `expect_column_values_to_be_between` on a column of one of the frames below."""

    frame: str
    column: str
    bound: str  # "min_value" | "max_value"
    threshold: Callable[[ValidateParams], float]  # from the `validate` section
    fix: str


RULES: dict[str, Rule] = {
    "min_side": Rule("files", "min_side", "min_value", lambda v: v.min_side,
                     "replace or remove them, or lower validate.min_side"),
    "max_pixels": Rule("files", "pixels", "max_value", lambda v: v.max_pixels,
                       "downscale or remove them, or raise validate.max_pixels"),
    "label_conflict": Rule("duplicates", "labels", "max_value", lambda v: 1,
                           "delete the wrong copy or move it to the right class folder"),
    "split_leakage": Rule("duplicates", "splits", "max_value", lambda v: 1,
                          "keep each file in one split only"),
    "min_images_per_class": Rule("classes", "images", "min_value", lambda v: v.min_images_per_class,
                                 "add images or lower validate.min_images_per_class"),
    "min_classes": Rule("summary", "classes", "min_value", lambda v: v.min_classes,
                        "add class folders or lower validate.min_classes"),
    "max_imbalance_ratio": Rule("summary", "imbalance_ratio", "max_value",
                                lambda v: v.max_imbalance_ratio,
                                "add images to the small classes or raise validate.max_imbalance_ratio"),
    "max_bad_fraction": Rule("summary", "bad_fraction", "max_value", lambda v: v.max_bad_fraction,
                             "fix or remove the quarantined files, or raise validate.max_bad_fraction"),
}  # fmt: skip
INDEX = {"files": ["path"], "duplicates": ["sha256"], "classes": ["label"], "summary": []}


@dataclass
class Outcome:
    rule: str
    severity: str
    passed: bool
    observed: float | None  # the worst value of the checked column; None when it is empty
    threshold: float
    offenders: list = field(default_factory=list)  # values of the frame's index column
    detail: str = ""


def read_manifest(path: Path, multilabel: bool = False) -> tuple[pd.DataFrame, dict[str, str] | None]:
    """The manifest checked against its schema (`multilabel`: label sets may be empty) and sorted by path,
    with its rows' text lines by path when it
    has ingest's header and each row is one line. `validated` then copies the usable rows' lines instead of
    formatting 70,000 rows again (0.15 s); a path with a line break in it is quoted over two lines, and then
    the rows are formatted."""
    if not path.is_file():
        raise PipelineError(f"paths.manifest: {path} not found; run `python -m pipeline ingest` first")
    data = path.read_bytes()
    raw = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    lines = data.decode("utf-8").split("\n")
    by_path = None
    if lines[0] == MANIFEST_HEADER and len(lines) == len(raw) + 2 and not lines[-1]:
        by_path = dict(zip(raw["path"].tolist(), lines[1:-1], strict=True))
    for column in ("size_bytes", "width", "height"):
        if column in raw:
            raw[column] = raw[column].replace("", None)
    try:
        manifest = (MultilabelManifestSchema if multilabel else ManifestSchema).validate(raw, lazy=True)
    except pa.errors.SchemaErrors as exc:
        failures = _schema_failures(exc)
        raise PipelineError(
            f"{path} does not match the manifest schema:\n{failures}\n"
            "  re-run `python -m pipeline ingest` to rebuild it (do not edit the manifest by hand)"
        ) from None
    return manifest.sort_values("path", kind="stable").reset_index(drop=True), by_path


def _schema_failures(exc: pa.errors.SchemaErrors) -> str:
    lines = []
    cases = exc.failure_cases
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=True):
        rows = [int(i) + 2 for i in group["index"].dropna().tolist()][:_SHOWN]  # +2: header, 1-based
        values = group["failure_case"].astype(str).tolist()[:_SHOWN]
        where = f" at lines {rows}" if rows else ""
        lines.append(f"  column {column!r}: {check} failed{where}: {values}")
    return "\n".join(lines)


def duplicates(ok: pd.DataFrame) -> pd.DataFrame:
    """Per content found in more than one file: how many labels and how many given splits it appears under.
    Unique files cannot break either rule, so they are left out (grouping all 70,000 hashes took 0.07 s)."""
    repeated = ok[ok["sha256"].duplicated(keep=False)]
    given = repeated["split"].where(repeated["split"] != "")
    frame = (
        repeated.assign(given=given)
        .groupby("sha256", sort=True)
        .agg(labels=("label", "nunique"), splits=("given", "nunique"))
    )
    return frame.reset_index().astype({"labels": "int64", "splits": "int64"})


def classes(manifest: pd.DataFrame, usable: pd.DataFrame, sets: LabelSets) -> pd.DataFrame:
    """Usable images per class (a multilabel task's: per label, its positives); a class whose files were all
    excluded (or an empty folder) counts 0."""
    labels = sets.names(manifest.loc[manifest["label"] != "", "label"])
    counts = sets.counts(usable["label"])
    return pd.DataFrame({"label": labels, "images": [int(counts.get(label, 0)) for label in labels]})


def summary(files: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    present = classes.loc[classes["images"] > 0, "images"]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    bad = float((files["status"] != "ok").mean()) if len(files) else 0.0
    return pd.DataFrame({"classes": [len(present)], "imbalance_ratio": [ratio], "bad_fraction": [bad]})


def exclusions(outcomes: dict[str, Outcome], ok: pd.DataFrame) -> dict[str, str]:
    """Files that failed file-level rules -> the first rule that excluded them: the files themselves
    (max_pixels, min_side), every copy of a content under two labels (label_conflict), or the copies outside
    the earliest given split (split_leakage: train, then val, then test)."""
    excluded: dict[str, str] = {}
    for rule in ("max_pixels", "min_side", "label_conflict", "split_leakage"):
        outcome = outcomes.get(rule)
        if outcome is None or outcome.passed:
            continue
        if rule in ("max_pixels", "min_side"):
            paths = outcome.offenders
        else:
            copies = ok[ok["sha256"].isin(outcome.offenders) & ~ok["path"].isin(excluded)]
            if rule == "split_leakage":
                copies = copies[copies["split"] != ""]
                first = copies.groupby("sha256")["split"].transform(
                    lambda s: min(s, key=_SPLIT_ORDER.__getitem__)
                )
                copies = copies[copies["split"] != first]
            paths = copies["path"].tolist()
        for path in paths:
            excluded.setdefault(path, rule)
    return excluded


def describe(outcome: Outcome, frames: dict[str, pd.DataFrame], ok: pd.DataFrame, quarantine: Path) -> str:
    """A failed rule in words, naming the offending classes or files; `quarantine` is the CSV a reader is
    sent to when too many files are unusable."""
    rule, threshold = outcome.rule, outcome.threshold
    if rule in ("min_side", "max_pixels"):
        sizes = ok.set_index("path")
        named = [f"{p!r} ({sizes.at[p, 'width']}x{sizes.at[p, 'height']})" for p in outcome.offenders]
        bound = (
            f"smaller than {threshold:g} px on a side" if rule == "min_side" else f"over {threshold:g} pixels"
        )
        return f"{len(named)} image(s) {bound}: {_listing(named)}"
    if rule in ("label_conflict", "split_leakage"):
        key, where = (
            ("label", "under different labels") if rule == "label_conflict" else ("split", "in two splits")
        )
        groups = ok[ok["sha256"].isin(outcome.offenders)].groupby("sha256", sort=True)
        named = []
        for _, g in groups:  # a group's first files only: a blank image can have hundreds of copies
            copies = [f"{path!r} ({value})" for path, value in zip(g["path"], g[key], strict=True)]
            more = f" = ... ({len(copies)} files)" if len(copies) > _COPIES_SHOWN else ""
            named.append(" = ".join(copies[:_COPIES_SHOWN]) + more)
        return f"{len(named)} group(s) of identical files {where}: {_listing(named)}"
    classes = frames["classes"].set_index("label")["images"]
    if rule == "min_images_per_class":
        named = [f"{label!r} ({classes[label]})" for label in outcome.offenders]
        return f"classes {_listing(named)} have fewer than {threshold:g} usable images"
    if rule == "min_classes":
        present = sorted(classes[classes > 0].index)
        return f"{len(present)} class(es) with usable images {present}, need at least {threshold:g}"
    if rule == "max_imbalance_ratio":
        present = classes[classes > 0]
        return (
            f"largest/smallest class ratio is {outcome.observed:.1f} ({present.idxmax()!r} {present.max()} / "
            f"{present.idxmin()!r} {present.min()}), above {threshold:g}"
        )
    return (
        f"{outcome.observed:.1%} of the files are unusable, above {threshold:.1%} "
        f"(see {quarantine} for each file and its reason)"
    )


def advice(outcome: Outcome) -> str:
    """How to fix a failed rule. Below 2 classes only more classes can help: `validate.min_classes` cannot go
    below 2, and as a warning the stage still fails, since a classifier needs 2 classes."""
    if outcome.rule == "min_classes" and (outcome.observed or 0) < 2:
        return (
            "a classifier needs at least 2 classes: add a second class (a folder of its images under "
            "paths.data_root, or rows with its label in paths.csv_manifest)"
        )
    return f"{RULES[outcome.rule].fix} (or set validate.severity.{outcome.rule}: warning)"


def _listing(items: list[str]) -> str:
    return "[" + first_few(items, _SHOWN) + "]"

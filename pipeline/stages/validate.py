"""Stage: validate. Check the manifest's shape (pandera) and the data rules (Great Expectations), then
write the usable rows for `split` and a quarantine of every excluded file with its reason.

Each rule's severity (`validate.severity`) decides what a failure does: `error` fails the stage (after every
report is written, so the user can look), `warning` logs and records it and quarantines the offending files
where the rule is about files, `off` skips the rule. Class counts are taken on the usable images.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from pipeline import page
from pipeline.config import Params
from pipeline.data.images import MANIFEST_COLUMNS, SPLITS, STATUSES
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)

_SPLIT_ORDER = {name: rank for rank, name in enumerate(SPLITS)}
_SHOWN = 8  # offenders named in one message
_MANIFEST_HEADER = ",".join(MANIFEST_COLUMNS)
PAGE = "index.html"  # the validation view, in reports/validate/
DOCS_DIR = "data_docs"  # Great Expectations' Data Docs, beside it
_QUARANTINE_SHOWN = 50  # rows of the quarantine list on the page
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


@dataclass(frozen=True)
class _Rule:
    """One data rule = one GX `expect_column_values_to_be_between` on a column of one of the frames below."""

    frame: str
    column: str
    bound: str  # "min_value" | "max_value"
    threshold: Callable[[Params], float]
    fix: str


_RULES: dict[str, _Rule] = {
    "min_side": _Rule("files", "min_side", "min_value", lambda p: p.validate.min_side,
                      "replace or remove them, or lower validate.min_side"),
    "max_pixels": _Rule("files", "pixels", "max_value", lambda p: p.validate.max_pixels,
                        "downscale or remove them, or raise validate.max_pixels"),
    "label_conflict": _Rule("duplicates", "labels", "max_value", lambda p: 1,
                            "delete the wrong copy or move it to the right class folder"),
    "split_leakage": _Rule("duplicates", "splits", "max_value", lambda p: 1,
                           "keep each file in one split only"),
    "min_images_per_class": _Rule("classes", "images", "min_value", lambda p: p.validate.min_images_per_class,
                                  "add images or lower validate.min_images_per_class"),
    "min_classes": _Rule("summary", "classes", "min_value", lambda p: p.validate.min_classes,
                         "add class folders or lower validate.min_classes"),
    "max_imbalance_ratio": _Rule("summary", "imbalance_ratio", "max_value",
                                 lambda p: p.validate.max_imbalance_ratio,
                                 "add images to the small classes or raise validate.max_imbalance_ratio"),
    "max_bad_fraction": _Rule("summary", "bad_fraction", "max_value", lambda p: p.validate.max_bad_fraction,
                              "fix or remove the quarantined files, or raise validate.max_bad_fraction"),
}  # fmt: skip
_INDEX = {"files": ["path"], "duplicates": ["sha256"], "classes": ["label"], "summary": []}


@dataclass
class _Outcome:
    rule: str
    severity: str
    passed: bool
    observed: float | None  # the worst value of the checked column; None when it is empty
    threshold: float
    offenders: list = field(default_factory=list)  # values of the frame's index column
    detail: str = ""


@dataclass
class _Checked:
    """Every rule's outcome on one manifest and what follows from them."""

    frames: dict[str, pd.DataFrame]
    outcomes: dict[str, _Outcome]
    excluded: dict[str, str]  # path -> the rule that excluded it
    usable: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict  # the headline figures `dvc exp show` compares
    details: dict  # images per class, rows by status, every rule's outcome
    messages: list[str]  # why the stage fails; empty when it passes

    @property
    def failed(self) -> list[_Outcome]:
        return [o for o in self.outcomes.values() if not o.passed]


def run(params: Params) -> dict:
    manifest, manifest_lines = _read_manifest(params.paths.manifest)
    with atomic_dir(params.paths.reports_dir / "validate") as report_dir:
        checker = _GxChecker(report_dir / DOCS_DIR)
        checked = _check(manifest, checker, params)
        checker.build_docs()
        png = _plot_distribution(checked.frames["classes"], manifest, checked.excluded, params)
        (report_dir / "class_distribution.png").write_bytes(png)
        (report_dir / PAGE).write_text(_page(checked, png, params), encoding="utf-8")
        write_json(report_dir / params.paths.details("validate").name, checked.details)

    with atomic_path(params.paths.quarantine) as tmp:
        checked.quarantine.to_csv(tmp, index=False, lineterminator="\n")
    for outcome in checked.failed:
        if outcome.severity == "warning":
            log.warning("validate: rule %s (warning): %s", outcome.rule, outcome.detail)
    write_json(params.paths.metrics("validate"), checked.metrics)
    if checked.messages:
        params.paths.validated.unlink(missing_ok=True)  # never leave a stale input for `split`
        details = f"details: {params.paths.quarantine}, {params.paths.details('validate')}"
        raise PipelineError("\n".join([*checked.messages, details]))
    usable = checked.usable
    with atomic_path(params.paths.validated) as tmp:
        if manifest_lines is None:
            usable[list(MANIFEST_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
        else:
            rows = [manifest_lines[path] for path in usable["path"].tolist()]
            tmp.write_text("\n".join([_MANIFEST_HEADER, *rows, ""]), encoding="utf-8")
    log.info(
        "validate: %d usable images in %d classes, %d quarantined",
        len(usable),
        checked.metrics["classes"],
        len(checked.quarantine),
    )
    return checked.metrics


def _check(manifest: pd.DataFrame, checker: _GxChecker, params: Params) -> _Checked:
    """Run the file rules, exclude their offenders, then the class and summary rules on the usable files."""
    files = manifest[manifest["status"] != "empty_class_folder"]
    ok = manifest[manifest["status"] == "ok"].copy()
    ok["min_side"] = ok[["width", "height"]].min(axis=1).astype("int64")
    ok["pixels"] = (ok["width"] * ok["height"]).astype("int64")
    frames = {
        "files": ok[["path", "label", "width", "height", "min_side", "pixels"]],
        "duplicates": _duplicates(ok),
    }
    outcomes: dict[str, _Outcome] = {}
    for name in ("files", "duplicates"):
        outcomes.update(checker.check(name, frames[name], params))
    excluded = _exclusions(outcomes, ok)
    usable = ok[~ok["path"].isin(excluded)]
    frames["classes"] = _classes(manifest, usable)
    frames["summary"] = _summary(files, frames["classes"])
    for name in ("classes", "summary"):
        outcomes.update(checker.check(name, frames[name], params))
    quarantine = _quarantine(manifest, excluded)
    checked = _Checked(frames, outcomes, excluded, usable, quarantine, {}, {}, [])
    for outcome in checked.failed:
        outcome.detail = _describe(outcome, frames, ok, params)
    errors = [o for o in checked.failed if o.severity == "error"]
    classes = frames["classes"].set_index("label")["images"]
    checked.metrics = {
        "files": len(files),
        "usable": len(usable),
        "quarantined": len(quarantine),
        "classes": int((classes > 0).sum()),
        "errors": len(errors),
        "warnings": len(checked.failed) - len(errors),
    }
    checked.details = _details(manifest, classes, outcomes)
    checked.messages = _failures(errors, classes)
    return checked


def _failures(errors: list[_Outcome], classes: pd.Series) -> list[str]:
    """One line per reason the stage fails: each rule failed at severity error, and fewer than 2 classes."""
    messages = [
        f"rule {o.rule} failed: {o.detail}; {_RULES[o.rule].fix} (or set validate.severity.{o.rule}: warning)"
        for o in errors
    ]
    usable_classes = sorted(classes[classes > 0].index)
    if len(usable_classes) < 2 and not any(o.rule == "min_classes" for o in errors):
        messages.append(
            f"only {len(usable_classes)} class(es) with usable images {usable_classes}; a classifier needs "
            "at least 2: add a folder of images per class under paths.data_root"
        )
    return messages


def _read_manifest(path: Path) -> tuple[pd.DataFrame, dict[str, str] | None]:
    """The manifest checked against its schema and sorted by path, with its rows' text lines by path when it
    has ingest's header and each row is one line. `validated` then copies the usable rows' lines instead of
    formatting 70,000 rows again (0.15 s); a path with a line break in it is quoted over two lines, and then
    the rows are formatted."""
    if not path.is_file():
        raise PipelineError(f"paths.manifest: {path} not found; run `python -m pipeline ingest` first")
    data = path.read_bytes()
    raw = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    lines = data.decode("utf-8").split("\n")
    by_path = None
    if lines[0] == _MANIFEST_HEADER and len(lines) == len(raw) + 2 and not lines[-1]:
        by_path = dict(zip(raw["path"].tolist(), lines[1:-1], strict=True))
    for column in ("size_bytes", "width", "height"):
        if column in raw:
            raw[column] = raw[column].replace("", None)
    try:
        manifest = ManifestSchema.validate(raw, lazy=True)
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


def _duplicates(ok: pd.DataFrame) -> pd.DataFrame:
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


def _classes(manifest: pd.DataFrame, usable: pd.DataFrame) -> pd.DataFrame:
    """Usable images per class; a class whose files were all excluded (or an empty folder) counts 0."""
    labels = sorted(set(manifest.loc[manifest["label"] != "", "label"]))
    counts = usable["label"].value_counts()
    return pd.DataFrame({"label": labels, "images": [int(counts.get(label, 0)) for label in labels]})


def _summary(files: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    present = classes.loc[classes["images"] > 0, "images"]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    bad = float((files["status"] != "ok").mean()) if len(files) else 0.0
    return pd.DataFrame({"classes": [len(present)], "imbalance_ratio": [ratio], "bad_fraction": [bad]})


class _GxChecker:
    """A Great Expectations ephemeral context: one suite per frame, results rendered as Data Docs."""

    def __init__(self, docs_dir: Path) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        # GX logs hundreds of INFO lines about its own set-up; only its warnings are worth showing.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx  # slow import (~3 s): only when the stage runs
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        site = {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
        }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites={"validate": site},
        )
        self._gx = gx
        self._context = gx.get_context(mode="ephemeral", project_config=config)
        self._source = self._context.data_sources.add_pandas("manifest")

    def check(self, name: str, frame: pd.DataFrame, params: Params) -> dict[str, _Outcome]:
        """Run the suite of the rules (not `off`) that check frame `name`; one outcome per rule."""
        gx, severity = self._gx, params.validate.severity
        rules = [
            rule for rule, spec in _RULES.items() if spec.frame == name and getattr(severity, rule) != "off"
        ]
        if not rules:
            return {}
        suite = self._context.suites.add(gx.ExpectationSuite(name=name))
        for rule in rules:
            spec = _RULES[rule]
            bound = {spec.bound: spec.threshold(params)}
            suite.add_expectation(
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=spec.column, **bound, meta={"rule": rule}
                )
            )
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = gx.ValidationDefinition(name=name, data=batch, suite=suite)
        definition = self._context.validation_definitions.add(definition)
        index = _INDEX[name]
        result_format = {
            "result_format": "COMPLETE",
            **({"unexpected_index_column_names": index} if index else {}),
        }
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        outcomes = {}
        for item in result.results:
            rule = item.expectation_config.meta["rule"]
            if item.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"Great Expectations could not evaluate rule {rule}: {item.exception_info}"
                )
            spec = _RULES[rule]
            column = frame[spec.column]
            worst = (column.min() if spec.bound == "min_value" else column.max()) if len(column) else None
            offenders = (
                [row[index[0]] for row in item.result.get("unexpected_index_list", [])] if index else []
            )
            outcomes[rule] = _Outcome(
                rule=rule,
                severity=getattr(severity, rule),
                passed=bool(item.success),
                observed=None if worst is None else float(worst),
                threshold=float(spec.threshold(params)),
                offenders=offenders,
            )
        return outcomes

    def build_docs(self) -> None:
        self._context.build_data_docs()


def _exclusions(outcomes: dict[str, _Outcome], ok: pd.DataFrame) -> dict[str, str]:
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


def _describe(outcome: _Outcome, frames: dict[str, pd.DataFrame], ok: pd.DataFrame, params: Params) -> str:
    """A failed rule in words, naming the offending classes or files."""
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
        named = [
            " = ".join(f"{path!r} ({value})" for path, value in zip(g["path"], g[key], strict=True))
            for _, g in groups
        ]
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
        f"(see {params.paths.quarantine} for each file and its reason)"
    )


def _listing(items: list[str]) -> str:
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "[" + ", ".join(items[:_SHOWN]) + more + "]"


def _details(manifest: pd.DataFrame, classes: pd.Series, outcomes: dict[str, _Outcome]) -> dict:
    """What the metrics leave out: usable images per class, manifest rows by status, every rule's outcome."""
    return {
        "rows": len(manifest),
        "images_per_class": {label: int(n) for label, n in classes.items()},
        "status": {s: int(n) for s, n in manifest["status"].value_counts().sort_index().items()},
        "rules": {rule: _rule_details(outcomes.get(rule)) for rule in _RULES},
    }


def _rule_details(outcome: _Outcome | None) -> dict:
    if outcome is None:
        return {"severity": "off"}
    failure = {} if outcome.passed else {"detail": outcome.detail}
    return {
        "severity": outcome.severity,
        "passed": outcome.passed,
        "observed": outcome.observed,
        "threshold": outcome.threshold,
        "offenders": len(outcome.offenders),
        **failure,
    }


def _quarantine(manifest: pd.DataFrame, excluded: dict[str, str]) -> pd.DataFrame:
    """Every excluded file with its reason: the ingest status, or the rule that took it out."""
    bad = manifest.loc[manifest["status"] != "ok", ["path", "label", "status"]].rename(
        columns={"status": "reason"}
    )
    ruled = manifest.loc[manifest["path"].isin(excluded), ["path", "label"]]
    ruled = ruled.assign(reason=ruled["path"].map(excluded))
    return pd.concat([bad, ruled]).sort_values("path", kind="stable").reset_index(drop=True)


def _plot_distribution(
    classes: pd.DataFrame, manifest: pd.DataFrame, excluded: dict[str, str], params: Params
) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    dropped = manifest[((manifest["status"] != "ok") | manifest["path"].isin(excluded))]
    dropped = dropped[dropped["status"] != "empty_class_folder"]["label"].value_counts()
    dropped = dropped.reindex(classes["label"], fill_value=0).to_numpy()
    kept = classes["images"].to_numpy()
    figure = Figure(figsize=(max(4.0, 0.5 * len(classes) + 2), 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.bar(classes["label"], kept, label="usable", color="#4c72b0")
    axes.bar(classes["label"], dropped, bottom=kept, label="quarantined", color="#dd8452")
    axes.axhline(
        params.validate.min_images_per_class, color="grey", linestyle="--", label="min_images_per_class"
    )
    axes.set_ylabel("images")
    axes.set_title("Images per class")
    axes.tick_params(axis="x", labelrotation=45)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _page(checked: _Checked, distribution_png: bytes, params: Params) -> str:
    """The validation view: headline and verdict, every rule, the class distribution, the quarantine."""
    classes = page.image(distribution_png, "images per class") + page.table(
        ["class", "usable images"], checked.details["images_per_class"].items()
    )
    docs = f"<p>{page.link(f'{DOCS_DIR}/index.html', 'Data Docs')}</p>" + page.note(_DOCS_NOTE)
    sections = [
        ("headline", "Headline", _headline(checked)),
        ("rules", "Rules", _rules_table(checked, params)),
        ("classes", "Class distribution", classes),
        ("quarantine", "Quarantine", _quarantine_list(checked.quarantine, params.paths.quarantine)),
        ("data-docs", "Great Expectations Data Docs", docs),
        ("raw", "Raw figures", _raw(checked)),
    ]
    return page.document("Data validation", sections)


def _raw(checked: _Checked) -> str:
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


def _headline(checked: _Checked) -> str:
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


def _rules_table(checked: _Checked, params: Params) -> str:
    rows = []
    for rule, spec in _RULES.items():
        outcome = checked.outcomes.get(rule)
        check = f"{_SUBJECT[spec.frame]}{spec.column} {_BOUND[spec.bound]} {spec.threshold(params):g}"
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

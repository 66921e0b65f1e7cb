"""Stage: validate. Check the manifest's shape (pandera) and the data rules (Great Expectations), then
write the usable rows for `split` and a quarantine of every excluded file with its reason.

Each rule's severity (`validate.severity`) decides what a failure does: `error` fails the stage (after every
report is written, so the user can look), `warning` logs and records it and quarantines the offending files
where the rule is about files, `off` skips the rule. Class counts are taken on the usable images.

The schema and the rules live in `rules`, the Great Expectations checker in `gx`, the page in `page`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import Params, PathsParams, ValidateParams
from pipeline.data.images import MANIFEST_COLUMNS
from pipeline.data.labels import SINGLE, LabelSets
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, atomic_path, write_json
from pipeline.stages import Stage
from pipeline.stages.validate import label_sets, page, rules
from pipeline.stages.validate.gx import DOCS_DIR, GxChecker
from pipeline.stages.validate.rules import RULES, Outcome

STAGE = Stage(
    summary="Check the manifest (pandera schema + Great Expectations rules); quarantine unusable files.",
    params=("validate", "base.task", "base.label_separator"),
    deps=("manifest",),
    outs=("validated", "quarantine", "reports:validate"),
    page="index.html",
    dvc_plots={"class_distribution.png": {}},
)

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """Every rule's outcome on one manifest and what follows from them."""

    frames: dict[str, pd.DataFrame]
    outcomes: dict[str, Outcome]
    excluded: dict[str, str]  # path -> the rule that excluded it
    usable: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict  # the headline figures `dvc exp show` compares
    details: dict  # images per class, rows by status, every rule's outcome
    messages: list[str]  # why the stage fails; empty when it passes
    sets: LabelSets = SINGLE  # how the label cells read (a multilabel task's label sets)
    merged: int = 0  # multilabel: copies of a file whose labels went to its kept copy

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if not o.passed]


def run(params: Params) -> dict:
    """Check the manifest, write the reports, the quarantine and the metrics; then fail on an error, or write
    the usable rows for `split`."""
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    manifest, manifest_lines = rules.read_manifest(params.paths.manifest, sets.multilabel)
    with atomic_dir(params.paths.reports("validate")) as report_dir:
        checker = GxChecker(report_dir / DOCS_DIR)
        checked = _check(manifest, checker, params.validate, params.paths.quarantine, sets)
        checker.build_docs()
        _write_reports(report_dir, checked, manifest, params.validate, params.paths)

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
    _write_validated(checked.usable, None if checked.merged else manifest_lines, params.paths.validated)
    log.info(
        "validate: %d usable images in %d classes, %d quarantined",
        len(checked.usable),
        checked.metrics["classes"],
        len(checked.quarantine),
    )
    return checked.metrics


def _write_reports(
    report_dir: Path, checked: Checked, manifest: pd.DataFrame, settings: ValidateParams, paths: PathsParams
) -> None:
    """The class-distribution plot, the validation page and details.json, beside GX's Data Docs."""
    classes = checked.frames["classes"]
    png = page.plot_distribution(
        classes, manifest, checked.excluded, settings.min_images_per_class, checked.sets
    )
    (report_dir / "class_distribution.png").write_bytes(png)
    html = page.render(checked, png, settings, paths.quarantine)
    (report_dir / STAGE.page).write_text(html, encoding="utf-8")
    write_json(report_dir / paths.details("validate").name, checked.details)


def _write_validated(usable: pd.DataFrame, manifest_lines: dict[str, str] | None, path: Path) -> None:
    """The usable rows as the manifest holds them: their lines copied when each row is one line, else
    formatted again."""
    with atomic_path(path) as tmp:
        if manifest_lines is None:
            usable[list(MANIFEST_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
        else:
            rows = [manifest_lines[row] for row in usable["path"].tolist()]
            tmp.write_text("\n".join([rules.MANIFEST_HEADER, *rows, ""]), encoding="utf-8")


def _check(
    manifest: pd.DataFrame, checker: GxChecker, settings: ValidateParams, quarantine: Path, sets: LabelSets
) -> Checked:
    """Run the file rules, exclude their offenders, then the class and summary rules on the usable files
    (`quarantine`: the CSV the failures' details point to). In a multilabel task (`sets`) identical files are
    one image with the union of their labels (`label_sets.merged`), not a label conflict, and the class
    rules count each label's positives."""
    if sets.multilabel:
        severity = settings.severity.model_copy(update={"label_conflict": "off"})
        settings = settings.model_copy(update={"severity": severity})
    files = manifest[manifest["status"] != "empty_class_folder"]
    ok = manifest[manifest["status"] == "ok"].copy()
    ok["min_side"] = ok[["width", "height"]].min(axis=1).astype("int64")
    ok["pixels"] = (ok["width"] * ok["height"]).astype("int64")
    frames = {
        "files": ok[["path", "label", "width", "height", "min_side", "pixels"]],
        "duplicates": rules.duplicates(ok),
    }
    outcomes: dict[str, Outcome] = {}
    for name in ("files", "duplicates"):
        outcomes.update(checker.check(name, frames[name], settings))
    excluded = rules.exclusions(outcomes, ok)
    usable = ok[~ok["path"].isin(excluded)]
    merged: dict[str, str] = {}
    if sets.multilabel:
        usable, merged = label_sets.merged(usable, sets)
        excluded.update(merged)
    frames["classes"] = rules.classes(manifest, usable, sets)
    frames["summary"] = rules.summary(files, frames["classes"])
    for name in ("classes", "summary"):
        outcomes.update(checker.check(name, frames[name], settings))
    quarantine = _quarantine(manifest, excluded)
    checked = Checked(frames, outcomes, excluded, usable, quarantine, {}, {}, [], sets, len(merged))
    for outcome in checked.failed:
        outcome.detail = rules.describe(outcome, frames, ok, quarantine)
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
    if sets.multilabel:
        checked.details["multilabel"] = {"merged_copies": len(merged), **label_sets.figures(usable, sets)}
    checked.messages = _failures(errors, classes)
    return checked


def _failures(errors: list[Outcome], classes: pd.Series) -> list[str]:
    """One line per reason the stage fails: each rule failed at severity error, and fewer than 2 classes."""
    messages = [f"rule {o.rule} failed: {o.detail}; {rules.advice(o)}" for o in errors]
    usable_classes = sorted(classes[classes > 0].index)
    if len(usable_classes) < 2 and not any(o.rule == "min_classes" for o in errors):
        messages.append(
            f"only {len(usable_classes)} class(es) with usable images {usable_classes}; a classifier needs "
            "at least 2: add a folder of images per class under paths.data_root"
        )
    return messages


def _details(manifest: pd.DataFrame, classes: pd.Series, outcomes: dict[str, Outcome]) -> dict:
    """What the metrics leave out: usable images per class, manifest rows by status, every rule's outcome."""
    return {
        "rows": len(manifest),
        "images_per_class": {label: int(n) for label, n in classes.items()},
        "status": {s: int(n) for s, n in manifest["status"].value_counts().sort_index().items()},
        "rules": {rule: _rule_details(outcomes.get(rule)) for rule in RULES},
    }


def _rule_details(outcome: Outcome | None) -> dict:
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

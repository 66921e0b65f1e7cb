"""Stage: audit. What a byte-level check cannot see, found with the pretrained backbone's eyes: near-duplicate
images, likely label errors, and drift of the images added since the champion's training set.

Every usable image is embedded once (eval transform; features cached by content, so train's feature passes
and later runs reuse them). Then (`checks`): near-duplicate groups (embedding cosine similarity, then an
aligned pixel comparison of each image's nearest neighbours), out-of-fold probabilities of a k-fold logistic
regression on the embeddings ranked by cleanlab, and a class-prior shift plus the cross-validated AUC of an
old-vs-new classifier. It writes the per-image table split reads (`pipeline.data.audit`), details.json, the
page (`page`) and the metrics.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import (
    AuditParams,
    AuditSeverityParams,
    AugmentParams,
    FeaturesParams,
    ModelParams,
    Params,
)
from pipeline.data.audit import AUDIT_COLUMNS
from pipeline.data.labels import SINGLE, LabelSets, joined, multi_hot
from pipeline.data.splits import read_splits_table, read_validated
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, atomic_path, write_json
from pipeline.stages import Stage
from pipeline.stages.audit import checks, label_sets, page
from pipeline.stats import mean_average_precision

STAGE = Stage(
    summary="Embed every image: near-duplicates, likely label errors (cleanlab), drift since the champion.",
    params=(
        "base.seed",
        "base.task",
        "base.label_separator",
        "audit",
        "model",
        "features",
    ),
    deps=("validated",),
    outs=("reports:audit",),
    page="index.html",
)

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    """Embed, check, write the table, page, details and metrics; then fail if a check at severity error
    found something."""
    started = time.perf_counter()
    paths, seed = params.paths, params.base.seed
    table = read_validated(paths.validated, "audit")
    files = [paths.data_root / path for path in table["path"]]
    embeddings = embed(table, files, params.model, params.features, paths.cache_dir, seed)
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    found = audit(
        table, embeddings, files, params.audit, params.model.weights, paths.champion_splits, seed, sets
    )
    found.metrics["seconds"] = round(time.perf_counter() - started, 3)
    with atomic_dir(paths.reports("audit")) as report_dir:
        with atomic_path(report_dir / paths.audit_table.name) as tmp:
            found.table[list(AUDIT_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
        write_json(report_dir / paths.details("audit").name, found.details)
        (report_dir / STAGE.page).write_text(page.render(found, files, params.audit), encoding="utf-8")
    write_json(paths.metrics("audit"), found.metrics)
    for line in found.warnings:
        log.warning("audit: %s", line)
    if found.errors:
        raise PipelineError("\n".join([*found.errors, f"details: {paths.reports('audit') / STAGE.page}"]))
    log.info("audit: %s", found.metrics)
    return found.metrics


def embed(
    table: pd.DataFrame,
    files: list[Path],
    model: ModelParams,
    features: FeaturesParams,
    cache_dir: Path,
    seed: int,
) -> np.ndarray:
    """(N, C) float16 pooled backbone features of the table's images (`files`, same order), a read-only memmap
    to read a block at a time, by the `features` pass, the one train's head-only epochs use, so either reuses
    what the other computed (both cache by content under `cache_dir`). `seed`: base.seed, as train seeds."""
    import torch

    from pipeline.data.cache import build_cache, identity
    from pipeline.data.loader import CachedImages
    from pipeline.data.transforms import build_transforms
    from pipeline.models import build_model, resolve_data_config
    from pipeline.training.checkpoint import seed_everything
    from pipeline.training.distributed import Dist
    from pipeline.training.features import backbone_features, feature_pass

    seed_everything(seed)  # as train does: random-init weights (weights: none) match its own
    batch_size, precision, channels_last = feature_pass(features, Dist())
    data_config = resolve_data_config(model)
    identities = [identity(p, sha) for p, sha in zip(table["path"], table["sha256"], strict=True)]
    cache_file = build_cache(files, identities, data_config, cache_dir, workers=os.cpu_count() or 1)
    backbone = build_model(model, num_classes=None).backbone.to(precision.device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    labels = np.zeros(len(table), dtype=np.int64)
    transform = build_transforms(data_config, AugmentParams(), train=False)  # eval: no augmentation
    images = CachedImages(cache_file, labels, transform, seed, random=False)
    settings = (batch_size, precision, channels_last, cache_dir, Dist())
    return backbone_features(backbone, [images], *settings)[0]


@dataclass
class Found:
    """What the audit found, and what follows from it."""

    table: pd.DataFrame  # AUDIT_COLUMNS, one row per usable image, sorted by path
    suspects: pd.DataFrame  # the label issues, most likely first (rows of `table`)
    groups: pd.DataFrame  # near-duplicate groups of two or more images: group, images, labels, splits
    drift: dict
    metrics: dict = field(default_factory=dict)  # the headline figures `dvc exp show` compares
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why the stage fails; empty when it passes


def audit(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    files: list[Path],
    settings: AuditParams,
    weights: str,
    champion_splits: Path,
    seed: int,
    sets: LabelSets = SINGLE,
) -> Found:
    """Run the three checks on the embeddings of `table`'s images (`files`, same order). `weights`: the
    backbone's (model.weights); `champion_splits`: the champion's training set, drift's baseline; `sets`: how
    the label cells read (a multilabel task's: cleanlab's multi-label mode, label prevalences for drift)."""
    # An untrained backbone's features find every image alike: no near-duplicate search on them.
    search = settings.near_duplicates and weights != "none"
    pairs = checks.near_duplicate_pairs(embeddings, files, settings) if search else checks.Pairs.empty()
    table = table.assign(group=checks.group_ids(table["sha256"].tolist(), pairs))
    table["group_size"] = table.groupby("group")["path"].transform("size").astype(int)
    label_check = _label_set_issues if sets.multilabel else _label_issues
    table, suspects, label_note, probe = label_check(table, embeddings, settings, seed, sets)
    drift = _drift(table, embeddings, settings, champion_splits, seed, sets)
    found = Found(table, suspects, _groups(table), drift)
    _judge_groups(found, settings.severity)
    groups = found.groups
    found.metrics = {
        "images": len(table),
        "near_duplicate_groups": len(groups),
        "near_duplicate_images": int(groups["images"].sum()) if len(groups) else 0,
        "cross_label_groups": int((groups["labels"] > 1).sum()) if len(groups) else 0,
        "cross_split_groups": int((groups["splits"] > 1).sum()) if len(groups) else 0,
        "label_issues": len(suspects),
        # how well the probe whose mistakes cleanlab ranks predicts the given labels on images it did not
        # fit (None: not run): a weak probe's flags are mostly its own errors
        PROBE_METRIC[sets.multilabel]: probe,
        "quarantined": int(table["quarantined"].sum()),
        "drift_auc": found.drift.get("auc"),
        "prior_shift": found.drift.get("prior_shift"),
        "drifted": found.drift.get("drifted"),
    }
    found.details = {
        "settings": settings.model_dump(),
        "near_duplicate_pairs": len(pairs)
        if search
        else "not searched (audit.near_duplicates, model.weights)",
        "label_issues": label_note,
        "drift": found.drift,
    }
    return found


PROBE_METRIC = {False: "label_probe_accuracy", True: "label_probe_map"}  # by multilabel: macro mAP


def _label_issues(
    table: pd.DataFrame, embeddings: np.ndarray, settings: AuditParams, seed: int, sets: LabelSets
) -> tuple[pd.DataFrame, pd.DataFrame, str, float | None]:
    """The table with the label columns filled, the suspects (ranked), a note on what ran and the probe's
    out-of-fold accuracy (None when it did not run)."""
    mode = settings.label_issues
    classes = sorted(table["label"].unique())
    y = table["label"].map({name: i for i, name in enumerate(classes)}).to_numpy(dtype=np.int64)
    folds = checks.usable_folds(y, settings.folds)
    table = table.assign(label_issue=False, suggested_label="", label_quality=np.nan, quarantined=False)
    if mode == "off":
        return table, table.iloc[:0], "off (audit.label_issues: off)", None
    if len(classes) < 2 or folds < 2:
        return table, table.iloc[:0], "skipped: needs 2 classes of at least 2 images each", None
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        probabilities = checks.out_of_fold_probabilities(embeddings, y, folds, seed, folder=Path(tmp))
        issues = checks.label_issues(y, probabilities)
        del probabilities  # the memory-mapped file goes with the folder
    flagged = np.zeros(len(table), dtype=bool)
    flagged[issues.ranked] = True
    table = table.assign(
        label_issue=flagged,
        suggested_label=np.array(classes, dtype=object)[issues.suggested],
        label_quality=issues.quality.round(6),
        quarantined=flagged & (mode == "quarantine"),
    )
    probe = "logistic regression" if len(y) <= checks.PROBE_ABOVE else "linear discriminant"
    accuracy = float(np.mean(issues.suggested == y))
    note = f"{mode}: {folds}-fold {probe} + cleanlab; the probe's out-of-fold accuracy {accuracy:.3f}"
    return table, table.iloc[issues.ranked], note, accuracy


def _label_set_issues(
    table: pd.DataFrame, embeddings: np.ndarray, settings: AuditParams, seed: int, sets: LabelSets
) -> tuple[pd.DataFrame, pd.DataFrame, str, float | None]:
    """`_label_issues` for label sets (`label_sets`): the suggested label is the set the probe prefers."""
    mode = settings.label_issues
    pairs = sets.exploded(table["label"])
    names = np.array(sorted(pairs["label"].unique()), dtype=object)
    targets = multi_hot(pairs, len(table), names, np.float32)
    folds = label_sets.usable_folds(targets, settings.folds)
    table = table.assign(label_issue=False, suggested_label="", label_quality=np.nan, quarantined=False)
    if mode == "off":
        return table, table.iloc[:0], "off (audit.label_issues: off)", None
    if folds < 2:
        skipped = "skipped: needs a label with at least 2 images with it and 2 without"
        return table, table.iloc[:0], skipped, None
    label_lists = [np.flatnonzero(row) for row in targets]
    assignment = label_sets.fold_of(label_lists, folds, seed)
    probabilities = label_sets.out_of_fold_probabilities(embeddings, targets, assignment)
    issues = label_sets.label_issues(label_lists, probabilities)
    flagged = np.zeros(len(table), dtype=bool)
    flagged[issues.ranked] = True
    table = table.assign(
        label_issue=flagged,
        suggested_label=[joined(names[list(labels)], sets.separator) for labels in issues.suggested],
        label_quality=issues.quality.round(6),
        quarantined=flagged & (mode == "quarantine"),
    )
    probe = "logistic regression" if len(table) <= checks.PROBE_ABOVE else "ridge regression"
    figure = mean_average_precision(targets, probabilities)
    note = f"{mode}: {folds}-fold one-vs-rest {probe} + cleanlab (multi-label)"
    if figure is not None:
        note += f"; the probe's out-of-fold mAP {figure:.3f}"
    return table, table.iloc[issues.ranked], note, figure


def _groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per near-duplicate group of two or more distinct files: size, labels and given splits."""
    multi = table[table["group_size"] > 1]
    given = multi["split"].where(multi["split"] != "")
    groups = (
        multi.assign(given=given)
        .groupby("group", sort=True)
        .agg(images=("path", "size"), labels=("label", "nunique"), splits=("given", "nunique"))
    )
    return groups.reset_index().sort_values(["splits", "labels", "images"], ascending=False, kind="stable")


_GROUP_RULES = {  # rule -> (groups column that must stay at 1, what it means, the fix)
    "near_duplicate_conflict": ("labels", "under two or more labels", "relabel or remove the copies"),
    "near_duplicate_leakage": ("splits", "in two or more given splits (leakage)", "keep each in one split"),
}


def _judge_groups(found: Found, severities: AuditSeverityParams) -> None:
    """Each group rule's outcome by its severity: an error line, or a warning line, or nothing."""
    for rule, (column, meaning, fix) in _GROUP_RULES.items():
        severity = getattr(severities, rule)
        count = int((found.groups[column] > 1).sum()) if len(found.groups) else 0
        if severity == "off" or count == 0:
            continue
        line = f"rule {rule}: {count} near-duplicate group(s) {meaning}"
        if severity == "error":
            found.errors.append(f"{line}; {fix} (or set audit.severity.{rule}: warning)")
        else:
            found.warnings.append(line)
    largest = int(found.groups["images"].max()) if len(found.groups) else 0
    if largest > max(_CHAIN_MIN, _CHAIN_SHARE * len(found.table)):
        found.warnings.append(
            f"the largest near-duplicate group holds {largest} of {len(found.table)} images: pairs chain "
            "through images that are only alike, and split keeps a group in one split; look at it on the "
            "audit page, and raise audit.similarity or audit.pixel_correlation if they are not copies"
        )


# A group this large (more images than both) is a chain, not copies of one picture: at 32 px input the scale
# benchmark's 100,000 generated images made one group of 11,651, and the test split got 25.6% instead of 15%.
_CHAIN_MIN, _CHAIN_SHARE = 50, 0.01


def _drift(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    settings: AuditParams,
    record: Path,
    seed: int,
    sets: LabelSets,
) -> dict:
    """The images added since the champion's training set (`record`) against the ones it was trained on; the
    prior shift compares how often each class (a multilabel task's: each label, `sets`) occurs."""
    if not settings.drift:
        return {"status": "off (audit.drift: false)"}
    if not record.is_file():
        return {"status": f"no champion training set ({record}): nothing to compare with"}
    champion = read_splits_table(record)
    trained = champion[champion["split"] == "train"]
    old = table["sha256"].isin(set(trained["sha256"])).to_numpy()
    new = (~table["sha256"].isin(set(champion["sha256"]))).to_numpy()
    counts = {"old_images": int(old.sum()), "new_images": int(new.sum())}
    if new.sum() < settings.drift_min_images or old.sum() < 2:
        return {
            "status": f"too few images to compare (audit.drift_min_images {settings.drift_min_images})",
            **counts,
        }
    auc = checks.two_sample_auc(embeddings, old, new, settings.folds, seed)
    before = {str(k): int(v) for k, v in sets.counts(trained["label"]).items()}
    after = {str(k): int(v) for k, v in sets.counts(table.loc[new, "label"]).items()}
    shift = checks.prior_shift(before, after)
    drifted = auc > settings.drift_max_auc or shift > settings.drift_max_prior_shift
    figures = {"auc": round(auc, 4), "prior_shift": round(shift, 4), "drifted": drifted}
    status = "drifted" if drifted else "no drift"
    return {"status": status, **figures, "priors": {"champion_train": before, "new": after}, **counts}

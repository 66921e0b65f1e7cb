"""Stage: split. Stratified train/val/test split of the usable images that keeps identical files together.

The unit of splitting is a group of byte-identical files (same sha256), or the audit's near-duplicate group
when it wrote one (`pipeline.data.audit`), drawn per class with scikit-learn, so duplicates never straddle
splits and every class gets its share of every split. A pre-split source keeps its given splits (and can
carve `test` out of `val` or `train`). Same input and params: byte-identical output.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.config import Params
from pipeline.data.audit import with_audit_groups
from pipeline.data.images import SPLITS
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("path", "label", "split", "sha256", "width", "height")


def run(params: Params) -> dict:
    table = with_audit_groups(_read_validated(params.paths.validated), params.paths.audit_table)
    given = table["split"] != ""
    if params.split.keep_given_splits and given.any():
        if not given.all():
            examples = table.loc[~given, "path"].head(3).tolist()
            raise PipelineError(
                f"{params.paths.validated}: {int((~given).sum())} images have no given split "
                f"(e.g. {examples}) while others do; give every row a split, or set "
                "split.keep_given_splits: false"
            )
        table, strategy = _keep_given(table, params)
    else:
        table, strategy = _stratified(table, params), "stratified"

    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    with atomic_path(params.paths.splits) as tmp:
        table[list(SPLIT_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
    labels = sorted(table["label"].unique())
    counts = pd.crosstab(table["label"], table["split"]).reindex(index=labels, columns=SPLITS, fill_value=0)
    per_class = {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS}
    metrics = {
        "strategy": strategy,
        "images": {split: int(counts[split].sum()) for split in SPLITS},  # 3 columns, whatever the classes
    }
    details = {"classes": labels, "groups": int(table["group"].nunique()), "per_class": per_class}
    write_json(params.paths.details("split"), details)
    write_json(params.paths.metrics("split"), metrics)
    log.info("split (%s): %s", strategy, metrics["images"])
    return {"strategy": strategy, **metrics["images"]}


def _read_validated(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"paths.validated: {path} not found; run `python -m pipeline validate` first")
    text_columns = {"path": str, "label": str, "split": str, "sha256": str}
    table = pd.read_csv(path, dtype=text_columns, keep_default_na=False)
    missing = [column for column in SPLIT_COLUMNS if column not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing columns {missing}; re-run `python -m pipeline validate`")
    if table.empty:
        raise PipelineError(f"{path}: no usable images to split; check the quarantine written by validate")
    return table


def _stratified(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per class, draw whole duplicate groups into test, then val (sizes from `_allocate`); rest: train."""
    fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
    wanted = [split for split, fraction in fractions.items() if fraction > 0]
    split_of: dict[str, str] = {}
    small = []
    for label, shas in _groups(table).items():
        if len(shas) < len(wanted):
            small.append(f"{label!r} ({len(shas)} distinct images)")
            split_of.update(dict.fromkeys(shas, "train"))
            continue
        counts = _allocate(len(shas), fractions)
        rest = shas
        for split in ("test", "val"):
            rest, drawn = _draw(rest, counts[split], params.base.seed)
            split_of.update(dict.fromkeys(drawn, split))
        split_of.update(dict.fromkeys(rest, "train"))
    _small_classes(small, f"appear in each of {wanted}", "their images all go to train", params)
    return table.assign(split=table["group"].map(split_of))


def _keep_given(table: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, str]:
    """The source's own splits; with `split.carve_test_from`, a stratified test set of fraction `split.test`
    of that split is carved out of it when the source gave no test split."""
    source, strategy = params.split.carve_test_from, "given"
    if source != "none" and (table["split"] == "test").any():
        log.info("split: the source has a test split; split.carve_test_from: %s is not needed", source)
    elif source != "none":
        if params.split.test == 0:
            raise PipelineError(
                f"split.carve_test_from is {source} but split.test is 0; set split.test to the fraction "
                f"of {source} to move into test"
            )
        carved, small = set(), []
        for label, shas in _groups(table[table["split"] == source]).items():
            if len(shas) < 2:
                small.append(f"{label!r} ({len(shas)} distinct images in {source})")
                continue
            counts = _allocate(len(shas), {source: 1.0 - params.split.test, "test": params.split.test})
            carved.update(_draw(shas, counts["test"], params.base.seed)[1])
        _small_classes(small, f"give images to both {source} and test", f"they stay in {source}", params)
        moved = (table["split"] == source) & table["group"].isin(carved)
        table = table.assign(split=table["split"].where(~moved, "test"))
        strategy = f"given, test carved from {source}"
    present = [split for split in SPLITS if (table["split"] == split).any()]
    missing = [
        f"{label!r} (not in {[s for s in present if s not in set(rows['split'])]})"
        for label, rows in table.groupby("label", sort=True)
        if not set(present) <= set(rows["split"])
    ]
    _small_classes(missing, f"appear in each given split {present}", "the splits stay as given", params)
    return table, strategy


def _groups(table: pd.DataFrame) -> dict[str, list[str]]:
    """Class -> sorted ids of its duplicate groups (a group under two labels goes with the first)."""
    group_label = table.groupby("group", sort=True)["label"].min()
    return {label: shas.index.tolist() for label, shas in group_label.groupby(group_label, sort=True)}


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split n items by fractions: largest remainders, but at least one item for every non-zero fraction
    (the caller guarantees n is at least the number of non-zero fractions)."""
    quotas = {split: n * fraction for split, fraction in fractions.items()}
    counts = {split: max(1, math.floor(q)) if fractions[split] > 0 else 0 for split, q in quotas.items()}
    while sum(counts.values()) < n:
        grow = max((s for s in counts if fractions[s] > 0), key=lambda s: quotas[s] - counts[s])
        counts[grow] += 1
    while sum(counts.values()) > n:
        shrink = max((s for s in counts if counts[s] > 1), key=lambda s: counts[s] - quotas[s])
        counts[shrink] -= 1
    return counts


def _draw(ids: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(rest, drawn): n ids drawn at random (seeded) from a sorted list; both parts come back sorted."""
    if n == 0:
        return ids, []
    if n >= len(ids):
        return [], ids
    rest, drawn = train_test_split(ids, test_size=n, random_state=seed, shuffle=True)
    return sorted(rest), sorted(drawn)


def _small_classes(offenders: list[str], need: str, consequence: str, params: Params) -> None:
    if not offenders:
        return
    problem = f"classes [{', '.join(offenders)}] are too small to {need}"
    if params.split.small_class == "error":
        raise PipelineError(
            f"{problem}; add images to them, or set split.small_class: warning ({consequence})"
        )
    log.warning("split: %s; %s", problem, consequence)

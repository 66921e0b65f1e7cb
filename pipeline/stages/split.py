"""Stage: split. Train/val/test split of the usable images per class, keeping duplicates together.

The unit of splitting is a group of byte-identical files (same sha256), joined by the `group` column (the
audit's near-duplicate groups, `pipeline.data.audit`), so a unit never straddles splits. Two methods:

- `stable` (default): a unit's split depends only on the keyed hash of its content and the seed (its
  position in [0, 1), compared with the cumulative fractions test, val, train), so adding, removing or
  relabelling other images never moves it. A class's count in a split is then Binomial(n, fraction): with
  99.9% probability its share is within 3.29 * sqrt(f (1 - f) / n) of the fraction f. A class whose draw
  leaves a wanted split empty gets it filled by rank (its units with the smallest positions go to test, then
  val); only these fillers can move when that class changes.
- `stratified`: an exact per-class draw with scikit-learn; any change to the data can reshuffle it.

A pre-split source keeps its given splits (and can carve `test` out of `val` or `train` by the same method).
Same input and params: byte-identical output.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.config import Params
from pipeline.data.audit import with_audit_groups
from pipeline.data.images import SPLITS
from pipeline.data.splits import VALIDATED_COLUMNS, read_validated
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)

GROUP_COLUMN = "group"  # set on every row by pipeline.data.audit: rows with the same value stay together


def run(params: Params) -> dict:
    table = with_audit_groups(read_validated(params.paths.validated, "split"), params.paths.audit_table)
    given = table["split"] != ""
    if params.split.keep_given_splits and given.any():
        if not given.all():
            examples = table.loc[~given, "path"].head(3).tolist()
            raise PipelineError(
                f"{params.paths.validated}: {int((~given).sum())} images have no given split "
                f"(e.g. {examples}) while others do; give every row a split, or set "
                "split.keep_given_splits: false"
            )
        table, strategy, by_rank = _keep_given(table, params)
    else:
        fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
        split_of, by_rank = _split_units(table, fractions, params, "their images all go to train")
        table, strategy = table.assign(split=_unit_keys(table).map(split_of)), params.split.method

    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    with atomic_path(params.paths.splits) as tmp:
        # The columns it read, with `split` now set.
        table[list(VALIDATED_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
    labels = sorted(table["label"].unique())
    counts = pd.crosstab(table["label"], table["split"]).reindex(index=labels, columns=SPLITS, fill_value=0)
    per_class = {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS}
    metrics = {
        "strategy": strategy,
        "images": {split: int(counts[split].sum()) for split in SPLITS},  # 3 columns, whatever the classes
    }
    details = {
        "classes": labels,
        "groups": int(table["sha256"].nunique()),
        "per_class": per_class,
        "placed_by_rank": by_rank,  # stable: units per class placed by rank to fill an empty split
    }
    write_json(params.paths.details("split"), details)
    write_json(params.paths.metrics("split"), metrics)
    log.info("split (%s): %s", strategy, metrics["images"])
    return {"strategy": strategy, **metrics["images"]}


def stable_position(sha256: str, seed: int) -> float:
    """Where a file falls in [0, 1): a keyed hash (BLAKE2b, the seed as key) of its content hash, so it is
    uniform, independent between files, and changes with the seed only."""
    digest = hashlib.blake2b(sha256.encode("ascii"), key=str(seed).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _split_units(
    table: pd.DataFrame, fractions: dict[str, float], params: Params, consequence: str
) -> tuple[dict[str, str], dict[str, int]]:
    """(unit -> split, class -> units placed by rank) for the rows of `table`, class by class.

    `fractions` starts with the split that takes the rest (train, or the split that test is carved from);
    the others are filled first, in reverse order (test, then val), by `split.method`.
    """
    rest, *drawn = fractions
    order = [*reversed(drawn), rest]
    wanted = [split for split in fractions if fractions[split] > 0]
    units = _units(table, params.base.seed)
    split_of: dict[str, str] = {}
    by_rank: dict[str, int] = {}
    small = []
    for label, rows in units.groupby("label", sort=True):
        if len(rows) < len(wanted):
            small.append(f"{label!r} ({len(rows)} distinct images)")
            split_of.update(dict.fromkeys(rows.index, rest))
            continue
        if params.split.method == "stable":
            assigned, placed = _stable(rows["position"], [(s, fractions[s]) for s in order])
            by_rank.update({label: placed} if placed else {})
        else:
            assigned = _stratified(list(rows.index), fractions, order, params.base.seed)
        split_of.update(assigned)
    _small_classes(small, f"appear in each of {wanted}", consequence, params)
    return split_of, by_rank


def _stable(positions: pd.Series, order: list[tuple[str, float]]) -> tuple[dict[str, str], int]:
    """Units (the index) by position against the cumulative fractions of `order`; then each split with a
    non-zero fraction that got no unit takes the nearest units by rank. Returns (unit -> split, moved)."""
    ranked = positions.sort_values(kind="stable")  # units come sorted by key: ties stay deterministic
    values, n = ranked.to_numpy(), len(ranked)
    wanted = [split for split, fraction in order if fraction > 0]
    cuts = np.cumsum([fraction for _, fraction in order if fraction > 0])[:-1]
    ends, previous = [], 0  # rank where each split but the last ends, at least one unit each
    for j, end in enumerate(np.searchsorted(values, cuts, side="left")):
        previous = min(max(int(end), previous + 1), n - (len(wanted) - 1 - j))
        ends.append(previous)
    natural = np.searchsorted(cuts, values, side="right")  # from the position alone
    placed = np.searchsorted(ends, np.arange(n), side="right")
    splits = [wanted[i] for i in placed]
    return dict(zip(ranked.index, splits, strict=True)), int(np.sum(placed != natural))


def _stratified(units: list[str], fractions: dict[str, float], order: list[str], seed: int) -> dict[str, str]:
    """Exact counts (`_allocate`): whole units drawn at random into each split of `order` but the last, which
    takes the rest."""
    counts = _allocate(len(units), fractions)
    split_of, rest = {}, units
    for split in order[:-1]:
        rest, drawn = _draw(rest, counts[split], seed)
        split_of.update(dict.fromkeys(drawn, split))
    split_of.update(dict.fromkeys(rest, order[-1]))
    return split_of


def _keep_given(table: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, str, dict[str, int]]:
    """The source's own splits; with `split.carve_test_from`, fraction `split.test` of each class of that
    split is carved out into test (by `split.method`) when the source gave no test split."""
    source, strategy, by_rank = params.split.carve_test_from, "given", {}
    if source != "none" and (table["split"] == "test").any():
        log.info("split: the source has a test split; split.carve_test_from: %s is not needed", source)
    elif source != "none":
        if params.split.test == 0:
            raise PipelineError(
                f"split.carve_test_from is {source} but split.test is 0; set split.test to the fraction "
                f"of {source} to move into test"
            )
        fractions = {source: 1.0 - params.split.test, "test": params.split.test}
        in_source = table["split"] == source
        split_of, by_rank = _split_units(table[in_source], fractions, params, f"they stay in {source}")
        moved = in_source & _unit_keys(table).map(split_of).eq("test")
        table = table.assign(split=table["split"].where(~moved, "test"))
        strategy = f"given, test carved from {source} ({params.split.method})"
    present = [split for split in SPLITS if (table["split"] == split).any()]
    missing = [
        f"{label!r} (not in {[s for s in present if s not in set(rows['split'])]})"
        for label, rows in table.groupby("label", sort=True)
        if not set(present) <= set(rows["split"])
    ]
    _small_classes(missing, f"appear in each given split {present}", "the splits stay as given", params)
    return table, strategy, by_rank


def _units(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One row per unit, indexed by its key (sorted): `label`, the smallest of its labels (a unit under two
    labels goes with the first), and `position`, the smallest `stable_position` of its files."""
    shas = table["sha256"].unique()
    position = dict(zip(shas, (stable_position(sha, seed) for sha in shas), strict=True))
    rows = pd.DataFrame(
        {"unit": _unit_keys(table), "label": table["label"], "position": table["sha256"].map(position)}
    )
    return rows.groupby("unit", sort=True).agg(label=("label", "min"), position=("position", "min"))


def _unit_keys(table: pd.DataFrame) -> pd.Series:
    """Each row's unit: the smallest sha256 among the files linked to it by equal bytes or an equal `group`
    value (connected components)."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]  # path halving
            node = parent[node]
        return node

    for sha, group in zip(table["sha256"], table[GROUP_COLUMN], strict=True):
        parent[root(sha)] = root("group:" + group)  # a group's node can never equal a hex digest
    roots = table["sha256"].map(root)
    return table["sha256"].groupby(roots).transform("min")


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

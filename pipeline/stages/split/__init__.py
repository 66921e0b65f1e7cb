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

A unit under two or more labels (an audit group across classes) is placed first, by its position, then moved
(smallest first) only where a class needs it to reach every split; each class's own units then fill what
its shared units left. Every class ends up in every split, or the stage fails with one line naming the
class, its counts, the audit group that shrank it and the fixes (with `split.small_class: warning` such a
class goes to train, which it must at least reach).

A pre-split source keeps its given splits (and can carve `test` out of `val` or `train` by the same method).
Same input and params: byte-identical output.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.config import Params, SplitParams
from pipeline.data.audit import describe_group, with_audit_groups
from pipeline.data.images import SPLITS
from pipeline.data.labels import LabelSets
from pipeline.data.splits import VALIDATED_COLUMNS, read_validated
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json
from pipeline.stages import Stage
from pipeline.stages.split import label_sets

STAGE = Stage(
    summary="Stratified train/val/test split that keeps exact and near-duplicates together.",
    params=("base", "split"),
    deps=("validated", "audit_table"),
    outs=("splits", "details:split"),
)

log = logging.getLogger(__name__)

GROUP_COLUMN = "group"  # set on every row by pipeline.data.audit: rows with the same value stay together


def run(params: Params) -> dict:
    sets = LabelSets.of(params.base.task, params.base.label_separator)
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
        table, strategy, by_rank = _keep_given(table, params.split, params.base.seed, sets)
    else:
        fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
        consequence = "their images all go to train"
        split_of, by_rank = _split_units(table, fractions, params.split, params.base.seed, sets, consequence)
        table, strategy = table.assign(split=_unit_keys(table).map(split_of)), params.split.method

    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    with atomic_path(params.paths.splits) as tmp:
        # The columns it read, with `split` now set.
        table[list(VALIDATED_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
    counts = _per_label(table, sets)
    labels = list(counts.index)
    per_class = {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS}
    metrics = {
        "strategy": strategy,
        "images": {split: int((table["split"] == split).sum()) for split in SPLITS},  # 3 columns always
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
    return float(stable_positions([sha256], seed)[0])


def stable_positions(shas: Sequence[str], seed: int) -> np.ndarray:
    """`stable_position` of each of `shas`, (N,) float64: the digests joined and read as big-endian 64-bit
    integers at once, not converted one by one (a million files: 1.9 -> 0.9 s)."""
    key = str(seed).encode("ascii")
    digests = [hashlib.blake2b(sha.encode("ascii"), key=key, digest_size=8).digest() for sha in shas]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.float64) / 2.0**64


def _per_label(table: pd.DataFrame, sets: LabelSets) -> pd.DataFrame:
    """Images of each class (a multilabel task's label) in each split: (labels, SPLITS)."""
    pairs = sets.exploded(table["label"])
    split = table["split"].to_numpy()[pairs["row"].to_numpy()]
    counts = pd.crosstab(pairs["label"].to_numpy(), split) if len(pairs) else pd.DataFrame()
    return counts.reindex(index=sorted(pairs["label"].unique()), columns=SPLITS, fill_value=0)


def _split_units(
    table: pd.DataFrame,
    fractions: dict[str, float],
    settings: SplitParams,
    seed: int,
    sets: LabelSets,
    consequence: str,
) -> tuple[dict[str, str], dict[str, int]]:
    """(unit -> split, class -> units placed by rank) for the rows of `table`; a multilabel task's (`sets`)
    by `label_sets.split_units`.

    `fractions` starts with the split that takes the rest (train, or the split that test is carved from);
    the others are filled first, in reverse order (test, then val), by `split.method` (`settings`), drawn
    with `seed` (`base.seed`). Units under two or more labels (an audit group across classes) are placed
    first (`_place_shared`), then each class's own.

    Raises:
        PipelineError: a class misses a wanted split (`split.small_class: error`), or train (`warning`).
    """
    rest, *drawn = fractions
    order = [(split, fractions[split]) for split in [*reversed(drawn), rest]]
    wanted = [split for split in fractions if fractions[split] > 0]
    keys = _unit_keys(table)
    units = _units(table, keys, seed)
    if sets.multilabel:
        method, small = settings.method, settings.small_class
        split_of, by_rank, missing = label_sets.split_units(
            table, keys, units["position"], order, method, seed, sets
        )
        label_sets.check_coverage(missing, wanted, rest, method, small)
        return split_of, by_rank
    single = units["labels"].map(len) == 1
    own, shared = units[single].assign(label=units.loc[single, "labels"].str[0]), units[~single]
    owned = own["label"].value_counts().to_dict()
    need = dict.fromkeys(sorted(table["label"].unique()), wanted)
    placed, short = _place_shared(shared, _natural(shared["position"], order), owned, need)
    need.update(dict.fromkeys(short, [rest]))  # what split.small_class: warning promises: train at least
    placed, _ = _place_shared(shared, placed, owned, need)
    covered: dict[str, set[str]] = {}
    for unit, labels in shared["labels"].items():
        for label in labels:
            covered.setdefault(label, set()).add(placed[unit])
    split_of, by_rank = dict(placed), {}
    for label, rows in own.groupby("label", sort=True):
        if label in short:
            split_of.update(dict.fromkeys(rows.index, rest))
            continue
        # Enough units of its own: every wanted split from them, as without shared units; else the rest.
        must = wanted if len(rows) >= len(wanted) else [s for s in wanted if s not in covered.get(label, ())]
        if settings.method == "stable":
            assigned, moved = _stable(rows["position"], order, must)
            by_rank.update({label: moved} if moved else {})
        else:
            assigned = _stratified(list(rows.index), fractions, [s for s, _ in order], seed, must)
        split_of.update(assigned)
    placed_table = table.assign(split=keys.map(split_of))
    _check_coverage(placed_table, keys, (wanted, rest), settings.small_class, consequence)
    return split_of, by_rank


def _natural(positions: pd.Series, order: list[tuple[str, float]]) -> dict[str, str]:
    """Unit -> the split its position falls in, against the cumulative fractions of `order`."""
    wanted = [split for split, fraction in order if fraction > 0]
    cuts = np.cumsum([fraction for _, fraction in order if fraction > 0])[:-1]
    natural = np.searchsorted(cuts, positions.to_numpy(), side="right")
    return {unit: wanted[i] for unit, i in zip(positions.index, natural, strict=True)}


def _place_shared(
    shared: pd.DataFrame, start: dict[str, str], owned: dict[str, int], need: dict[str, list[str]]
) -> tuple[dict[str, str], list[str]]:
    """(unit -> split, classes still short) for the units under several labels, from `start` (their
    positions'): a unit moves into a split a class lacks when that lowers the classes' total shortfall.

    A class's shortfall: the splits of `need` its shared units miss, less its own units (each can fill one).
    Smaller units move first, so a big group rarely leaves its split; without a move that helps, the
    classes still short are returned (those with enough own units never are).
    """
    placed = dict(start)
    units_of: dict[str, list[str]] = {}
    for unit in shared.sort_values(["images", "position"], kind="stable").index:  # smallest first
        for label in shared.at[unit, "labels"]:
            units_of.setdefault(label, []).append(unit)

    def shortfall(label: str) -> int:
        missed = set(need[label]) - {placed[unit] for unit in units_of.get(label, [])}
        return max(0, len(missed) - owned.get(label, 0))

    def better_move() -> tuple[str, str] | None:
        for label in (label for label in need if shortfall(label) > 0):
            missed = [s for s in need[label] if s not in {placed[unit] for unit in units_of.get(label, [])}]
            for unit, split in ((unit, split) for unit in units_of.get(label, []) for split in missed):
                labels, was = shared.at[unit, "labels"], placed[unit]
                before = sum(shortfall(other) for other in labels)
                placed[unit] = split
                after = sum(shortfall(other) for other in labels)
                placed[unit] = was
                if after < before:
                    return unit, split
        return None

    while (move := better_move()) is not None:  # the total shortfall falls with every move: it ends
        placed[move[0]] = move[1]
    return placed, [label for label in need if shortfall(label) > 0]


def _stable(
    positions: pd.Series, order: list[tuple[str, float]], must: list[str]
) -> tuple[dict[str, str], int]:
    """Units (the index) by position against the cumulative fractions of `order`; then each split of `must`
    that got no unit takes the nearest units by rank. Returns (unit -> split, moved)."""
    ranked = positions.sort_values(kind="stable")  # units come sorted by key: ties stay deterministic
    values, n = ranked.to_numpy(), len(ranked)
    wanted = [split for split, fraction in order if fraction > 0]
    floor = [int(split in must) for split in wanted]  # units a split must get
    cuts = np.cumsum([fraction for _, fraction in order if fraction > 0])[:-1]
    ends, previous = [], 0  # rank where each split but the last ends
    for j, end in enumerate(np.searchsorted(values, cuts, side="left")):
        previous = min(max(int(end), previous + floor[j]), n - sum(floor[j + 1 :]))
        ends.append(previous)
    natural = np.searchsorted(cuts, values, side="right")  # from the position alone
    placed = np.searchsorted(ends, np.arange(n), side="right")
    splits = [wanted[i] for i in placed]
    return dict(zip(ranked.index, splits, strict=True)), int(np.sum(placed != natural))


def _stratified(
    units: list[str], fractions: dict[str, float], order: list[str], seed: int, must: list[str]
) -> dict[str, str]:
    """Exact counts (`_allocate`, at least one unit for each split of `must`): whole units drawn at random
    into each split of `order` but the last, which takes the rest."""
    counts = _allocate(len(units), fractions, must)
    split_of, rest = {}, units
    for split in order[:-1]:
        rest, drawn = _draw(rest, counts[split], seed)
        split_of.update(dict.fromkeys(drawn, split))
    split_of.update(dict.fromkeys(rest, order[-1]))
    return split_of


def _keep_given(
    table: pd.DataFrame, settings: SplitParams, seed: int, sets: LabelSets
) -> tuple[pd.DataFrame, str, dict[str, int]]:
    """The source's own splits; with `split.carve_test_from`, fraction `split.test` of each class of that
    split is carved out into test (by `split.method`, seeded by `seed`) when the source gave no test
    split."""
    source, strategy, by_rank = settings.carve_test_from, "given", {}
    if source != "none" and (table["split"] == "test").any():
        log.info("split: the source has a test split; split.carve_test_from: %s is not needed", source)
    elif source != "none":
        if settings.test == 0:
            raise PipelineError(
                f"split.carve_test_from is {source} but split.test is 0; set split.test to the fraction "
                f"of {source} to move into test"
            )
        fractions = {source: 1.0 - settings.test, "test": settings.test}
        in_source = table["split"] == source
        consequence = f"they stay in {source}"
        split_of, by_rank = _split_units(table[in_source], fractions, settings, seed, sets, consequence)
        moved = in_source & _unit_keys(table).map(split_of).eq("test")
        table = table.assign(split=table["split"].where(~moved, "test"))
        strategy = f"given, test carved from {source} ({settings.method})"
    present = [split for split in SPLITS if (table["split"] == split).any()]
    counts = _per_label(table, sets)[present]
    missing = [
        f"{label!r} (not in {[s for s in present if row[s] == 0]})"
        for label, row in counts.iterrows()
        if (row == 0).any()
    ]
    need = f"appear in each given split {present}"
    _small_classes(missing, need, "the splits stay as given", settings.small_class)
    return table, strategy, by_rank


def _units(table: pd.DataFrame, keys: pd.Series, seed: int) -> pd.DataFrame:
    """One row per unit, indexed by its key (`keys`: each row's, sorted): `labels`, the sorted tuple of its
    labels (two or more: an audit group across classes), `position`, the smallest `stable_position` of its
    files, and `images`, its rows. On integer codes: the keys are sorted once (grouping and sorting the
    64-character strings again took 11 s for a million rows)."""
    unit, names = pd.factorize(keys, sort=True)
    contents, shas = pd.factorize(table["sha256"])
    position = np.full(len(names), np.inf)
    np.minimum.at(position, unit, stable_positions(shas.tolist(), seed)[contents])
    label, label_names = pd.factorize(table["label"], sort=True)
    pairs = np.unique(unit.astype(np.int64) * len(label_names) + label)  # (unit, label), sorted by both
    pair_unit, pair_label = np.divmod(pairs, len(label_names))
    first = np.searchsorted(pair_unit, np.arange(len(names)))  # each unit's first pair
    count = np.diff(first, append=len(pairs))
    named = np.asarray(label_names, dtype=object)[pair_label]
    labels = np.empty(len(names), dtype=object)
    labels[:] = [(name,) for name in named[first].tolist()]
    for u in np.flatnonzero(count > 1).tolist():  # few: an audit group across classes
        labels[u] = tuple(named[first[u] : first[u] + count[u]].tolist())
    index = pd.Index(names, name="unit")
    return pd.DataFrame(
        {"position": position, "images": np.bincount(unit, minlength=len(names)), "labels": labels}, index
    )


def _unit_keys(table: pd.DataFrame) -> pd.Series:
    """Each row's unit: the smallest sha256 among the files linked to it by equal bytes or an equal `group`
    value (connected components of the graph whose nodes are the contents and the groups, each row an edge).
    Vectorised: a Python union-find took 7 s a call for a million rows (benchmarks/scale.py)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    contents, shas = pd.factorize(table["sha256"])
    groups, group_ids = pd.factorize(table[GROUP_COLUMN])
    nodes = len(shas) + len(group_ids)
    edges = np.ones(len(table), dtype=np.int8)
    graph = coo_matrix((edges, (contents, len(shas) + groups)), shape=(nodes, nodes))
    component = connected_components(graph, directed=False)[1][: len(shas)]  # of each content
    key = np.asarray(shas, dtype=object)
    joined = np.bincount(component)[component] > 1  # contents linked to others: few
    if joined.any():
        linked = pd.DataFrame({"component": component[joined], "sha256": key[joined]})
        smallest = linked.sort_values("sha256", kind="stable").drop_duplicates("component")
        key[joined] = linked["component"].map(smallest.set_index("component")["sha256"]).to_numpy()
    return pd.Series(key[contents], index=table.index, name="sha256", dtype=table["sha256"].dtype)


def _allocate(n: int, fractions: dict[str, float], must: list[str] | None = None) -> dict[str, int]:
    """Split n items by fractions: largest remainders, but at least one item for every non-zero fraction of
    `must` (default: all; the caller guarantees n is at least their number)."""
    must = [split for split in fractions if must is None or split in must]
    floor = {split: int(fractions[split] > 0 and split in must) for split in fractions}
    quotas = {split: n * fraction for split, fraction in fractions.items()}
    counts = {split: max(floor[split], math.floor(quota)) for split, quota in quotas.items()}
    while sum(counts.values()) < n:
        grow = max((s for s in counts if fractions[s] > 0), key=lambda s: quotas[s] - counts[s])
        counts[grow] += 1
    while sum(counts.values()) > n:
        shrink = max((s for s in counts if counts[s] > floor[s]), key=lambda s: counts[s] - quotas[s])
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


def _check_coverage(
    table: pd.DataFrame, keys: pd.Series, splits: tuple[list[str], str], small_class: str, consequence: str
) -> None:
    """Every class of `table` (with its `split` set) in each wanted split, or one line that names each class
    that is not, its counts, why and the fixes. `splits`: (wanted, the split that takes the rest); with
    `small_class` (`split.small_class`) `warning` a class must still be in the latter."""
    wanted, rest = splits
    counts = pd.crosstab(table["label"], table["split"]).reindex(columns=wanted, fill_value=0)
    short = [label for label in counts.index if (counts.loc[label] == 0).any()]
    if not short:
        return
    described = [_describe(table, keys, label, counts.loc[label]) for label in short]
    offenders = [text for text, _ in described[:_DESCRIBED]]
    if len(short) > _DESCRIBED:
        offenders.append(f"and {len(short) - _DESCRIBED} more: {', '.join(map(repr, short[_DESCRIBED:]))}")
    fixes = ["add images to them", *dict.fromkeys(fix for _, fixes in described for fix in fixes)]
    untrained = [label for label in short if counts.at[label, rest] == 0]
    if untrained and small_class == "warning":
        raise PipelineError(
            f"classes {untrained} get no image in {rest}, even with split.small_class: warning "
            f"({', '.join(offenders)}); {', or '.join(fixes)}"
        )
    _small_classes(offenders, f"appear in each of {wanted}", consequence, small_class, fixes)


_DESCRIBED = 5  # classes described in the message; the others are only named


def _describe(table: pd.DataFrame, keys: pd.Series, label: str, counts: pd.Series) -> tuple[str, list[str]]:
    """(how a class too small for every split is named, the fixes beyond adding images). Where the audit's
    near-duplicate groups made it small, that says so: files, distinct images, counts as placed, its largest
    group."""
    mine = table["label"] == label
    units = keys[mine].unique()
    files = table.loc[mine, "sha256"].nunique()
    others = sorted(set(table.loc[keys.isin(units) & ~mine, "label"]))
    if files == len(units) and not others:
        return f"{label!r} ({len(units)} distinct images)", []
    sizes = table.groupby(GROUP_COLUMN)["sha256"].nunique()
    group = max(sorted(set(table.loc[mine, GROUP_COLUMN])), key=lambda g: sizes[g])
    members = table[table[GROUP_COLUMN] == group]
    members = members.iloc[np.lexsort((members["path"], members["label"] != label))]  # its own images first
    distinct = f"{len(units)} distinct image{'s' if len(units) > 1 else ''}"
    shared = f", shared with {', '.join(map(repr, others))}" if others else ""
    placed = ", ".join(f"{split} {int(n)}" for split, n in counts.items())
    text = (
        f"{label!r} ({int(mine.sum())} images in {files} different files, {distinct} once the audit's "
        f"near-duplicate groups are joined{shared}; it would get {placed}; {describe_group(members)})"
    )
    fixes = ["raise audit.similarity or audit.pixel_correlation so that fewer images are near-duplicates"]
    return text, [*fixes, *(["correct the labels of a group across classes (audit page)"] if others else [])]


def _small_classes(
    offenders: list[str], need: str, consequence: str, small_class: str, fixes: list[str] | None = None
) -> None:
    """Raise on `offenders` too small to `need` when `small_class` (split.small_class) is error, else warn."""
    if not offenders:
        return
    problem = f"classes [{', '.join(offenders)}] are too small to {need}"
    if small_class == "error":
        raise PipelineError(
            f"{problem}; {', or '.join(fixes or ['add images to them'])}, or set split.small_class: warning "
            f"({consequence})"
        )
    log.warning("split: %s; %s", problem, consequence)

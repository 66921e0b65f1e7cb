"""The split of a multilabel task (`base.task: multilabel`): units (identical files and the audit's
near-duplicate groups, as for one label per image) that each carry the union of their images' label sets.

- `stable`: a unit's split is its content's hash position against the cumulative fractions, as for one label
  per image, so adding, removing or relabelling other images never moves it. What that can promise per label:
  each label's count in a split is Binomial(n, fraction) over its n units, the same bound as one class's.
  What it cannot: exact shares for rare labels. A label left out of a wanted split gets one unit moved there
  (its unit with the smallest position whose move empties no split of another label); only these movers
  (`placed_by_rank`) can change when that label's images change.
- `stratified`: iterative stratification (`pipeline.data.stratify`), rarest label first, then the same moves:
  each label's share of every split as close as whole units allow; any change to the data can reshuffle it.

Linear in the labels of the units (plus labels^2 for the stratification's rarest-label picks).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.data.labels import LabelSets
from pipeline.data.stratify import iterative
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def split_units(
    table: pd.DataFrame,
    keys: pd.Series,
    positions: pd.Series,
    order: list[tuple[str, float]],
    method: str,
    seed: int,
    sets: LabelSets,
) -> tuple[dict[str, str], dict[str, int], dict[str, list[str]]]:
    """(unit -> split, label -> units moved to reach a split, label -> wanted splits it still misses).

    `keys`: each row's unit; `positions`: each unit's stable position, indexed by the sorted unit keys;
    `order`: (split, fraction) pairs, the split that takes the rest last.
    """
    wanted = [split for split, fraction in order if fraction > 0]
    unit, names = pd.factorize(keys, sort=True)
    pairs = sets.exploded(table["label"])
    label, label_names = pd.factorize(pairs["label"], sort=True)
    code = np.unique(unit[pairs["row"].to_numpy()].astype(np.int64) * max(len(label_names), 1) + label)
    pair_unit, pair_label = np.divmod(code, max(len(label_names), 1))
    starts = np.searchsorted(pair_unit, np.arange(len(names) + 1))
    label_lists = [pair_label[starts[u] : starts[u + 1]] for u in range(len(names))]
    position = positions.reindex(names).to_numpy()
    if method == "stable":
        cuts = np.cumsum([fraction for _, fraction in order if fraction > 0])[:-1]
        part = np.searchsorted(cuts, position, side="right")
    else:
        fractions = [fraction for _, fraction in order if fraction > 0]
        weights = np.bincount(unit, minlength=len(names))
        part = iterative(label_lists, fractions, seed, weights, order=np.argsort(position, kind="stable"))
    moved, short = _cover(part, pair_unit, pair_label, starts, position, len(wanted))
    split_of = dict(zip(names, (wanted[p] for p in part.tolist()), strict=True))
    named = np.asarray(label_names, dtype=object)
    missing = {str(named[label]): [wanted[p] for p in parts] for label, parts in short.items()}
    return split_of, {str(named[label]): n for label, n in moved.items()}, missing


def _cover(
    part: np.ndarray,
    pair_unit: np.ndarray,
    pair_label: np.ndarray,
    starts: np.ndarray,
    position: np.ndarray,
    parts: int,
) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Move units (in place in `part`) so that each label reaches every part, the rarest labels first and
    the last part (the one that takes the rest: train) before the others: into a part a label misses goes its
    unit with the smallest position whose move leaves every other label of that unit in the part it leaves,
    and the label itself too unless it moves into the last part (a label too small for every part trains).
    Returns (label -> units moved, label -> parts it still misses)."""
    k = int(pair_label.max()) + 1 if len(pair_label) else 0
    counts = np.zeros((k, parts), dtype=np.int64)  # units of each label in each part
    np.add.at(counts, (pair_label, part[pair_unit]), 1)
    by_label = np.lexsort((position[pair_unit], pair_label))  # each label's units, smallest position first
    label_starts = np.searchsorted(pair_label[by_label], np.arange(k + 1))
    moved: dict[int, int] = {}
    short: dict[int, list[int]] = {}
    for label in np.argsort(counts.sum(axis=1), kind="stable").tolist():
        for target in sorted(np.flatnonzero(counts[label] == 0).tolist(), reverse=True):
            for unit in pair_unit[by_label[label_starts[label] : label_starts[label + 1]]].tolist():
                source = part[unit]
                labels = pair_label[starts[unit] : starts[unit + 1]]
                others = labels[labels != label]
                own_left = counts[label, source] >= 2 or target == parts - 1
                if not own_left or (counts[others, source] < 2).any():
                    continue
                counts[labels, source] -= 1
                counts[labels, target] += 1
                part[unit] = target
                moved[label] = moved.get(label, 0) + 1
                break
            else:
                short.setdefault(label, []).append(target)
    return moved, short


def check_coverage(
    missing: dict[str, list[str]], wanted: list[str], rest: str, method: str, small_class: str
) -> None:
    """Every label in every wanted split, or one line naming the labels that are not (with
    `split.small_class: warning`, a warning while each is at least in `rest`).

    Raises:
        PipelineError: a label misses a wanted split (`error`), or `rest` (`warning`).
    """
    if not missing:
        return
    named = [f"{label!r} (not in {splits})" for label, splits in sorted(missing.items())]
    shown = ", ".join(named[:10]) + (f" and {len(named) - 10} more" if len(named) > 10 else "")
    untrained = sorted(label for label, splits in missing.items() if rest in splits)
    if small_class == "error" or untrained:
        where = f"in {rest}, even with split.small_class: warning" if untrained else f"in each of {wanted}"
        raise PipelineError(
            f"labels [{shown}] get no image {where}; add images with these labels"
            + (
                ", or use split.method: stratified (each label's share of every split)"
                if method == "stable"
                else ""
            )
            + ("" if untrained else ", or set split.small_class: warning (they stay where they fell)")
        )
    log.warning(
        "split: labels [%s] are too small to appear in each of %s; they stay where they fell", shown, wanted
    )

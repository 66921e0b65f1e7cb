"""Iterative stratification of label sets (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011): split items that
each carry a set of labels into parts of given fractions so that every label, the rare ones first, gets its
share in every part. The multilabel split and (later) the audit's k folds draw with it.

The algorithm is the paper's, as the `iterative-stratification` package implements it (its tests' examples
give the same parts here), with two changes that matter at scale: the per-label counts are kept up to date
instead of being summed over the remaining items for every label (that package takes n x labels^2 steps and
a dense (n, labels) matrix; this takes the labels' total plus labels^2), and an item may weigh more than one
(a unit of identical or near-duplicate images counts its images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iterative(
    label_lists: Sequence[Sequence[int]],
    fractions: Sequence[float],
    seed: int,
    weights: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
) -> np.ndarray:
    """The part (index into `fractions`) of each item, (n,) int64.

    Args:
        label_lists: each item's labels, as integers in [0, labels).
        fractions: each part's share, summing to 1.
        seed: breaks the remaining ties (as the paper does, at random).
        weights: each item's size (default 1): what the parts' and labels' wanted counts count.
        order: the order items of one label are placed in (default: as given); a label's items placed
            first go where its share is most wanted.

    The rarest label (fewest items not yet placed) goes first: each of its items goes to the part that
    wants most of that label, then the part that wants most items, then at random; every wanted count it
    belongs to drops by its weight. Items with no label fill the parts that want most items last.
    """
    n = len(label_lists)
    rng = np.random.default_rng(seed)
    share = np.asarray(fractions, dtype=np.float64)
    weight = np.ones(n, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    lengths = np.fromiter((len(labels) for labels in label_lists), dtype=np.int64, count=n)
    flat = np.fromiter((label for labels in label_lists for label in labels), dtype=np.int64)
    items = np.repeat(np.arange(n), lengths)
    k = int(flat.max()) + 1 if len(flat) else 0
    wanted = share * weight.sum()  # (parts,) items each part still wants
    wanted_label = np.outer(share, np.bincount(flat, weights=weight[items], minlength=k))  # (parts, k)
    left = np.bincount(flat, minlength=k)  # items of each label not placed yet
    rank = np.empty(n, dtype=np.int64)
    rank[np.asarray(order if order is not None else np.arange(n), dtype=np.int64)] = np.arange(n)
    by_label = np.lexsort((rank[items], flat))  # each label's items, in `order`
    starts = np.searchsorted(flat[by_label], np.arange(k + 1))
    part = np.full(n, -1, dtype=np.int64)
    while (left > 0).any():
        fewest = np.flatnonzero(left == left[left > 0].min())
        label = int(fewest[rng.integers(len(fewest))]) if len(fewest) > 1 else int(fewest[0])
        for item in items[by_label[starts[label] : starts[label + 1]]].tolist():
            if part[item] >= 0:
                continue
            chosen = _best(wanted_label[:, label], wanted, rng)
            labels = flat[np.searchsorted(items, item) : np.searchsorted(items, item, side="right")]
            part[item] = chosen
            wanted[chosen] -= weight[item]
            wanted_label[chosen, labels] -= weight[item]
            left[labels] -= 1
    for item in np.flatnonzero(part < 0)[np.argsort(rank[part < 0], kind="stable")].tolist():
        chosen = _best(wanted, wanted, rng)
        part[item] = chosen
        wanted[chosen] -= weight[item]
    return part


def _best(first: np.ndarray, then: np.ndarray, rng: np.random.Generator) -> int:
    """The index with the largest `first`, ties by the largest `then`, remaining ties at random."""
    top = np.flatnonzero(first == first.max())
    if len(top) > 1:
        top = top[then[top] == then[top].max()]
    return int(top[rng.integers(len(top))]) if len(top) > 1 else int(top[0])

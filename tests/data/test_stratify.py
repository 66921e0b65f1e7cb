"""Iterative stratification of label sets, and how the tables' label cells read as sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.labels import SINGLE, LabelSets, joined, parse
from pipeline.data.stratify import iterative

FRACTIONS = np.array([0.7, 0.15, 0.15])


def _long_tail(n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, k) bool: label j on an image with probability 0.5 / (j + 1)^1.1 (few common labels, many rare)."""
    rng = np.random.default_rng(seed)
    return rng.random((n, k)) < 0.5 / (1 + np.arange(k)) ** 1.1


def _deviation(y: np.ndarray, part: np.ndarray) -> float:
    """Mean over labels and parts of |the label's share in the part - the part's fraction|."""
    positives = y.sum(axis=0)
    shares = np.stack([y[part == p].sum(axis=0) / positives for p in range(len(FRACTIONS))])
    return float(np.abs(shares - FRACTIONS[:, None]).mean())


def test_every_label_gets_its_share_far_closer_than_a_random_split():
    y = _long_tail(3000, 30)
    lists = [np.flatnonzero(row) for row in y]

    part = iterative(lists, FRACTIONS, seed=0)

    random = np.random.default_rng(1).choice(3, len(y), p=FRACTIONS)
    assert _deviation(y, part) < _deviation(y, random) / 5
    assert np.all([y[part == p].sum(axis=0) > 0 for p in range(3)])  # rare labels in every part
    sizes = np.bincount(part, minlength=3) / len(y)
    assert np.abs(sizes - FRACTIONS).max() < 0.01


def test_weights_count_images_and_unlabelled_items_fill_what_is_wanted():
    # Ten items of label 0, one of them a unit of 10 images; 20 items with no label.
    lists = [[0]] * 10 + [[]] * 20
    weights = [10] + [1] * 29

    part = iterative(lists, [0.5, 0.5], seed=0, weights=weights)

    images = np.bincount(part, weights=weights, minlength=2)
    assert sorted(images.tolist()) == [19.0, 20.0]  # 39 images, halves as near as whole items allow
    labelled = np.bincount(part[:10], weights=weights[:10], minlength=2)
    assert sorted(labelled.tolist()) == [9.0, 10.0]  # the big unit alone on one side, the nine on the other


def test_the_rarest_label_is_placed_first_and_follows_order():
    # Label 1 is rare (2 items): its items go first, one to each half, whatever comes after.
    lists = [[0], [0], [0], [0, 1], [0], [0, 1]]

    part = iterative(lists, [0.5, 0.5], seed=3, order=[5, 4, 3, 2, 1, 0])

    assert part[3] != part[5]
    assert np.bincount(part).tolist() == [3, 3]


def test_same_seed_same_parts():
    lists = [np.flatnonzero(row) for row in _long_tail(500, 10, seed=2)]
    assert np.array_equal(iterative(lists, FRACTIONS, 7), iterative(lists, FRACTIONS, 7))


@pytest.mark.parametrize(
    ("cell", "separator", "expected"),
    [("dog;cat; dog ", ";", ("cat", "dog")), ("", ";", ()), (";;", ";", ()), ("a;b", "", ("a;b",))],
)
def test_cells_parse_to_sorted_distinct_labels(cell, separator, expected):
    assert parse(cell, separator) == expected
    assert joined(["dog", "cat", "dog"], "|") == "cat|dog"


def test_exploded_cells_count_each_label_and_single_cells_stay_whole():
    cells = pd.Series(["cat;dog", "", "dog", "bird;dog"], index=[9, 9, 3, 1])
    sets = LabelSets(";")

    pairs = sets.exploded(cells)

    assert pairs.values.tolist() == [[0, "cat"], [0, "dog"], [2, "dog"], [3, "bird"], [3, "dog"]]
    assert sets.counts(cells).to_dict() == {"bird": 1, "cat": 1, "dog": 3}
    assert SINGLE.counts(cells).to_dict() == {"": 1, "bird;dog": 1, "cat;dog": 1, "dog": 1}
    assert LabelSets.of("single", ";") == SINGLE and LabelSets.of("multilabel", "|").separator == "|"

"""Paired comparison statistics: exact McNemar and the Clopper-Pearson bound, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import stats


def test_mcnemar_is_the_binomial_tail_of_the_discordant_images():
    assert stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(2, 0) == pytest.approx(0.25)  # both differing images lost: 1/4
    assert stats.mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert stats.mcnemar_p(3, 7) == pytest.approx(sum(math.comb(10, k) for k in range(3, 11)) / 1024)
    assert stats.mcnemar_p(0, 9) == 1.0


def test_upper_bound_is_exact_clopper_pearson():
    assert stats.upper_bound(10, 10) == 1.0
    assert stats.upper_bound(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10))  # solves (1 - p)^10 = 0.05
    assert stats.upper_bound(9, 10) > 0.9
    # the bound tightens as the sample grows at the same observed share
    assert stats.upper_bound(90, 100) < stats.upper_bound(9, 10)


def test_compare_counts_the_discordant_pairs():
    labels = np.array([0, 1, 2, 0, 1, 2])
    reference = np.array([0, 1, 2, 0, 2, 1])  # right on 4
    candidate = np.array([0, 1, 0, 0, 1, 1])  # loses image 2, wins image 4
    c = stats.compare(reference, candidate, labels)
    assert (c.n, c.worse, c.better) == (6, 1, 1)
    assert c.agreement == pytest.approx(
        4 / 6
    ) and c.reference_accuracy == c.candidate_accuracy == pytest.approx(4 / 6)
    assert c.p_worse == pytest.approx(0.75) and c.agreement_upper == stats.upper_bound(4, 6)

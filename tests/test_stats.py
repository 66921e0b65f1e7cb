"""Paired comparison statistics: exact McNemar and the Clopper-Pearson bound, against hand-computed values;
average precision against scikit-learn, and the paired bootstrap of two models' mAP."""

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


def test_average_precision_is_scikit_learns_with_ties_and_with_resample_weights():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    truth = rng.random((60, 4)) < 0.3
    truth[:, 3] = False  # no positive: NaN
    scores = np.round(rng.random((60, 4)) + 0.4 * truth, 1)  # rounded: many tied scores
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=3)

    ap, resampled = stats.average_precisions(truth, scores), stats.average_precisions(truth, scores, weights)

    for k in range(3):
        assert ap[k] == pytest.approx(average_precision_score(truth[:, k], scores[:, k]))
        for b in range(3):
            expected = average_precision_score(truth[:, k], scores[:, k], sample_weight=weights[b])
            assert resampled[b, k] == pytest.approx(expected)
    assert np.isnan(ap[3]) and np.isnan(resampled[:, 3]).all()
    assert stats.mean_average_precision(truth, scores) == pytest.approx(np.mean(ap[:3]))  # labels with one
    assert stats.mean_average_precision(truth[:, 3:], scores[:, 3:]) is None


def test_the_paired_bootstrap_tells_a_worse_model_from_an_equal_one():
    rng = np.random.default_rng(1)
    truth = rng.random((300, 5)) < 0.3
    good = truth + rng.normal(0, 0.5, truth.shape)
    worse = truth + rng.normal(0, 1.0, truth.shape)  # the same signal, twice the noise
    alike = good + rng.normal(0, 0.01, truth.shape)

    lost, same = stats.compare_map(good, worse, truth), stats.compare_map(good, alike, truth)
    itself = stats.compare_map(good, good, truth, resamples=200)

    assert lost.candidate_map < lost.reference_map and lost.p_worse < 0.01 and lost.delta_high < 0
    assert same.p_worse > 0.05 and same.delta_low < 0 < same.delta_high
    assert itself.p_worse == 1.0 and itself.candidate_map == itself.reference_map
    assert (lost.n, lost.labels, lost.resamples) == (300, 5, 1000)
    # p: the share of resamples in which the candidate is not lower, +1 smoothed, as computed plainly
    assert stats.compare_map(good, worse, truth, resamples=50).p_worse == pytest.approx(
        (np.sum(_deltas(good, worse, truth, 50) >= 0) + 1) / 51
    )


def _deltas(reference, candidate, truth, resamples):
    """The bootstrap differences computed plainly, one resample at a time, as compare_map draws them."""
    rng = np.random.default_rng(0)
    n = len(truth)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return np.array(
        [
            np.nanmean(stats.average_precisions(truth, candidate, w[None])[0])
            - np.nanmean(stats.average_precisions(truth, reference, w[None])[0])
            for w in weights
        ]
    )

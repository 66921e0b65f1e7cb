"""Paired comparisons of two classifiers on the same images, sound for small test sets.

Both tests look at one image at a time, so they use the pairing that a difference of two accuracies throws
away: an image both models get right (or wrong) says nothing about which is better. For label sets, the
same holds of mean average precision: `compare_map` resamples the images, scoring both models on each draw.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    """A candidate model against a reference on the same n images.

    `worse` counts the images only the reference gets right, `better` those only the candidate gets right.
    """

    n: int
    agreement: float  # share of images where both give the same top-1 class
    agreement_upper: float  # one-sided upper confidence bound of that share
    reference_accuracy: float
    candidate_accuracy: float
    worse: int
    better: int
    p_worse: float  # exact one-sided McNemar p-value for "the candidate is less accurate"


def compare(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, confidence: float = 0.95
) -> PairedComparison:
    """Compare two models' top-1 predictions (class indices) on the same labelled images."""
    reference, candidate, labels = (np.asarray(a) for a in (reference, candidate, labels))
    ref_right, cand_right = reference == labels, candidate == labels
    worse = int(np.sum(ref_right & ~cand_right))
    better = int(np.sum(~ref_right & cand_right))
    agreeing = int(np.sum(reference == candidate))
    n = len(labels)
    return PairedComparison(
        n=n,
        agreement=agreeing / n if n else 1.0,
        agreement_upper=upper_bound(agreeing, n, confidence),
        reference_accuracy=float(np.mean(ref_right)) if n else 0.0,
        candidate_accuracy=float(np.mean(cand_right)) if n else 0.0,
        worse=worse,
        better=better,
        p_worse=mcnemar_p(worse, better),
    )


def mcnemar_p(worse: int, better: int) -> float:
    """Exact one-sided McNemar test: the chance of `worse` or more losses among the `worse + better` images
    where the two models differ, if each such image were a fair coin. 1.0 when they never differ."""
    discordant = worse + better
    if discordant == 0:
        return 1.0
    from scipy import stats  # here, not at the top: half a second the flow's gate skips for identical models

    return float(stats.binom.sf(worse - 1, discordant, 0.5))


def upper_bound(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a proportion (exact, conservative)."""
    if n == 0 or successes >= n:
        return 1.0
    from scipy import stats

    return float(stats.beta.ppf(confidence, successes + 1, n - successes))


_BLOCK_WEIGHTS = 1 << 18  # image weights per block of resamples


@dataclass(frozen=True)
class PairedMap:
    """Two models' mean average precision (macro over the labels with a positive) on the same n images, and
    a paired bootstrap of its difference: each resample draws n of the images with replacement and scores
    both models on the same draw."""

    n: int
    labels: int  # labels with a positive among the n images: the ones the mean runs over
    reference_map: float
    candidate_map: float
    p_worse: float  # share of resamples where the candidate's mAP is not below the reference's (+1 smoothed)
    delta_low: float  # central (1 - 2 alpha) interval of candidate - reference over the resamples
    delta_high: float
    resamples: int


def average_precisions(
    truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Average precision of each label, as scikit-learn's `average_precision_score` (equal scores are one
    threshold): (N, K) scores against (N, K) bool truth -> (K,); NaN for a label without a positive.

    With `weights` (B, N), how often each image is counted in each of B resamples, -> (B, K).
    """
    ranking = _Ranking(truth, scores)
    if weights is None:
        return ranking(np.ones((1, ranking.shape[0]), dtype=np.float32))[0]
    return ranking(np.asarray(weights, dtype=np.float32))


def mean_average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Macro mAP: the mean of `average_precisions` over the labels with a positive; None without one."""
    ap = average_precisions(truth, scores)
    return None if np.isnan(ap).all() else float(np.nanmean(ap))


class _Ranking:
    """Each label's images sorted by score once, so that a resample only reweights running counts: AP is
    the mean, over the positives, of the precision at the end of each one's run of equal scores. A resample
    costs O(N x K) for the running count of images and O(positives) for the rest."""

    def __init__(self, truth: np.ndarray, scores: np.ndarray):
        self.shape = truth.shape  # (N, K); truth 0/1 or bool, both read a column at a time (no copies)
        self.labels = []  # (label, order, positives' places, their runs' ends, positives up to each end)
        for k in np.flatnonzero(np.asarray(truth).any(axis=0)).tolist():
            column = np.asarray(scores[:, k], dtype=np.float64)
            order = np.argsort(-column, kind="stable")
            ranked = column[order]
            places = np.flatnonzero(np.asarray(truth[:, k])[order])
            ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last place of each tied run
            run_end = ends[np.searchsorted(ends, places)]
            self.labels.append(
                (k, order, places, run_end, np.searchsorted(places, run_end, side="right") - 1)
            )

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """(B, N) float32 image counts -> (B, K) AP, NaN where a resample holds no positive of a label."""
        ap = np.full((len(weights), self.shape[1]), np.nan)
        for k, order, places, run_end, hits_at in self.labels:
            ranked = weights[:, order]
            seen = np.cumsum(ranked, axis=1)[:, run_end]  # images counted up to each positive's run end
            counted = ranked[:, places]
            hits = np.cumsum(counted, axis=1)[:, hits_at]  # positives among them
            found = counted.sum(axis=1, dtype=np.float64)
            precision = np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                ap[:, k] = np.where(
                    found > 0, (counted * precision).sum(axis=1, dtype=np.float64) / found, np.nan
                )
        return ap


def compare_map(
    reference: np.ndarray,
    candidate: np.ndarray,
    truth: np.ndarray,
    alpha: float = 0.05,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedMap:
    """Paired bootstrap of two models' mAP on the same labelled images ((N, K) scores each, (N, K) bool
    truth; the same label in the same column).

    `p_worse` is the one-sided bootstrap p-value for "the candidate's mAP is lower": the share of resamples
    in which it is not lower (Koehn 2004's paired bootstrap). It is below alpha exactly when the upper end
    of the one-sided (1 - alpha) percentile interval of the difference is below 0. Resamples are drawn in
    blocks of about 256k image weights (a megabyte, cache-sized), so memory stays flat; time grows as
    resamples x N x K.
    """
    truth = np.asarray(truth, dtype=bool)
    n, present = len(truth), truth.any(axis=0)
    if not present.any():
        return PairedMap(n, 0, 0.0, 0.0, 1.0, 0.0, 0.0, 0)
    reference_map, candidate_map = (
        mean_average_precision(truth, scores) for scores in (reference, candidate)
    )
    rng = np.random.default_rng(seed)
    rankings = _Ranking(truth, reference), _Ranking(truth, candidate)
    block = max(1, min(resamples, _BLOCK_WEIGHTS // max(n, 1)))
    deltas = []
    for start in range(0, resamples, block):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, resamples - start))
        weights = weights.astype(np.float32)  # counts: exact in float32 up to 16 million images
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss every positive of a label
            ref, cand = (np.nanmean(ranking(weights), axis=1) for ranking in rankings)
        deltas.append(cand - ref)
    delta = np.concatenate(deltas)
    low, high = np.quantile(delta, [alpha, 1 - alpha])
    return PairedMap(
        n=n,
        labels=int(present.sum()),
        reference_map=reference_map,
        candidate_map=candidate_map,
        p_worse=float((np.sum(delta >= 0) + 1) / (resamples + 1)),
        delta_low=float(low),
        delta_high=float(high),
        resamples=resamples,
    )

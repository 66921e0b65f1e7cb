"""Paired comparisons of two classifiers on the same images, sound for small test sets.

Both tests look at one image at a time, so they use the pairing that a difference of two accuracies throws
away: an image both models get right (or wrong) says nothing about which is better.
"""

from __future__ import annotations

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

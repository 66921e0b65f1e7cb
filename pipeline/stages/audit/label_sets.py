"""The audit's label check for a multilabel task (`base.task: multilabel`): out-of-fold probabilities of each
label from a one-vs-rest linear probe on the embeddings, folds drawn by iterative stratification, ranked by
cleanlab's multi-label mode (`find_label_issues(..., multi_label=True)`).

The probe: up to `checks.PROBE_ABOVE` images, scikit-learn's logistic regression per label (the single-label
probe's settings, `checks.probe`); above, ridge regression of the 0/1 targets, computed a block of rows at
a time from (C x C) and (C x K) sums, so its memory does not grow with the images (the probabilities: the
clipped linear predictions). Time grows as images x labels; cleanlab holds the (N, K) probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.shards import BLOCK_ROWS, spans
from pipeline.data.stratify import iterative
from pipeline.stages.audit import checks

_RIDGE = 1.0  # ridge penalty on the standardised embeddings, per 1,000 images
_CLIP = 1e-4  # the ridge probe's predictions are clipped to [_CLIP, 1 - _CLIP]


@dataclass
class LabelSetIssues:
    ranked: np.ndarray  # indices of the images whose label sets are likely wrong, most likely first
    quality: np.ndarray  # (N,) cleanlab's multi-label quality score (low = suspicious)
    suggested: list[tuple[int, ...]]  # each image's labels with an out-of-fold probability >= 0.5


def fold_of(label_lists: list[np.ndarray], folds: int, seed: int) -> np.ndarray:
    """(N,) int8: each image's fold, every label spread over the folds by iterative stratification."""
    return iterative(label_lists, [1.0 / folds] * folds, seed).astype(np.int8)


def usable_folds(targets: np.ndarray, folds: int) -> int:
    """Folds every label can reach (2 at least); 0 when no label has 2 positives and 2 negatives."""
    positives = targets.sum(axis=0)
    fit = np.minimum(positives, len(targets) - positives)
    return min(folds, int(fit.max())) if len(fit) and fit.max() >= 2 else 0


def out_of_fold_probabilities(
    embeddings: Any, targets: np.ndarray, assignment: np.ndarray, probe_above: int = checks.PROBE_ABOVE
) -> np.ndarray:
    """(N, K) float32: each label's probability for each image from a probe fitted on the other folds
    (`assignment`); `targets`: (N, K) 0/1. A label all 0 or all 1 in the other folds gets its rate there."""
    if len(targets) > probe_above:
        return _ridge_probabilities(embeddings, targets, assignment)
    data = np.asarray(embeddings, dtype=np.float32)
    probabilities = np.empty(targets.shape, dtype=np.float32)
    for fold in np.unique(assignment).tolist():
        held, rest = assignment == fold, assignment != fold
        for label in range(targets.shape[1]):
            y = targets[rest, label]
            if y.min() == y.max():
                probabilities[held, label] = float(y.mean())
                continue
            probe = checks.probe(int(rest.sum())).fit(data[rest], y)
            probabilities[held, label] = probe.predict_proba(data[held])[:, 1]
    return probabilities


def _ridge_probabilities(embeddings: Any, targets: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Ridge regression of `targets` on the standardised embeddings (with an intercept), each fold's rows
    predicted from the sums of the other folds: one pass for the sums, one for the predictions."""
    n, channels = embeddings.shape
    folds = int(assignment.max()) + 1
    gram = np.zeros((folds, channels + 1, channels + 1))
    cross = np.zeros((folds, channels + 1, targets.shape[1]))
    for start, stop in spans(n, BLOCK_ROWS):
        rows = _with_intercept(checks.read_rows(embeddings, slice(start, stop)))
        for fold in range(folds):
            mine = assignment[start:stop] == fold
            gram[fold] += rows[mine].T @ rows[mine]
            cross[fold] += rows[mine].T @ targets[start:stop][mine]
    weights = []
    for fold in range(folds):
        g, c = gram.sum(axis=0) - gram[fold], cross.sum(axis=0) - cross[fold]
        scale = np.sqrt(np.maximum(np.diag(g), 1e-12))  # ridge on standardised columns, intercept free
        penalty = np.diag(np.r_[np.full(channels, _RIDGE * (n - (assignment == fold).sum()) / 1000), 0.0])
        solved = np.linalg.solve(g / np.outer(scale, scale) + penalty, c / scale[:, None])
        weights.append(solved / scale[:, None])
    probabilities = np.empty(targets.shape, dtype=np.float32)
    for start, stop in spans(n, BLOCK_ROWS):
        rows, fold = _with_intercept(checks.read_rows(embeddings, slice(start, stop))), assignment[start:stop]
        for k in range(folds):
            probabilities[start:stop][fold == k] = rows[fold == k] @ weights[k]
    return np.clip(probabilities, _CLIP, 1 - _CLIP, out=probabilities)


def _with_intercept(rows: np.ndarray) -> np.ndarray:
    return np.hstack([rows.astype(np.float64), np.ones((len(rows), 1))])


def label_issues(label_lists: list[np.ndarray], probabilities: np.ndarray) -> LabelSetIssues:
    """cleanlab's multi-label issues on out-of-fold probabilities: per label, the images whose given
    presence or absence gets a low probability (`low_self_confidence`, as the single-label audit measured
    best), an image flagged when any of its labels is; ranked and scored by cleanlab's multi-label quality
    score (self-confidence per label, aggregated by its exponential moving average, worst first)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given = [labels.tolist() for labels in label_lists]
    scores = probabilities.astype(np.float64)
    quality = get_label_quality_scores(given, scores)
    flagged = find_label_issues(given, scores, multi_label=True, filter_by="low_self_confidence")
    ranked = np.flatnonzero(flagged)
    ranked = ranked[np.argsort(quality[ranked], kind="stable")]
    suggested = [tuple(np.flatnonzero(row >= 0.5).tolist()) for row in probabilities]
    return LabelSetIssues(ranked, quality, suggested)

"""Probability calibration: temperature scaling (Guo et al., 2017), expected calibration error, and the
per-label decision thresholds of label sets (`tuned_thresholds`).

Temperature scaling divides the logits by one scalar T > 0 fitted on the validation split. It leaves the
argmax, and so accuracy, unchanged; it only makes the confidences honest. The export carries T with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from pipeline.data.shards import BLOCK_ROWS, release, spans
from pipeline.errors import PipelineError

# Search range for log T: T in [0.01, 100] covers every useful temperature by a wide margin.
_LOG_T_BOUNDS = (float(np.log(1e-2)), float(np.log(1e2)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 probabilities of logits / temperature."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (`log_loss_of` its probabilities)."""
    probs = np.asarray(probs, dtype=np.float64)
    return log_loss_of(probs[np.arange(len(labels)), labels])


def log_loss_of(true_prob: np.ndarray) -> float:
    """Mean negative log of each image's (N,) true-class probability; clipped so a zero probability costs
    ~34.5, not inf."""
    return float(-np.mean(np.log(np.clip(true_prob, 1e-15, 1.0))))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of logits / temperature (computed in log space, so it never overflows).

    A block of rows at a time, so `logits` may be a memory-mapped (N, K) array of any size: the float64
    temporaries and the mapped pages are one block's (evaluate's val split at a million images of 1,000
    classes is 600 MB of float32 logits, read some 40 times by `fit_temperature`).
    """
    labels = np.asarray(labels)
    total = 0.0
    for start, stop in spans(len(labels), BLOCK_ROWS):
        block = np.asarray(logits[start:stop], dtype=np.float64)
        release(logits)
        log_probs = log_softmax(block / temperature, axis=1)
        total += float(log_probs[np.arange(len(block)), labels[start:stop]].sum())
    return -total / max(len(labels), 1)


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    nll_before: float
    nll_after: float


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The T > 0 that minimises the NLL of logits / T, by a bounded 1-D search over log T (deterministic).

    NLL is convex in 1/T, hence unimodal in log T, so Brent's bounded search finds the minimum.
    Args: logits (N, K) of the validation split (memory-mapped or not: `nll` reads a block at a time), labels
    (N,) class indices.
    """
    labels = np.asarray(labels)
    before = nll(logits, labels)
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-7},
    )
    temperature, after = float(np.exp(result.x)), float(result.fun)
    if after > before:  # only possible if the search stopped early; T = 1 is then the better answer
        temperature, after = 1.0, before
    return TemperatureFit(temperature, before, after)


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins: per bin the sample count, mean confidence and accuracy (0 where empty)."""

    edges: np.ndarray  # (B + 1,)
    counts: np.ndarray  # (B,)
    confidence: np.ndarray  # (B,)
    accuracy: np.ndarray  # (B,)

    @property
    def ece(self) -> float:
        """Expected calibration error: |accuracy - confidence| per bin, weighted by the bin's share."""
        total = self.counts.sum()
        if total == 0:
            return 0.0
        return float(np.sum(self.counts / total * np.abs(self.accuracy - self.confidence)))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> Reliability:
    """Bin the top-1 confidence into `n_bins` equal-width bins (lo, hi] over [0, 1].

    Args: probs (N, K) probabilities, labels (N,) class indices, n_bins >= 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    return reliability_of(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), n_bins)


def reliability_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> Reliability:
    """`reliability` from each image's (N,) top-1 confidence and whether its top-1 class is right."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    return Reliability(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        counts=counts,
        confidence=np.bincount(index, weights=confidence, minlength=n_bins) / safe,
        accuracy=np.bincount(index, weights=correct, minlength=n_bins) / safe,
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    return reliability(probs, labels, n_bins).ece


def label_thresholds(calibration: dict, names: list[str], where: object) -> np.ndarray:
    """(K,) each of `names`' probability threshold from evaluate's record (`paths.calibration`, read into
    `calibration`), as evaluate decided with it: quantize's gate and the export both read them here.

    Raises:
        PipelineError: a label without a threshold (the record is from another model, or missing); `where`
        names the record in the message.
    """
    found = calibration.get("thresholds", {})
    missing = [name for name in names if name not in found]
    if missing:
        raise PipelineError(
            f"{where}: no per-label thresholds for {missing[:10]}; run the evaluate stage first "
            "(dvc repro evaluate)"
        )
    return np.array([found[name] for name in names], dtype=np.float64)


def tuned_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(K,) per label, the probability threshold with the best F1 on these images (`probs` (N, K), `truth`
    (N, K) bool): the scores sorted from the highest, each cut's F1 from running counts; the threshold lies
    halfway between the last score kept and the next. 0.5 for a label with no positive."""
    thresholds = np.full(probs.shape[1], 0.5)
    for k in np.flatnonzero(truth.any(axis=0)).tolist():
        order = np.argsort(-probs[:, k], kind="stable")
        scores, positive = probs[order, k], truth[order, k]
        tp = np.cumsum(positive)
        f1 = 2 * tp / (np.arange(1, len(scores) + 1) + positive.sum())
        distinct = np.r_[scores[1:] < scores[:-1], True]  # a cut between equal scores is no threshold
        best = int(np.argmax(np.where(distinct, f1, -1.0)))
        below = scores[best + 1] if best + 1 < len(scores) else 0.0
        thresholds[k] = (scores[best] + below) / 2
    return thresholds

"""Split conformal prediction sets (numpy only): the evaluate stage calibrates a threshold on val, predict
applies it.

Each class of an image gets a nonconformity score from its calibrated probabilities; a set holds every class
whose score is at most the threshold, so the calibration and the sets read one definition (`class_scores`).
With the threshold the ceil((n + 1)(1 - alpha))-th smallest true-class score of n val images, a new image
exchangeable with them has its true class in its set with probability >= 1 - alpha (Vovk et al. 2005;
Angelopoulos & Bates 2021). Methods, all deterministic (no random tie-breaking, so CLI, Predictor and
evaluate agree):

- `lac` (Sadinle et al. 2019): 1 - p_k. The smallest sets on average; coverage can be uneven across classes.
- `aps` (Romano et al. 2020): the probability mass of the classes ranked at or above k. Adaptive: hard images
  get larger sets.
- `raps` (Angelopoulos et al. 2021): aps + lambda * max(0, rank_k - k_reg), which penalises long tails of
  unlikely classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

METHODS = ("aps", "raps", "lac")


@dataclass(frozen=True)
class Conformal:
    """A calibrated conformal predictor: sets are {k : class_scores[k] <= threshold}. `threshold` is inf
    when val has too few images for 1 - alpha (every set is then every class)."""

    method: str
    alpha: float
    threshold: float
    n_calibration: int
    k_reg: int = 0  # raps only
    lam: float = 0.0  # raps only

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (an infinite threshold as the string "inf")."""
        return {**asdict(self), "threshold": _finite_or_text(self.threshold)}

    @classmethod
    def from_json(cls, raw: Any, source: str) -> Conformal:
        """Parse what `to_json` wrote; anything else is one PipelineError naming `source`."""
        try:
            conformal = cls(**{**raw, "threshold": float(raw["threshold"])})
        except (TypeError, KeyError, ValueError):
            raise PipelineError(
                f"{source}: conformal settings are not what evaluate writes: {raw!r}"
            ) from None
        if conformal.method not in METHODS or not 0 < conformal.alpha < 1 or math.isnan(conformal.threshold):
            raise PipelineError(f"{source}: conformal settings out of range: {raw!r}")
        return conformal


def class_scores(probs: np.ndarray, method: str, k_reg: int = 0, lam: float = 0.0) -> np.ndarray:
    """(N, K) probabilities -> (N, K) nonconformity of every class (lower: more plausible)."""
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")  # ties broken by class index, the same everywhere
    ranked = np.take_along_axis(probs, order, axis=1)
    cumulative = np.cumsum(ranked, axis=1)  # mass of the classes ranked at or above each one
    if method == "raps":
        ranks = np.arange(1, probs.shape[1] + 1)
        cumulative = cumulative + lam * np.maximum(0, ranks - k_reg)
    scores = np.empty_like(cumulative)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def calibrate(
    probs: np.ndarray, labels: np.ndarray, method: str, alpha: float, k_reg: int = 0, lam: float = 0.0
) -> Conformal:
    """The threshold from n calibration images: the ceil((n + 1)(1 - alpha))-th smallest true-class score.

    Args: probs (n, K) calibrated probabilities of the val split, labels (n,) class indices.
    """
    return from_true_scores(true_scores(probs, labels, method, k_reg, lam), method, alpha, k_reg, lam)


def true_scores(
    probs: np.ndarray, labels: np.ndarray, method: str, k_reg: int = 0, lam: float = 0.0
) -> np.ndarray:
    """(n,) nonconformity of each image's true class, `labels` (n,), from its (n, K) probabilities."""
    if method not in METHODS:
        raise PipelineError(f"conformal method {method!r}: use one of {', '.join(METHODS)}")
    labels = np.asarray(labels)
    return np.concatenate(
        [
            class_scores(probs[a:b], method, k_reg, lam)[np.arange(b - a), labels[a:b]]
            for a, b in _blocks(len(labels))
        ]
        or [np.empty(0)]
    )


def from_true_scores(
    true: np.ndarray, method: str, alpha: float, k_reg: int = 0, lam: float = 0.0
) -> Conformal:
    """The calibrated predictor of the (n,) true-class scores of n calibration images (`true_scores`)."""
    rank = math.ceil((len(true) + 1) * (1.0 - alpha))
    threshold = math.inf if rank > len(true) else float(np.sort(true)[rank - 1])
    return Conformal(method, float(alpha), threshold, len(true), int(k_reg), float(lam))


def prediction_sets(probs: np.ndarray, conformal: Conformal) -> np.ndarray:
    """(N, K) probabilities -> (N, K) bool: class k is in image n's set."""
    sets = np.empty(np.shape(probs), dtype=bool)
    for a, b in _blocks(len(sets)):
        scores = class_scores(probs[a:b], conformal.method, conformal.k_reg, conformal.lam)
        sets[a:b] = scores <= conformal.threshold
    return sets


def _blocks(n: int) -> list[tuple[int, int]]:
    """Rows scored at a time: class_scores makes five (rows, K) float64 arrays, which for all 295,000 test
    images of a million-image set of 1,000 classes were 12 GB (evaluate was killed at 19 GB of RSS)."""
    return [(start, min(start + _ROWS, n)) for start in range(0, n, _ROWS)]


_ROWS = 4096


def set_figures(sets: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """What the (N, K) bool sets achieve on labelled images (`figures_of` their rows' coverage and sizes)."""
    labels = np.asarray(labels)
    return figures_of(sets[np.arange(len(labels)), labels], sets.sum(axis=1), labels, class_names)


def figures_of(
    covered: np.ndarray, sizes: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Coverage overall, per class (the worst named) and by set size; mean and median size; shares of
    singleton and empty sets; from each image's (N,) `covered` (its true class is in its set) and set
    `sizes`."""
    labels = np.asarray(labels)
    images = np.bincount(labels, minlength=len(class_names))
    hits = np.bincount(labels, weights=covered, minlength=len(class_names))
    per_class = {name: float(hits[k] / images[k]) for k, name in enumerate(class_names) if images[k]}
    worst = min(per_class, key=per_class.get) if per_class else None
    return {
        "coverage": float(covered.mean()),
        "coverage_per_class": per_class,
        "worst_class": worst,
        "worst_class_coverage": per_class.get(worst) if worst else None,
        "coverage_by_size": {
            int(size): {
                "images": int(np.sum(sizes == size)),
                "coverage": float(covered[sizes == size].mean()),
            }
            for size in np.unique(sizes)
        },
        "set_size_mean": float(sizes.mean()),
        "set_size_median": float(np.median(sizes)),
        "singleton_share": float(np.mean(sizes == 1)),
        "empty_share": float(np.mean(sizes == 0)),
    }


def _finite_or_text(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"

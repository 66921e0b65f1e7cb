"""Unknown-input rejection (numpy only): a post-hoc score per image, higher for images like the training
data, and a threshold below which predict marks the image `unknown`.

Detectors (the strongest simple post-hoc ones in OpenOOD v1.5):
- `knn` (Sun et al. 2022): minus the distance from the image's unit-length penultimate features (the pooled
  backbone features the head reads) to the k-th nearest of the train split's; needs the feature bank. With
  `dims`, features and bank are first projected on the bank's `dims` principal axes (and made unit-length
  again): at batch 1 that reads a sixth of the memory the full bank does, and on Fashion-MNIST it separates
  the held-out classes a little better (`python -m benchmarks trust`).
- `energy` (Liu et al. 2020): logsumexp of the logits, the free energy with its sign flipped.
- `msp` (Hendrycks & Gimpel 2017): the largest calibrated softmax probability.

The threshold is fitted on the val split so that a share `tpr` of in-distribution images is kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

DETECTORS = ("knn", "energy", "msp")
_CHUNK = 256  # query rows per kNN matrix product: (256, M) similarities at a time
# Bank rows per product. Why: at batch 1 each (1, d) x (d, 1024) product, d <= 256, stays under OpenBLAS's
# threading threshold (m * n * k < 2**18), and waking BLAS threads next to ONNX Runtime's on a busy CPU costs
# 10-20 ms, 100x the product itself (benchmarks/trust, 2 loaded cores).
_BANK_BLOCK = 1024


@dataclass(frozen=True)
class Detector:
    """A fitted detector: `scores` below `threshold` are unknown. `bank` (M, C) unit-length train features,
    knn only, searched on its `dims` principal axes (0: all C features)."""

    kind: str
    threshold: float
    tpr: float
    k: int = 1
    bank: np.ndarray | None = None
    dims: int = 0
    _index: KnnIndex | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "knn" and self.bank is not None:  # derived once, not per image
            object.__setattr__(self, "_index", KnnIndex.build(self.bank, self.dims))

    def scores(self, logits: np.ndarray, features: np.ndarray | None, temperature: float) -> np.ndarray:
        """(N,) in-distribution scores from (N, K) logits and (N, C) penultimate features."""
        if self.kind == "msp":
            scaled = np.asarray(logits, dtype=np.float64) / temperature
            return np.exp(scaled.max(axis=1) - _logsumexp(scaled))
        if self.kind == "energy":
            return _logsumexp(np.asarray(logits, dtype=np.float64))
        if features is None or self._index is None:
            raise PipelineError("the knn detector needs the model's features and the train feature bank")
        return self._index.scores(features, self.k)

    def fitted(self, val_scores: np.ndarray) -> Detector:
        """This detector with the threshold that keeps a share `tpr` of the val images' (n,) `scores`; the kNN
        index comes along (dataclasses.replace would derive it again from the bank)."""
        fitted = copy.copy(self)
        object.__setattr__(fitted, "threshold", threshold_at_tpr(val_scores, self.tpr))
        return fitted

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: the image is unlike the training data."""
        return np.asarray(scores) < self.threshold

    def settings(self) -> dict[str, Any]:
        """What travels in the export's metadata (the bank goes in its own file)."""
        return {
            "detector": self.kind,
            "threshold": self.threshold,
            "tpr": self.tpr,
            "k": self.k,
            "dims": self.dims,
        }

    @classmethod
    def from_settings(cls, raw: Any, bank: np.ndarray | None, source: str) -> Detector:
        """Parse `settings()` output; anything else is one PipelineError naming `source`."""
        try:
            detector = cls(
                raw["detector"],
                float(raw["threshold"]),
                float(raw["tpr"]),
                int(raw["k"]),
                bank,
                int(raw.get("dims", 0)),  # exports from before the projection searched all features
            )
        except (TypeError, KeyError, ValueError, AttributeError):
            raise PipelineError(
                f"{source}: unknown-input settings are not what evaluate writes: {raw!r}"
            ) from None
        if (
            detector.kind not in DETECTORS
            or not math.isfinite(detector.threshold)
            or detector.k < 1
            or detector.dims < 0
        ):
            raise PipelineError(f"{source}: unknown-input settings out of range: {raw!r}")
        return detector


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """(N, K) -> (N,) log sum exp over each row, shifted by the row's max so it never overflows."""
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def normalize(features: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) float32 rows of unit length (a zero row stays zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class KnnIndex:
    """The bank as the knn search reads it: `axes` (C, d) float32 principal axes (None: all C features) and
    `rows` (M, d) float32 contiguous unit-length bank rows on them."""

    axes: np.ndarray | None
    rows: np.ndarray

    @classmethod
    def build(cls, bank: np.ndarray, dims: int) -> KnnIndex:
        """The index of a (M, C) unit-length bank on its top `dims` principal axes (0: all features)."""
        bank = np.asarray(bank, dtype=np.float32)
        axes = principal_axes(bank, dims)
        rows = bank if axes is None else normalize(bank @ axes)
        return cls(axes, np.ascontiguousarray(rows))

    def scores(self, features: np.ndarray, k: int) -> np.ndarray:
        """(N,) minus the Euclidean distance from each (N, C) feature row, unit-length (and projected, then
        unit-length again), to its k-th nearest bank row."""
        queries = normalize(features)
        if self.axes is not None:
            queries = normalize(queries @ self.axes)
        k = min(k, len(self.rows))
        scores = np.empty(len(queries), dtype=np.float64)
        for start in range(0, len(queries), _CHUNK):
            chunk = queries[start : start + _CHUNK]
            similarity = np.concatenate(  # (n, M): unit vectors, |a - b|^2 = 2 - 2 a.b
                [chunk @ self.rows[b : b + _BANK_BLOCK].T for b in range(0, len(self.rows), _BANK_BLOCK)],
                axis=1,
            )
            kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
            scores[start : start + _CHUNK] = -np.sqrt(np.maximum(0.0, 2.0 - 2.0 * kth))
        return scores


def principal_axes(bank: np.ndarray, dims: int) -> np.ndarray | None:
    """(C, d) float32 top principal axes (uncentred: of the unit rows themselves) of a (M, C) bank, d = `dims`
    capped at the bank's rank; None when `dims` is 0 or keeps every feature.

    Derived from the bank as shipped (float16 values, float64 arithmetic) so evaluate and predict get the
    same axes and the export needs no second file; the sign of an axis does not change a distance.
    """
    rows = np.asarray(bank, dtype=np.float64)
    if dims <= 0 or dims >= rows.shape[1] or len(rows) == 0:
        return None
    values, vectors = np.linalg.eigh(rows.T @ rows)  # (C,), (C, C): eigenvalues ascending
    rank = int(np.sum(values > values[-1] * 1e-6))  # beyond it: float16 rounding, arbitrary axes
    return np.ascontiguousarray(vectors[:, ::-1][:, : min(dims, rank)], dtype=np.float32)


def knn_scores(features: np.ndarray, bank: np.ndarray, k: int, dims: int = 0) -> np.ndarray:
    """(N,) minus the Euclidean distance from each unit-length feature row to its k-th nearest bank row (on
    the bank's `dims` principal axes; 0: all features)."""
    return KnnIndex.build(bank, dims).scores(features, k)


def fit(
    kind: str,
    val: tuple[np.ndarray, np.ndarray],
    train_features: np.ndarray,
    temperature: float,
    tpr: float,
    k: int,
    dims: int = 0,
) -> Detector:
    """A detector whose threshold keeps at least a share `tpr` of the val images.

    Args: kind one of DETECTORS; val (logits (n, K), features (n, C)) of the val split; train_features
    (M, C) of the train split (the knn bank, stored as float16 in the export, searched on its `dims`
    principal axes).
    """
    detector = unfitted(kind, train_features, tpr, k, dims)
    return detector.fitted(detector.scores(val[0], val[1], temperature))


def unfitted(kind: str, train_features: np.ndarray, tpr: float, k: int, dims: int = 0) -> Detector:
    """`fit`'s detector before its threshold (0.0 until `Detector.fitted`), for val scores computed a block of
    rows at a time."""
    if kind not in DETECTORS:
        raise PipelineError(f"unknown-input detector {kind!r}: use one of {', '.join(DETECTORS)}")
    bank = normalize(train_features).astype(np.float16) if kind == "knn" else None
    return Detector(kind, 0.0, tpr, k, bank, dims if kind == "knn" else 0)


def threshold_at_tpr(scores: np.ndarray, tpr: float) -> float:
    """The largest threshold that still keeps (score >= threshold) at least a share `tpr` of `scores`."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    return float(ordered[min(len(ordered) - 1, int(math.floor((1.0 - tpr) * len(ordered))))])

"""The audit's statistics on backbone embeddings: near-duplicate groups, likely label errors, drift.

Pure functions on arrays and image files; scikit-learn and cleanlab do the statistics, this module only wires
them, and compares candidate near-duplicates pixel by pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import AuditParams

_BLOCK = 2048  # rows of the similarity matrix computed at a time: (2048, N) float32


@dataclass(frozen=True)
class Pair:
    first: int
    second: int
    similarity: float  # cosine of the two (centred) embeddings
    correlation: float | None  # best aligned pixel correlation (see aligned_correlation); None: not needed


def normalised(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def _centred(embeddings: np.ndarray) -> np.ndarray:
    """Unit embeddings centred on their mean: pooled post-ReLU features share a large common part that makes
    any two images look alike (random block patterns at 0.96-0.98; on Fashion-MNIST centring halved the other
    pairs at equal recall)."""
    return normalised(embeddings - embeddings.mean(axis=0))


def similar_pairs(
    embeddings: np.ndarray, threshold: float, neighbours: int
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """One pass over the centred cosine similarities of all pairs, {(i, j), i < j: similarity} twice: the
    pairs at least `threshold` alike, and each image with its `neighbours` most similar others. An altered
    copy is its original's nearest neighbour even where the cosine itself is low (a JPEG of a 28 px image:
    0.45-0.91), so the second set is ranked, not thresholded."""
    unit = _centred(embeddings)
    count = min(neighbours, len(unit) - 1)
    alike: dict[tuple[int, int], float] = {}
    nearest: dict[tuple[int, int], float] = {}
    for start in range(0, len(unit), _BLOCK):
        block = unit[start : start + _BLOCK] @ unit.T  # (B, N)
        rows = np.arange(len(block))
        block[rows, rows + start] = -np.inf  # no image is its own pair or neighbour
        found_rows, cols = np.nonzero(block >= threshold)
        keep = cols > found_rows + start
        found_rows, cols = found_rows[keep], cols[keep]
        keys = zip((found_rows + start).tolist(), cols.tolist(), strict=True)
        alike.update(zip(keys, block[found_rows, cols].tolist(), strict=True))
        if count < 1:
            continue
        tops = np.argpartition(-block, count - 1, axis=1)[:, :count].tolist()
        for row, top in zip(rows.tolist(), tops, strict=True):
            for col in top:
                nearest[tuple(sorted((start + row, col)))] = float(block[row, col])
    return alike, nearest


# Pixel comparison: grey thumbnails, lightly blurred so resampling differences do not count; one image may be
# a crop of the other (or of its mirror image) down to 1 / 1.2 = 83% of each side, at any position.
_THUMB = 48
_BLUR = 0.7  # px, Gaussian sigma at _THUMB
_ZOOMS = tuple(round(1.0 + 0.02 * k, 2) for k in range(11))  # 1.00 .. 1.20
_PIXEL_SIDE = 12  # pixel_nearest compares thumbnails shrunk to 12 x 12 (4 x 4 boxes)


def thumbnail(path: Path) -> np.ndarray:
    """The image as a (_THUMB, _THUMB) float32 grey array, EXIF-oriented and lightly blurred."""
    from PIL import ImageFilter

    from pipeline.data.images import open_reduced

    image = open_reduced(path, _THUMB).convert("L").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(_BLUR)), dtype=np.float32)


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each row minus its mean, divided by its norm: a dot product of two such rows is their correlation."""
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


def _windows(thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every _THUMB-square window of the thumbnail enlarged by each of _ZOOMS: (W, _THUMB ** 2) rows of
    pixels, and each row's norm once its mean is taken off (a row's dot product with a standardised template,
    divided by that norm, is their correlation)."""
    from numpy.lib.stride_tricks import sliding_window_view

    sides = [round(_THUMB * zoom) for zoom in _ZOOMS]
    rows = np.empty((sum((side - _THUMB + 1) ** 2 for side in sides), _THUMB * _THUMB), dtype=np.float32)
    start = 0
    for side in sides:
        big = np.asarray(Image.fromarray(thumb).resize((side, side), Image.Resampling.BILINEAR))
        places = side - _THUMB + 1
        block = rows[start : start + places * places].reshape(places, places, _THUMB, _THUMB)
        block[...] = sliding_window_view(big, (_THUMB, _THUMB))  # one copy, straight into place
        start += places * places
    sums = rows.sum(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    centred = np.sqrt(np.maximum(squares - sums * sums / rows.shape[1], 0.0))
    return rows, np.maximum(centred, 1e-6).astype(np.float32)


def aligned_correlation(
    thumbs: Mapping[int, np.ndarray] | np.ndarray, pairs: Sequence[tuple[int, int]]
) -> list[float]:
    """For each pair: the highest pixel correlation of one thumbnail (or its mirror image) with any window of
    the other one enlarged by up to 1.2x, trying both ways round: 1.0 for the same picture re-encoded,
    resized, brightened or flipped, and close to it for a crop of it."""
    partners: dict[int, list[int]] = {}
    for i, j in pairs:
        partners.setdefault(i, []).append(j)
        partners.setdefault(j, []).append(i)
    templates = {
        k: _standardised(np.stack([thumbs[k].ravel(), thumbs[k][:, ::-1].ravel()])) for k in partners
    }
    best: dict[tuple[int, int], float] = {}
    for big, smalls in partners.items():  # each thumbnail's windows are made once
        rows, norms = _windows(thumbs[big])
        scores = (rows @ np.concatenate([templates[k] for k in smalls]).T) / norms[:, None]
        for k, score in zip(smalls, scores.max(axis=0).reshape(-1, 2).max(axis=1).tolist(), strict=True):
            key = (min(big, k), max(big, k))
            best[key] = max(best.get(key, -1.0), score)
    return [best[(min(i, j), max(i, j))] for i, j in pairs]


def pixel_nearest(thumbs: np.ndarray) -> set[tuple[int, int]]:
    """Each image with the other whose thumbnail, shrunk to _PIXEL_SIDE px, correlates most with its own or
    with its mirror image: {(i, j), i < j}. A re-encoded, resized, brightened or mirrored copy is its
    original's nearest by pixels even where other products of its kind embed closer: of 300 JPEG copies of
    28 px Fashion-MNIST images (five draws of audit_near_duplicates), all were their original's nearest by
    pixels and 272 among its 5 nearest embeddings."""
    n, box = len(thumbs), _THUMB // _PIXEL_SIDE
    small = thumbs.reshape(n, _PIXEL_SIDE, box, _PIXEL_SIDE, box).mean(axis=(2, 4))
    plain = _standardised(small.reshape(n, -1))
    mirrored = _standardised(small[:, :, ::-1].reshape(n, -1))
    nearest: set[tuple[int, int]] = set()
    for start in range(0, n, _BLOCK):
        rows = plain[start : start + _BLOCK]
        block = np.maximum(rows @ plain.T, rows @ mirrored.T)  # (B, N)
        block[np.arange(len(block)), np.arange(len(block)) + start] = -np.inf
        for row, col in enumerate(block.argmax(axis=1).tolist()):
            nearest.add((min(start + row, col), max(start + row, col)))
    return nearest


def near_duplicate_pairs(embeddings: np.ndarray, files: Sequence[Path], audit: AuditParams) -> list[Pair]:
    """Pairs whose embeddings are at least `audit.similarity` alike, and pairs whose pixels correlate at least
    `audit.pixel_correlation` once aligned (aligned_correlation) among two kinds of candidates: an image and
    one of its `audit.neighbours` nearest others by embedding, and an image and its nearest other by pixels
    (pixel_nearest)."""
    if len(files) < 2:
        return []
    alike, nearest = similar_pairs(embeddings, audit.similarity, audit.neighbours)
    found = {(i, j): Pair(i, j, similarity, None) for (i, j), similarity in alike.items()}
    thumbs = np.stack([thumbnail(path) for path in files])
    candidates = sorted((set(nearest) | pixel_nearest(thumbs)) - set(found))
    unit = _centred(embeddings)
    for (i, j), correlation in zip(candidates, aligned_correlation(thumbs, candidates), strict=True):
        if correlation >= audit.pixel_correlation:
            found[(i, j)] = Pair(i, j, float(unit[i] @ unit[j]), correlation)
    return [found[key] for key in sorted(found)]


def group_ids(keys: Sequence[str], pairs: Sequence[Pair]) -> list[str]:
    """Each image's group: the smallest key (sha256) among the images its pairs connect it to. Equal keys
    (identical files) are always one group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(keys)
    first_of: dict[str, int] = {}
    same = [(i, first_of.setdefault(key, i)) for i, key in enumerate(keys)]
    edges = same + [(p.first, p.second) for p in pairs]
    rows, cols = (np.array(side, dtype=np.int64) for side in zip(*edges, strict=True)) if edges else ([], [])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest: dict[int, str] = {}
    for key, c in zip(keys, component.tolist(), strict=True):
        smallest[c] = min(smallest.get(c, key), key)
    return [smallest[c] for c in component.tolist()]


def _probe(n: int):
    """Standardised embeddings -> logistic regression whose penalty per image is fixed: C = 15 / n. sklearn
    sums the loss over the n images, so a fixed C regularises small sets hard and large ones barely. 15 / n
    (C = 0.0025 at 6,000 images) gave the best F1 of the flagged images on 6,000 Fashion-MNIST images with 5%
    flipped labels (0.71; 0.66 at C = 0.01) and the best out-of-fold accuracy (0.87 on the clean images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=15.0 / max(n, 1), max_iter=300))


def out_of_fold_probabilities(
    embeddings: np.ndarray, labels: np.ndarray, folds: int, seed: int
) -> np.ndarray:
    """(N, K) class probabilities of each image from a logistic regression that never saw it (k-fold)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(_probe(len(labels)), embeddings, labels, cv=splitter, method="predict_proba")


@dataclass(frozen=True)
class LabelIssues:
    ranked: np.ndarray  # indices of the likely label errors, most likely first
    quality: (
        np.ndarray
    )  # (N,) cleanlab's label quality score: probability of the given label (self-confidence)
    suggested: np.ndarray  # (N,) class index the classifier prefers


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """cleanlab on out-of-sample probabilities: the images whose given label gets the lowest probability
    (self-confidence), as many as the confident joint's off-diagonal counts (`count.num_label_issues`), most
    likely first. On 6,000 Fashion-MNIST images with 5% flipped labels (seed 42) that gave F1 0.71 (precision
    0.58, recall 0.93) where filter_by="both" gave 0.61: the probe's ranking was good (its top 300 held 251
    flips) but "both" flagged 558 images; held-out draws: benchmarks/README.md."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(
        labels, probabilities, filter_by="low_self_confidence", return_indices_ranked_by="self_confidence"
    )
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return LabelIssues(np.asarray(ranked, dtype=np.int64), quality, probabilities.argmax(axis=1))


def usable_folds(labels: np.ndarray, folds: int) -> int:
    """Folds every class can fill (one image of each class per fold at least); 0 when a class has one."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    return min(folds, smallest) if smallest >= 2 else 0


def two_sample_auc(old: np.ndarray, new: np.ndarray, folds: int, seed: int) -> float:
    """Cross-validated ROC AUC of a classifier telling `new` embeddings from `old` ones (equal numbers of
    each): 0.5 when they come from one distribution, towards 1 as they drift apart."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(seed)
    n = min(len(old), len(new))
    data = np.concatenate([old[rng.permutation(len(old))[:n]], new[rng.permutation(len(new))[:n]]])
    target = np.repeat([0, 1], n)
    splitter = StratifiedKFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(_probe(len(target)), data, target, cv=splitter, scoring="roc_auc")))


def prior_shift(old: dict[str, int], new: dict[str, int]) -> float:
    """Total variation distance between two class distributions (0: same priors, 1: disjoint classes)."""
    classes = sorted(set(old) | set(new))
    p = np.array([old.get(c, 0) for c in classes], dtype=float)
    q = np.array([new.get(c, 0) for c in classes], dtype=float)
    return float(0.5 * np.abs(p / max(p.sum(), 1) - q / max(q.sum(), 1)).sum())

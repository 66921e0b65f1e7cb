"""Multilabel data (`base.task: multilabel`): identical files merged into one image, and the label-set figures
the page and details.json show (cardinality, density, per-label counts, co-occurrence).

Everything here is linear in the images' labels; the co-occurrence counts are a sparse (labels x labels)
product, so a million images of a thousand labels take seconds, not the pairs of images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from pipeline.data.labels import LabelSets, joined

MERGED = "merged_copy"  # quarantine reason: an identical file's labels were merged into the kept copy
_PAIRS_SHOWN = 20  # pairs listed per kind
_MATRIX_LABELS = 20  # up to this many labels the page shows the whole co-occurrence table
_FREQUENT = 200  # never-together pairs are looked for among this many labels (20,000 pairs at most)


def merged(usable: pd.DataFrame, sets: LabelSets) -> tuple[pd.DataFrame, dict[str, str]]:
    """(usable rows with one row per content, path -> MERGED for the copies left out). The same bytes under
    several class folders (or CSV rows) are one image with the union of their labels, kept under the first
    path by name; copies in other given splits were already left out by the split_leakage rule."""
    repeated = usable["sha256"].duplicated(keep=False)
    if not repeated.any():
        return usable, {}
    copies = usable[repeated].sort_values("path", kind="stable")
    union = copies.groupby("sha256", sort=False)["label"].agg(
        lambda cells: joined((name for cell in cells for name in sets.parse(cell)), sets.separator)
    )
    dropped = copies["sha256"].duplicated(keep="first")
    kept = usable.drop(index=copies.index[dropped])
    kept.loc[kept["sha256"].isin(union.index), "label"] = kept["sha256"].map(union)
    return kept, dict.fromkeys(copies.loc[dropped, "path"], MERGED)


def figures(usable: pd.DataFrame, sets: LabelSets) -> dict:
    """The label sets of the usable images in figures: how many labels an image has (cardinality, density:
    cardinality / labels), images with none, positives and negatives per label, and the pairs of labels that
    always occur together, where one implies the other, and never (the most surprising first: those that
    would meet most often if they were independent)."""
    pairs = sets.exploded(usable["label"])
    names, column = np.unique(pairs["label"].to_numpy(dtype=str), return_inverse=True)
    n, k = len(usable), len(names)
    x = sparse.csr_matrix((np.ones(len(pairs), dtype=np.int64), (pairs["row"].to_numpy(), column)), (n, k))
    together = (x.T @ x).tocoo()  # (k, k) images with both labels; the diagonal: positives
    positives = np.asarray(x.sum(axis=0)).ravel()
    per_image = np.asarray(x.sum(axis=1)).ravel()
    upper = together.row < together.col
    a, b, both = together.row[upper], together.col[upper], together.data[upper]
    always = both == np.minimum(positives[a], positives[b])  # one implies the other (or both ways)
    mutual = always & (positives[a] == positives[b])
    cardinality = float(per_image.mean()) if n else 0.0
    return {
        "images": n,
        "labels": k,
        "no_label": int((per_image == 0).sum()),
        "label_sets": int(usable["label"].nunique()),
        "cardinality": round(cardinality, 4),
        "density": round(cardinality / k, 4) if k else 0.0,
        "positives": {name: int(p) for name, p in zip(names, positives, strict=True)},
        "negatives": {name: int(n - p) for name, p in zip(names, positives, strict=True)},
        "always_together": _named(names, a[mutual], b[mutual], both[mutual]),
        "implies": _implications(names, *(v[always & ~mutual] for v in (a, b, both)), positives),
        "never_together": _never(names, positives, set(zip(a.tolist(), b.tolist(), strict=True)), n),
        "cooccurrence": _matrix(names, together) if k <= _MATRIX_LABELS else None,
        "most_together": _named(names, a, b, both),
    }


def _named(names: np.ndarray, a: np.ndarray, b: np.ndarray, both: np.ndarray) -> list[list]:
    order = np.lexsort((b, a, -both))[:_PAIRS_SHOWN]
    return [[str(names[a[i]]), str(names[b[i]]), int(both[i])] for i in order]


def _implications(
    names: np.ndarray, a: np.ndarray, b: np.ndarray, both: np.ndarray, positives: np.ndarray
) -> list[list]:
    """[rarer label, the label every one of its images also has, images], most images first."""
    rare = np.where(positives[a] <= positives[b], a, b)
    common = np.where(positives[a] <= positives[b], b, a)
    return _named(names, rare, common, both)


def _never(names: np.ndarray, positives: np.ndarray, met: set[tuple[int, int]], n: int) -> dict:
    """How many pairs of labels never share an image, and those among the _FREQUENT most frequent labels
    that would share most images if they were independent (n_a * n_b / n): exclusive by design, or a
    sign that the labels are really classes of one single-label question."""
    k = len(names)
    frequent = np.sort(np.argsort(-positives, kind="stable")[:_FREQUENT]).tolist()
    found = [
        [str(names[a]), str(names[b]), float(positives[a] * positives[b] / max(n, 1))]
        for i, a in enumerate(frequent)
        for b in frequent[i + 1 :]
        if (a, b) not in met
    ]
    found.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    shown = [[a, b, round(expected, 2)] for a, b, expected in found[:_PAIRS_SHOWN]]
    return {"pairs": k * (k - 1) // 2 - len(met), "most_expected": shown}


def _matrix(names: np.ndarray, together: sparse.coo_matrix) -> dict[str, dict[str, int]]:
    dense = together.toarray()
    return {str(r): {str(c): int(dense[i, j]) for j, c in enumerate(names)} for i, r in enumerate(names)}

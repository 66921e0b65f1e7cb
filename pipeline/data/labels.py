"""Label sets (`base.task: multilabel`): how one cell of the tables' `label` column holds a set of labels.

A cell holds the set's labels sorted and joined by `base.label_separator` (`cat;dog`); the empty cell is the
empty set. Single-label tables hold one class per cell and are read as one-label sets, so code that counts
per label serves both tasks. Numpy and pandas only: the torch-free predictor may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ingest's workers parse label sets without pandas (0.3 s of imports each)
    import numpy as np
    import pandas as pd


def parse(cell: str, separator: str) -> tuple[str, ...]:
    """The distinct labels of a CSV cell, sorted; blanks around each and empty parts are dropped. With no
    `separator` (a single-label task) the cell is one class."""
    if not separator:
        return (cell,) if cell else ()
    return tuple(sorted({part.strip() for part in cell.split(separator)} - {""}))


def joined(labels: Iterable[str], separator: str) -> str:
    """The cell of a label set: its distinct labels sorted and joined."""
    return separator.join(sorted(set(labels)))


def multi_hot(pairs: pd.DataFrame, rows: int, names: Sequence[str], dtype: Any = bool) -> np.ndarray:
    """(rows, len(names)) array, 1 where an image has a label: `pairs` as `LabelSets.exploded` gives them,
    every label one of `names` (in that column order)."""
    import numpy as np

    index = {name: k for k, name in enumerate(names)}
    out = np.zeros((rows, len(names)), dtype=dtype)
    out[pairs["row"].to_numpy(), pairs["label"].map(index).to_numpy(dtype=np.int64)] = 1
    return out


@dataclass(frozen=True)
class LabelSets:
    """How the `label` cells of one project read: `separator` "" for a single-label task (a cell is one
    class, which may hold any text), else a multilabel task's `base.label_separator`."""

    separator: str = ""

    @classmethod
    def of(cls, task: str, separator: str) -> LabelSets:
        """From `base.task` and `base.label_separator`."""
        return cls(separator if task == "multilabel" else "")

    @property
    def multilabel(self) -> bool:
        return bool(self.separator)

    def parse(self, cell: str) -> tuple[str, ...]:
        return parse(cell, self.separator)

    def exploded(self, cells: pd.Series) -> pd.DataFrame:
        """One row per (image, label) of `cells`: columns `row` (the image's position in `cells`) and
        `label`; an empty set gives no row. Linear in the labels: a million cells of three labels split in
        about 1 s."""
        import numpy as np
        import pandas as pd

        if not self.multilabel:
            return pd.DataFrame({"row": np.arange(len(cells)), "label": cells.to_numpy(dtype=object)})
        parts = pd.Series(cells.to_numpy(dtype=object)).str.split(self.separator, regex=False).explode()
        parts = parts[parts.notna() & (parts != "")]  # the index: each part's image, by position
        rows = parts.index.to_numpy(dtype=np.int64)
        return pd.DataFrame({"row": rows, "label": parts.to_numpy(dtype=object)})

    def counts(self, cells: pd.Series) -> pd.Series:
        """Images per label (positives), by label name."""
        return self.exploded(cells)["label"].value_counts().sort_index()

    def names(self, cells: pd.Series) -> list[str]:
        """Every label that occurs in `cells`, sorted."""
        return sorted(self.exploded(cells)["label"].unique())


SINGLE = LabelSets()  # a single-label task's cells: one class each

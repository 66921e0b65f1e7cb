"""The audit stage's per-image table (`paths.audit_table`): its columns and its one reader.

Split reads two facts from it: each image's near-duplicate group (kept in one split) and whether the audit
quarantined it (left out). Every cell is read as text, as splits.csv is (a class may be named NA).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

AUDIT_COLUMNS = (
    "path",
    "label",
    "split",
    "sha256",
    "group",  # near-duplicate group: the smallest sha256 among its images (identical files share one)
    "group_size",
    "label_issue",  # true: cleanlab flags the label as probably wrong
    "suggested_label",
    "label_quality",  # probability of the given label out of sample (self-confidence); low = suspicious
    "quarantined",  # true: left out of the splits (audit.label_issues: quarantine)
)


def with_audit_groups(table: pd.DataFrame, audit_csv: Path) -> pd.DataFrame:
    """`table` (rows with path and sha256) with a `group` column, the audit's group of each image; an image
    the audit did not see (or no audit table at all) is its own group of identical files (its sha256). Rows
    the audit quarantined are dropped."""
    group = table["sha256"]
    if Path(audit_csv).is_file():
        audit = pd.read_csv(audit_csv, dtype=str, keep_default_na=False).set_index("path")
        group = table["path"].map(audit["group"]).fillna(table["sha256"])
        table = table[~table["path"].map(audit["quarantined"] == "True").fillna(False).astype(bool)]
        group = group[table.index]
    return table.assign(group=group)


def describe_group(rows: pd.DataFrame, shown: int = 3) -> str:
    """A near-duplicate group named as the audit page names it (the first 12 characters of its id), for a
    message: `rows`, its images (path, label, group), come in the order to show them."""
    paths = [*rows["path"].head(shown), *(["..."] if len(rows) > shown else [])]
    labels = sorted(rows["label"].unique())
    return f"audit group {rows['group'].iloc[0][:12]} ({len(rows)} images of {labels}: {', '.join(paths)})"

"""The audit's table as split reads it (pipeline.data.audit): its groups join images of different bytes,
its quarantine leaves images out, an image it did not see is its own group; and how a group is named."""

from __future__ import annotations

import pandas as pd

from pipeline.data.audit import describe_group, with_audit_groups


def test_images_the_audit_grouped_share_its_group_whatever_their_bytes(tmp_path):
    table = pd.DataFrame(
        {"path": ["a.png", "b.png", "c.png", "d.png", "e.png"], "sha256": ["s1", "s2", "s3", "s4", "s5"]}
    )
    audit_csv = tmp_path / "images.csv"
    audit = {
        "path": ["a.png", "b.png", "c.png", "d.png"],
        "group": ["s1", "s1", "s1", "s4"],  # a, b and c: one picture re-encoded, three different files
        "quarantined": [False, False, False, True],
    }
    pd.DataFrame(audit).to_csv(audit_csv, index=False)

    grouped = with_audit_groups(table, audit_csv)

    assert grouped["path"].tolist() == ["a.png", "b.png", "c.png", "e.png"]  # d quarantined
    assert grouped["group"].tolist() == ["s1", "s1", "s1", "s5"]  # e unseen by the audit: its own sha256
    assert grouped.groupby("group")["sha256"].nunique().to_dict() == {"s1": 3, "s5": 1}


def test_without_an_audit_table_each_file_is_its_own_group(tmp_path):
    table = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "sha256": ["s1", "s2", "s1"]})
    assert with_audit_groups(table, tmp_path / "missing.csv")["group"].tolist() == ["s1", "s2", "s1"]


def test_a_group_is_named_by_its_short_id_labels_and_first_files():
    rows = pd.DataFrame(
        {
            "path": ["small/0.png", "small/1.png", "big/7.png", "big/8.png"],
            "label": ["small", "small", "big", "big"],
            "group": ["0123456789abcdef" * 4] * 4,
        }
    )
    assert describe_group(rows) == (
        "audit group 0123456789ab (4 images of ['big', 'small']: small/0.png, small/1.png, big/7.png, ...)"
    )
    assert describe_group(rows.head(2), shown=2).endswith("(2 images of ['small']: small/0.png, small/1.png)")

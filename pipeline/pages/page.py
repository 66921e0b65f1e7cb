"""Building blocks of the pipeline's self-contained HTML pages (validation, run report, export).

One stylesheet, inlined; images as base64 data: URIs; every text escaped. A page made of these opens offline
from a file anywhere and asks for nothing over the network (Great Expectations' Data Docs and DVC's plots HTML
load their CSS and scripts from CDNs and do not).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.3rem}h2{margin-top:2.2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.5rem 0}
nav a{margin-right:1rem}.note{color:#666;font-style:italic}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;min-width:8rem;background:#fafafa}
.card .value{font-size:1.6rem;font-weight:600;font-variant-numeric:tabular-nums}.card .label{color:#555}
.good{color:#1a7f37}.warn{color:#9a6700}.bad{color:#c62828}
details{margin:.6rem 0}summary{cursor:pointer;font-weight:600}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A value as a reader wants it: 4 decimals for ordinary floats, 4 significant digits for tiny or huge."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned and formatted by `fmt`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    return f'<td class="num">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>"


def image(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{encoded}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def cards(items: Iterable[tuple[str, Any, str]]) -> str:
    """Headline figures as cards: (label, value, css class: "" | "good" | "warn" | "bad")."""
    body = "".join(
        f'<div class="card"><div class="value {tone}">{esc(fmt(value))}</div>'
        f'<div class="label">{esc(label)}</div></div>'
        for label, value, tone in items
    )
    return f'<div class="cards">{body}</div>'


def details(summary: str, body: str) -> str:
    """A collapsed block: for raw key/value tables a reader opens only when needed."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def key_values(tree: Any) -> str:
    """A (nested) JSON object as a two-column table of dotted keys and values."""
    return table(["key", "value"], flatten(tree))


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts -> (dotted key, value), keys sorted; lists as (shortened) JSON text."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        text = json.dumps(value, default=str)
        yield prefix, text if len(text) <= 300 else text[:297] + "..."
    else:
        yield prefix, value


def document(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """A whole page: title, `intro` HTML, a navigation bar, then one <section id=key><h2>title</h2> per
    (key, title, body HTML)."""
    nav = "".join(f'<a href="#{esc(key)}">{esc(heading)}</a>' for key, heading, _ in sections)
    body = "".join(
        f'<section id="{esc(key)}"><h2>{esc(heading)}</h2>{content}</section>'
        for key, heading, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{intro}<nav>{nav}</nav>{body}</body></html>\n"
    )

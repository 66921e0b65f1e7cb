"""mkdocs hook: expands the generated parts of the pages, so none of them can drift from the code.

- `<!-- params: SECTION -->` becomes the table of that params section: every key, its default (from the typed
  params in pipeline/config.py) and its docstring there;
- `<!-- include: PATH -->` becomes the file at PATH (relative to the project), headings moved one level down;
- `<!-- stages -->` becomes the stage table made from the stages' contracts (the README holds the same table,
  checked by tests/test_docs.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config import Params
from pipeline.stages import contracts, upstream

PROJECT = Path(__file__).resolve().parent.parent
_PLACEHOLDER = re.compile(r"<!--\s*(params|include):\s*(\S+)\s*-->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    markdown = markdown.replace("<!-- stages -->", readme_block())
    return _PLACEHOLDER.sub(lambda match: _EXPANDERS[match.group(1)](match.group(2)), markdown)


def stage_table() -> str:
    """One row per stage, in DAG order: what it does, the params it reads, what it writes."""
    paths = Params().paths
    rows = ["| stage | what it does | params | writes |", "| --- | --- | --- | --- |"]
    for name, stage in contracts().items():
        writes = [path.as_posix() for path in stage.products(name, paths, metrics=False)]
        cells = (f"`{name}`", stage.summary, _codes(stage.params), _codes(writes))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def stage_graph() -> str:
    """The DAG as a Mermaid flowchart, an edge for each stage that reads what another writes (edges implied
    by a longer path left out, so the picture stays readable)."""
    needs = upstream(contracts())

    def reaches(source: str, target: str) -> bool:
        return source in needs[target] or any(reaches(source, mid) for mid in needs[target])

    edges = [
        f"    {source} --> {target}"
        for target in contracts()
        for source in sorted(needs[target])
        if not any(reaches(source, mid) for mid in needs[target] - {source})
    ]
    return "\n".join(["```mermaid", "flowchart LR", *edges, "```"])


def readme_block() -> str:
    """The README's generated part: the DAG and the stage table."""
    return stage_graph() + "\n\n" + stage_table()


def _codes(items: Any) -> str:
    return ", ".join(f"`{item}`" for item in items)


def params_table(section: str) -> str:
    """The Markdown table of one params section (nested sections inline, as `train.augment.hflip`)."""
    model = Params.model_fields[section].annotation
    defaults = Params().to_dict()[section]
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    rows += _rows(model, defaults, section)
    return "\n".join(rows)


def _rows(model: type[BaseModel], defaults: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key, value, nested = f"{prefix}.{name}", defaults[name], _section_model(field.annotation)
        if nested is not None and not field.description:
            rows += _rows(nested, value, key)
            continue
        if nested is not None:  # a section of same-kind switches (severities): one row for all
            key, value = f"{key}.<rule>", ", ".join(f"{rule}: {level}" for rule, level in value.items())
            rows.append(f"| `{key}` | {value} | {_cell(field.description)} |")
            continue
        rows.append(f"| `{key}` | `{_yaml(value)}` | {_cell(field.description)} |")
    return rows


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _yaml(value: Any) -> str:
    """A default as params.yaml spells it: null, true, [a, b]."""
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: str | None) -> str:
    if not text:
        raise ValueError("a params field has no docstring: document it in pipeline/config.py")
    return " ".join(text.split()).replace("|", "\\|")


def include(path: str) -> str:
    lines, fenced = [], False
    for line in (PROJECT / path).read_text().splitlines():
        fenced ^= line.startswith("```")
        lines.append("#" + line if not fenced and re.match(r"#+ ", line) else line)
    return "\n".join(lines)


_EXPANDERS = {"params": params_table, "include": include}


def write_readme_block(readme: Path = PROJECT / "README.md") -> None:
    """Rewrite the README's generated part between its `stages:start` and `stages:end` markers."""
    text = readme.read_text()
    start = text.index("\n", text.index("<!-- stages:start")) + 1
    end = text.index("<!-- stages:end -->")
    readme.write_text(text[:start] + readme_block() + "\n" + text[end:])


if __name__ == "__main__":  # python docs/hooks.py: refresh the README's stage block
    write_readme_block()

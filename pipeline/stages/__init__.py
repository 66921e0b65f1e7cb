"""The stages and their contracts. Each stage module (or package) declares its contract once, as
`STAGE = Stage(...)`, and exposes `run(params) -> dict` (the stage's metrics).

Everything else is derived from those declarations: the stage order (the data flow between their inputs and
outputs), the CLI's commands, the Prefect flow's tasks, the `outputs` listing, the README's stage table and
`dvc.yaml` itself (`python -m pipeline dvc-yaml`, code deps computed from each stage's imports).

The contracts are read from the stage sources, not imported: importing all eight stages costs about 6 s
(torch, timm, Great Expectations), which every stage command would pay just to build the CLI.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import PathsParams

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class Stage:
    """What a stage reads and writes. Paths are named from the paths catalogue (`PathsParams.ref`):
    a `paths` key (`validated`), a named file (`audit_table`), or `metrics:`/`details:`/`reports:<stage>`.

    Attributes:
        summary: one line, for `--help`, the flow and the README's stage table.
        params: the params sections and dotted keys the stage reads (DVC re-runs it when they change).
        deps: the files and folders it reads.
        outs: what it writes (its metrics file `metrics:<name>` is implied).
        page: the HTML page it writes inside `reports:<name>`, if any.
        plots: dvclive plot folders it writes, by catalogue name, with their x axis.
        dvc_plots: top-level `plots` of dvc.yaml (files it writes and how `dvc plots show` draws them).
        note: a comment shown above the stage in dvc.yaml (why a path is or is not an output).
        warms: params it reads only to fill a content-addressed cache ahead of a later stage (its outputs do
            not depend on them, so they are not DVC params: a change of them does not re-run it).
    """

    summary: str
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    page: str | None = None
    plots: dict[str, str] = field(default_factory=dict)
    dvc_plots: dict[str, dict] = field(default_factory=dict)
    note: str = ""
    warms: tuple[str, ...] = ()

    def products(self, name: str, paths: PathsParams, metrics: bool = True) -> list[Path]:
        """What a person looks for once stage `name` ran: its outputs, its metrics file, and its page in
        place of the report folder that holds it."""
        written = [paths.ref(ref) for ref in (*self.outs, *([f"metrics:{name}"] if metrics else []))]
        if self.page:
            written = [p for p in written if p != paths.reports(name)] + [paths.reports(name) / self.page]
        return written


def _contract(source: Path) -> Stage | None:
    """The `STAGE = Stage(...)` of a stage's source, read without importing it; None when it has none."""
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["STAGE"]):
            continue
        call = node.value
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Stage") or call.args:
            raise ValueError(f"{source}: STAGE must be Stage(...) with keyword arguments only")
        return Stage(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
    return None


def _sources() -> dict[str, Path]:
    """Each stage's defining file: `stages/<name>.py`, or `stages/<name>/__init__.py` for a package."""
    candidates = [p for p in _HERE.glob("*.py") if p.stem != "__init__"] + sorted(_HERE.glob("*/__init__.py"))
    named = {(p.parent.name if p.stem == "__init__" else p.stem): p for p in candidates}
    return {name: path for name, path in sorted(named.items()) if not name.startswith("_")}


def upstream(contracts: dict[str, Stage]) -> dict[str, set[str]]:
    """Each stage's direct producers: the stages that write what it reads (a path or a folder holding it)."""
    from pipeline.config import PathsParams

    def inside(dep: str, out: str) -> bool:
        dep, out = PathsParams.template(dep), PathsParams.template(out)
        return dep == out or dep.startswith(out + "/")

    writes = {name: (*stage.outs, f"metrics:{name}") for name, stage in contracts.items()}
    return {
        name: {other for other, outs in writes.items() if any(inside(d, o) for d in stage.deps for o in outs)}
        - {name}
        for name, stage in contracts.items()
    }


def _in_flow_order(contracts: dict[str, Stage]) -> dict[str, Stage]:
    """Stages ordered by the data flow, each after its producers; ties by name, so the order is stable.
    Raises ValueError on a cycle."""
    needs = upstream(contracts)
    ordered: list[str] = []
    while len(ordered) < len(contracts):
        ready = sorted(n for n in contracts if n not in ordered and needs[n] <= set(ordered))
        if not ready:
            raise ValueError(f"stage contracts form a cycle among {sorted(set(contracts) - set(ordered))}")
        ordered.append(ready[0])
    return {name: contracts[name] for name in ordered}


@functools.cache
def contracts() -> dict[str, Stage]:
    """Every stage's contract, in DAG order."""
    found = {name: _contract(path) for name, path in _sources().items()}
    return _in_flow_order({name: stage for name, stage in found.items() if stage is not None})


def source(name: str) -> Path:
    """The file that declares stage `name`."""
    return _sources()[name]


STAGES = tuple(contracts())
SUMMARIES = {name: stage.summary for name, stage in contracts().items()}

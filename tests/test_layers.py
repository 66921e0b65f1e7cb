"""The layers stay one-way (README "Architecture"): checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "pipeline"
FOUNDATION = {"pipeline.config", "pipeline.io", "pipeline.errors", "pipeline.preprocess"}


def _module(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Pipeline modules `path` imports (`from pipeline.x import y` counts as pipeline.x and pipeline.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline")}
    return found


MODULES = {_module(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if _under(m, "pipeline.stages") and m != "pipeline.stages")
)
def test_no_stage_imports_another_stage(module):
    own = ".".join(module.split(".")[:3])  # pipeline.stages.<name>, a module or a package
    others = {i for i in MODULES[module] if _under(i, "pipeline.stages") and i != "pipeline.stages"}
    assert {i for i in others if not _under(i, own)} == set()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, "pipeline.data")))
def test_data_imports_neither_models_nor_training_nor_stages(module):
    banned = ("pipeline.models", "pipeline.training", "pipeline.stages")
    assert {i for i in MODULES[module] if any(_under(i, b) for b in banned)} == set()


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_the_foundation_imports_only_itself(module):
    assert {i for i in MODULES[module] if not any(_under(i, f) for f in FOUNDATION)} == set()


def test_the_scan_sees_real_imports():
    assert "pipeline.onnx_runtime" in MODULES["pipeline.stages.quantize"]
    assert "pipeline.errors" in MODULES["pipeline.config"]

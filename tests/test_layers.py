"""The layers stay one-way (README "Architecture"): checked on the import statements of every module."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

from pipeline.orchestration.dvc_yaml import pipeline_imports

PACKAGE = PROJECT_ROOT / "pipeline"
FOUNDATION = {"pipeline.config", "pipeline.io", "pipeline.errors", "pipeline.preprocess"}


def _module(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): pipeline_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


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
    assert "pipeline.serving.onnx_runtime" in MODULES["pipeline.stages.quantize"]
    assert "pipeline.errors" in MODULES["pipeline.config"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, "pipeline.pages")))
def test_pages_import_neither_stages_nor_training_nor_orchestration(module):
    banned = ("pipeline.stages", "pipeline.training", "pipeline.orchestration")
    assert {i for i in MODULES[module] if any(_under(i, b) for b in banned)} == set()


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if _under(m, "pipeline.serving") or _under(m, "pipeline.stages"))
)
def test_nothing_below_orchestration_imports_it(module):
    assert {i for i in MODULES[module] if _under(i, "pipeline.orchestration")} == set()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, "pipeline.serving")))
def test_serving_imports_only_the_foundation_and_itself(module):
    allowed = (*FOUNDATION, "pipeline.serving")
    assert {i for i in MODULES[module] if not any(_under(i, a) for a in allowed)} == set()


def test_the_package_root_holds_only_the_foundation_and_a_few_shared_tools():
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert len(root) <= 10, sorted(root)

"""dvc.yaml against the code: generated from the stage contracts and equal to the committed file; stage order,
commands, params, `${...}` paths and the flow between stages."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import typer
import yaml
from helpers import PROJECT_ROOT
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.config import Params, PathsParams
from pipeline.orchestration.dvc_yaml import code_deps, import_closure, render
from pipeline.orchestration.params_file import add_missing_paths
from pipeline.stages import STAGES, Stage, _in_flow_order, contracts, source

DVC_FILE = PROJECT_ROOT / "dvc.yaml"
TEMPLATE = re.compile(r"\$\{\s*([^}\s]+)\s*\}")
ARTIFACT_KINDS = ("outs", "metrics", "plots")

# Outputs that need no consuming stage, and why each is an end product rather than an intermediate.
FINAL_ARTIFACTS = {
    "${paths.quarantine}": "the rejected files with reasons, for a person to fix the data",
    "${paths.reports_dir}/ingest/details.json": "files by ingest status, skipped entries: for a person",
    "${paths.reports_dir}/validate": "the validation page (rules, classes, quarantine) and Data Docs",
    "${paths.reports_dir}/audit": "the audit page and details (split reads images.csv inside it)",
    "${paths.live_dir}/plots/metrics": "training curves, shown by `dvc plots show`",
    "${paths.predictions}": "per-image test predictions, for error analysis",
    "${paths.reports_dir}/evaluate": "the evaluation report and its figures",
    "${paths.export_dir}": "the deliverable: the self-contained model folder",
    "${paths.reports_dir}/export": "the export page: which model is served and why, INT8 vs FP32, parity",
    # Metrics files are read by `dvc metrics show` / `dvc exp show` (export also gates on two of them).
    **{f"${{paths.metrics_dir}}/{stage}.json": "stage metrics for `dvc exp show`" for stage in STAGES},
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat[f"{prefix}{key}"] = value
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


PARAM_KEYS = _flatten(Params().to_dict())  # sections and dotted keys, with their default values


def _resolve(text: str) -> str:
    def value(match: re.Match) -> str:
        key = match.group(1)
        assert key in PARAM_KEYS, f"dvc.yaml: ${{{key}}} is not a key of Params"
        resolved = PARAM_KEYS[key]
        assert isinstance(resolved, str | int | float) and not isinstance(resolved, bool), (
            f"dvc.yaml: ${{{key}}} resolves to {resolved!r}, not a path or number"
        )
        return str(resolved)

    return TEMPLATE.sub(value, text)


def _entries(items: list) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose items are `path` or `{path: {options}}`."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def _path(text: str) -> PurePosixPath:
    return PurePosixPath(_resolve(text))


def _overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


@pytest.fixture(scope="module")
def dvc() -> dict[str, Any]:
    return yaml.safe_load(DVC_FILE.read_text())


@pytest.fixture(scope="module")
def stages(dvc) -> dict[str, dict[str, Any]]:
    return dvc["stages"]


def _outputs(stage: dict[str, Any]) -> list[str]:
    return [path for kind in ARTIFACT_KINDS for path in _entries(stage.get(kind))]


def test_eight_stages_in_pipeline_order(stages):
    assert tuple(stages) == STAGES, "pipeline.stages.STAGES disagrees with dvc.yaml"
    assert len(STAGES) == 8


def test_every_template_resolves_to_a_params_key(dvc):
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):
            found.extend(TEMPLATE.findall(node))
            _resolve(node)

    walk(dvc)
    assert "paths.data_root" in found and "paths.metrics_dir" in found  # the walk did see the templates


@pytest.mark.parametrize("name", STAGES)
def test_stage_command_is_the_cli_command(stages, name):
    assert stages[name]["cmd"] == f"python -m pipeline {name}"
    assert name in typer.main.get_command(app).commands


def _stage_code(name: str) -> list[Path]:
    """A stage's files (a module, or a package's), the one that declares it first."""
    own = source(name)
    if own.name != "__init__.py":
        return [own]
    return [own, *sorted(set(own.parent.glob("*.py")) - {own})]


def test_the_committed_dvc_yaml_is_the_generated_one():
    assert DVC_FILE.read_text() == render(), "dvc.yaml is out of date: run `python -m pipeline dvc-yaml`"


def test_the_check_command_agrees():
    result = CliRunner().invoke(app, ["dvc-yaml", "--check"])
    assert result.exit_code == 0 and "up to date" in result.output, result.output


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_import_closure_as_files(stages, name):
    """DVC re-runs a stage exactly when code it runs changed: every file of its import closure (with the
    packages' __init__.py) is listed, and nothing else."""
    listed = {PROJECT_ROOT / d for d in _entries(stages[name]["deps"]) if d.startswith("pipeline/")}
    assert all(path.is_file() for path in listed), f"{name}: code deps are files, not folders"
    needed = import_closure(_stage_code(name)[:1])
    assert needed <= listed and {PROJECT_ROOT / d for d in code_deps(name)} == listed


def test_staleness_follows_imports_only():
    """Editing the optimizer re-runs train onward, never the audit (which never imports it)."""
    assert "pipeline/training/optim.py" in code_deps("train")
    assert "pipeline/training/optim.py" not in code_deps("audit")
    assert "pipeline/training/features.py" in code_deps("audit")
    assert "pipeline/stages/validate/rules.py" in code_deps("validate")  # a package's modules count
    assert "pipeline/data/__init__.py" in code_deps("split")  # the packages Python runs on the way


def test_each_stage_module_declares_the_contract_read_from_its_source():
    import importlib

    for name, stage in contracts().items():
        assert importlib.import_module(f"pipeline.stages.{name}").STAGE == stage, name


def test_stage_order_follows_the_data_flow_not_the_listing():
    found = contracts()
    shuffled = dict(sorted(found.items(), reverse=True))
    assert tuple(_in_flow_order(shuffled)) == STAGES
    looped = {**found, "ingest": Stage(summary="x", params=("ingest",), deps=("model",), outs=("manifest",))}
    with pytest.raises(ValueError, match="cycle"):
        _in_flow_order(looped)


def test_a_changed_contract_changes_the_generated_file(monkeypatch):
    import pipeline.orchestration.dvc_yaml as generator

    changed = {**contracts(), "split": Stage(summary="s", params=("split",), deps=("validated",), outs=())}
    monkeypatch.setattr(generator, "contracts", lambda: changed)
    text = generator.render()
    split_block = text.split("  split:")[1].split("\n\n")[0]
    assert text != DVC_FILE.read_text() and "${paths.reports_dir}/audit/images.csv" not in split_block


@pytest.mark.parametrize("name", STAGES)
def test_stage_code_is_a_dependency_and_defines_run(stages, name):
    deps = _entries(stages[name]["deps"])
    files = _stage_code(name)
    assert files[0].relative_to(PROJECT_ROOT).as_posix() == deps[0], "a stage lists its own code first"
    tree = ast.parse(files[0].read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)
    for dep in deps:
        if not TEMPLATE.search(dep):
            # A literal dep must be code: data paths are declared once, in params.yaml `paths`.
            assert dep.startswith("pipeline/"), f"{name}: literal data path {dep}; template it from paths"


@pytest.mark.parametrize("name", STAGES)
def test_outputs_are_templated_from_paths(stages, name):
    for out in _outputs(stages[name]):
        assert out.startswith("${paths."), f"{name}: output {out} is not declared in params.yaml paths"


@pytest.mark.parametrize("name", STAGES)
def test_params_entries_exist_in_params(stages, name):
    entries = stages[name].get("params", [])
    assert entries, f"{name}: declares no params"
    for entry in entries:
        assert isinstance(entry, str), f"{name}: params come from the default params.yaml, got {entry!r}"
        assert entry in PARAM_KEYS, f"{name}: params entry {entry!r} is not a section or key of Params"


def _params_read(source: str) -> set[str]:
    """Dotted keys read as `params.<section>.<key>...` (longest chains only) in a module."""
    tree = ast.parse(source)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    read = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "params":
            read.add(".".join(parts))
    return read


@pytest.mark.parametrize("name", STAGES)
def test_params_read_by_stage_code_are_declared(stages, name):
    """DVC re-runs a stage only when a declared param changes, so every one the stage reads must be listed
    (or named in the contract's `warms`: read only to fill a content-addressed cache)."""
    declared = set(stages[name].get("params", [])) | set(contracts()[name].warms)
    files = _stage_code(name)
    for dotted in set().union(*(_params_read(path.read_text()) for path in files)):
        parts = dotted.split(".")
        if parts[0] not in Params.model_fields or parts[0] == "paths":  # paths are deps/outs, not params
            continue
        prefixes = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        assert prefixes & declared, f"{name} reads params.{dotted} but dvc.yaml does not declare it"


def test_parser_of_stage_code_sees_params_reads():
    source = "def run(params):\n    x = params.train.lr\n    y = params.export.opset + params.paths.model\n"
    assert _params_read(source) == {"train.lr", "export.opset", "paths.model"}


def test_data_flows_forward_from_the_source(stages):
    producers = {_path(out): i for i, stage in enumerate(stages.values()) for out in _outputs(stage)}
    sources = {PurePosixPath(str(PARAM_KEYS[f"paths.{key}"])) for key in ("data_root", "csv_manifest")}
    for i, (name, stage) in enumerate(stages.items()):
        for dep in _entries(stage["deps"]):
            if not TEMPLATE.search(dep):
                continue  # code
            path = _path(dep)
            made_by = [j for out, j in producers.items() if _overlaps(out, path)]
            assert made_by or path in sources, f"{name}: {dep} is neither a source nor a stage's output"
            assert all(j < i for j in made_by), f"{name}: {dep} is made by this or a later stage"


def test_every_output_feeds_a_stage_or_is_final(stages):
    final = {_path(path) for path in FINAL_ARTIFACTS}
    outs = {_path(out): name for name, stage in stages.items() for out in _outputs(stage)}
    assert final <= set(outs), f"FINAL_ARTIFACTS names unwritten paths: {sorted(map(str, final - set(outs)))}"
    for out, producer in outs.items():
        consumed = any(
            _overlaps(out, _path(dep))
            for name, stage in stages.items()
            if name != producer
            for dep in _entries(stage["deps"])
            if TEMPLATE.search(dep)
        )
        assert consumed or out in final, f"{producer}: output {out} is read by no stage and is not final"


def test_top_level_plots_come_from_a_stage(dvc, stages):
    outs = [_path(out) for stage in stages.values() for out in _outputs(stage)]
    for plot in _entries(dvc.get("plots")):
        path = _path(plot)
        assert any(path == out or out in path.parents for out in outs), f"plot {plot} is written by no stage"


def test_dvc_itself_parses_the_pipeline():
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listed = tuple(line.split()[0] for line in result.stdout.splitlines() if line.strip())
    assert listed == STAGES


def test_params_yaml_holds_the_paths_catalogue():
    """dvc.yaml templates every path from params.yaml, so the file holds the catalogue's defaults (which the
    generator writes there): changing a default in pipeline/config.py alone fails here."""
    shipped = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["paths"]
    assert shipped == PathsParams().model_dump(mode="json")


def test_the_generator_adds_a_new_catalogue_path_and_keeps_what_a_user_set(tmp_path):
    target = tmp_path / "params.yaml"
    text = (PROJECT_ROOT / "params.yaml").read_text().replace("  live_dir: dvclive\n", "")
    target.write_text(text.replace("data_root: data/sample", "data_root: /my/images"))
    assert add_missing_paths(target, write=False) == ["paths.live_dir"]
    assert "live_dir" not in target.read_text()
    assert add_missing_paths(target) == ["paths.live_dir"]
    written = target.read_text()
    assert yaml.safe_load(written)["paths"]["live_dir"] == "dvclive"
    assert "data_root: /my/images" in written and "# images: <class>/<file>" in written  # comments kept
    assert add_missing_paths(target) == []

"""What fails before any work, in one line: `python -m pipeline check` (run.sh's preflight before DVC)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, make_image_folder

from pipeline.config import NO_CSV_MANIFEST


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _project(tmp_path: Path, **paths: str) -> Path:
    """A project folder: this project's params.yaml with `paths` set, the no-CSV placeholder that dvc.yaml
    makes ingest depend on, and an image folder `images/` as data_root."""
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (tmp_path / NO_CSV_MANIFEST).parent.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / NO_CSV_MANIFEST, tmp_path / NO_CSV_MANIFEST)
    _edit_params(tmp_path, {"paths": {"data_root": "images", **paths}})
    return tmp_path


def _edit_params(project: Path, sections: dict) -> None:
    """Update params.yaml (this project's when missing) section by section; a new section is added as is."""
    path = project / "params.yaml"
    raw = yaml.safe_load((path if path.is_file() else PROJECT_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_check_passes_and_names_the_source(tmp_path):
    project = _project(tmp_path, csv_manifest="lists/labels.csv")
    (project / "lists").mkdir()
    (project / "lists" / "labels.csv").write_text("path,label\nclass_0/img_000.png,class_0\n")
    result = _cli(project, "check")
    assert result.returncode == 0, result.stderr
    assert "source: csv" in result.stdout


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"paths": {"data_root": "nope"}},
            "check: paths.data_root: nope is not a folder (it does not exist); ",
        ),
        (
            {"paths": {"data_root": "params.yaml"}},
            "check: paths.data_root: params.yaml is not a folder (it is a",
        ),
        (
            {"paths": {"csv_manifest": "lists/missing.csv"}},
            "check: paths.csv_manifest: lists/missing.csv is not a file; fix it in params.yaml (relative to "
            "the project folder), or set it to pipeline/data/no_csv_manifest.csv",
        ),
        (
            {"trian": {"lr": 0.1}},
            "check: params.yaml: invalid params: trian: unknown key; did you mean train?",
        ),
        (
            {"train": {"lr": "fast"}},
            "check: params.yaml: invalid params: train.lr: expected a positive number",
        ),
    ],
)
def test_check_fails_in_one_line_naming_the_key_and_the_fix(tmp_path, sections, expected):
    project = _project(tmp_path)
    _edit_params(project, sections)
    assert _one_line_failure(_cli(project, "check")).startswith(expected)


def test_check_wants_the_no_csv_placeholder_that_dvc_depends_on(tmp_path):
    project = _project(tmp_path)
    (project / NO_CSV_MANIFEST).unlink()
    assert _one_line_failure(_cli(project, "check")) == (
        "check: paths.csv_manifest: pipeline/data/no_csv_manifest.csv is not a file; restore this "
        "placeholder for 'no CSV manifest' (git checkout -- pipeline/data/no_csv_manifest.csv)"
    )

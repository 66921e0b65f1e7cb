"""What fails before any work, in one line: `python -m pipeline check` (run.sh's preflight before `dvc repro`)
and the git identity that `flow -n NAME` needs to save an experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, free_port, make_image_folder

from pipeline.config import NO_CSV_MANIFEST
from pipeline.errors import PipelineError
from pipeline.orchestration.git import require_identity as require_git_identity

# Every way git (and DVC's git backend) could learn who commits, besides the files under HOME.
_IDENTITY_VARS = [f"GIT_{role}_{key}" for role in ("AUTHOR", "COMMITTER") for key in ("NAME", "EMAIL")]
_CONFIG_VARS = ["GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "XDG_CONFIG_HOME", "EMAIL"]


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


@pytest.mark.parametrize("command", [["flow"], ["deploy", "--cron", "0 3 * * *"]], ids=["flow", "deploy"])
def test_a_prefect_command_against_a_server_that_is_down_fails_in_one_line(tmp_path, command):
    project = _project(tmp_path)
    shutil.copy2(PROJECT_ROOT / "dvc.yaml", project / "dvc.yaml")  # deploy wants one
    url = f"http://127.0.0.1:{free_port()}/api"
    # Capped in case Prefect ever retries a refused connection (3.8 fails the first at once).
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_CLIENT_MAX_RETRIES": "0"}
    result = _cli(project, *command, env={**env, "PREFECT_API_REQUEST_TIMEOUT": "5"})
    line = _one_line_failure(result)  # flow: was a 136-line traceback
    assert line.startswith(f"{command[0]}: no Prefect server answers at PREFECT_API_URL={url} (")
    assert line.endswith(
        "; start it (prefect server start) or unset PREFECT_API_URL to run on a temporary local server"
    )
    assert result.stdout == ""


@pytest.fixture
def no_git_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment in which git knows no identity: an empty HOME, no system config, no GIT_* identity."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in _IDENTITY_VARS + _CONFIG_VARS:
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


def test_flow_with_a_name_stops_before_any_work_without_a_git_identity(tmp_path, no_git_identity):
    project = _project(tmp_path / "project")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    before = (project / "params.yaml").read_text()
    result = _cli(project, "flow", "-n", "exp", "-S", "train.lr=0.5", env=no_git_identity)
    line = _one_line_failure(result)
    assert line.startswith(
        "flow: saving the experiment is a git commit, but git has no user.name or user.email"
    )
    assert 'git config --global user.name "Your Name"; git config --global user.email' in line
    assert "GIT_AUTHOR_NAME" in line and "GIT_COMMITTER_EMAIL" in line
    assert (project / "params.yaml").read_text() == before, "the -S override was written: work began"
    assert result.stdout == ""


def test_identity_comes_from_the_environment_or_git_config(tmp_path, no_git_identity, monkeypatch):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.raises(PipelineError, match="no user.name or user.email here"):
        require_git_identity(repo)
    for name in _IDENTITY_VARS[:2]:  # the author only: committing needs a committer as well
        monkeypatch.setenv(name, "someone@example.invalid")
    with pytest.raises(PipelineError, match="no user.name or user.email here"):
        require_git_identity(repo)
    for name in _IDENTITY_VARS[2:]:
        monkeypatch.setenv(name, "someone@example.invalid")
    require_git_identity(repo)

    for name in _IDENTITY_VARS:
        monkeypatch.delenv(name)
    subprocess.run(["git", "config", "user.name", "Someone"], cwd=repo, check=True)
    with pytest.raises(PipelineError, match="git has no user.email here"):
        require_git_identity(repo)
    subprocess.run(["git", "config", "user.email", "someone@example.invalid"], cwd=repo, check=True)
    require_git_identity(repo)

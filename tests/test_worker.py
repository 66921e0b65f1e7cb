"""Workers anywhere, on one machine: a bare git repository and a DVC remote (a local folder) stand for the
team's servers; a deployment from git is run by a Prefect worker started in an empty folder; its run clones,
pulls, runs, pushes and commits the champion's pointer; a third clone then `dvc pull`s the champion."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import commit, copy_project, run_tool, tool_environ
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pipeline.__main__ import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api() -> str:
    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


def _origin(built_project: Path, root: Path) -> Path:
    """The team's servers: a bare repository holding the project (images tracked by DVC, a default remote,
    orchestrate.push on, an export param changed since the last run) and the remote holding the data."""
    project = copy_project(built_project, root / "laptop")
    run_tool(project, "git", "rm", "-r", "-q", "--cached", "data/sample")
    run_tool(project, "dvc", "add", "-q", "data/sample")
    run_tool(project, "dvc", "remote", "add", "-d", "shared", str(root / "dvc-remote"))
    run_tool(project, "dvc", "push", "-q")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestrate"]["push"] = True
    params["export"]["min_top1_agreement"] = 0.99  # the worker's run re-runs export
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(project, "team set-up")
    bare = root / "origin.git"
    run_tool(root, "git", "init", "-q", "--bare", str(bare))
    run_tool(project, "git", "push", "-q", str(bare), "HEAD:refs/heads/main")
    return bare


def test_a_worker_in_an_empty_folder_runs_a_deployment_from_git(prefect_api, built_project, tmp_path):
    bare = _origin(built_project, tmp_path)
    pool, name = "anywhere-pool", "nightly-git"
    created = CliRunner().invoke(app, [
        "deploy", "--cron", "0 3 * * *", "--name", name, "--pool", pool, "--repository", str(bare),
        "--ref", "main", "--install", "python -m pipeline --help",
    ])  # fmt: skip
    assert created.exit_code == 0, created.output
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"retrain/{name}")
    assert deployment.path is None and deployment.parameters == {"project_dir": ".", "commit": True}
    assert [next(iter(step)).rsplit(".", 1)[1] for step in deployment.pull_steps] == [
        "git_clone", "run_shell_script", "set_working_directory",
    ]  # fmt: skip

    flow_run = run_deployment(f"retrain/{name}", timeout=0)
    empty = tmp_path / "worker"
    empty.mkdir()
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
        cwd=empty, env=tool_environ(PREFECT_API_URL=prefect_api),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    logs = worker.stdout[-3000:] + worker.stderr[-3000:]
    assert worker.returncode == 0, logs
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.type == StateType.COMPLETED, logs
    assert "Running stage" in logs and "export" in logs
    assert list(empty.iterdir()) == [], "the run left files in the worker's folder"

    third = tmp_path / "third"
    run_tool(tmp_path, "git", "clone", "-q", "--branch", "main", str(bare), str(third))
    assert run_tool(third, "git", "log", "-1", "--format=%s").startswith("retrain: promote")
    run_tool(third, "dvc", "pull", "-q")
    record = json.loads((third / "models" / "champion" / "metrics.json").read_text())
    model = (third / "models" / "model.pt").read_bytes()
    assert record["model_sha256"] == hashlib.sha256(model).hexdigest()
    assert (third / "models" / "champion" / "export" / "model.onnx").is_file()
    assert json.loads((third / "metrics" / "export.json").read_text())  # committed by the worker's run
    assert "Data and pipelines are up to date" in run_tool(third, "dvc", "status")

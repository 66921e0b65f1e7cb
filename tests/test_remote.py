"""Shared storage through DVC remotes: a local folder and an S3 bucket served by moto on 127.0.0.1.

Machine A runs the pipeline and pushes; machine B, a fresh git clone, pulls and finds nothing to recompute:
with a committed dvc.lock `dvc status` is clean, and stages it has to reproduce come from the run cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import S3_BUCKET, commit, copy_project, run_tool
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.errors import PipelineError
from pipeline.orchestration.flow import retrain
from pipeline.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(params=["local", "s3"])
def remote(request, tmp_path) -> dict[str, str]:
    """`dvc remote` settings: a folder, or a prefix in the moto bucket (a fresh one per test)."""
    if request.param == "local":
        return {"url": str(tmp_path / "remote")}
    endpoint = request.getfixturevalue("s3_endpoint")
    return {"url": f"s3://{S3_BUCKET}/{request.node.name}", "endpointurl": endpoint}


def _team_project(built_project: Path, target: Path, remote: dict[str, str]) -> Path:
    """Machine A: the built project with its images tracked by `dvc add` and a default remote, committed."""
    project = copy_project(built_project, target)
    run_tool(project, "git", "rm", "-r", "-q", "--cached", "data/sample")
    run_tool(project, "dvc", "add", "-q", "data/sample")
    run_tool(project, "dvc", "remote", "add", "-d", "shared", remote["url"])
    if "endpointurl" in remote:
        run_tool(project, "dvc", "remote", "modify", "shared", "endpointurl", remote["endpointurl"])
    commit(project, "images tracked by DVC, a default remote")
    return project


def _clone(project: Path, target: Path) -> Path:
    run_tool(project.parent, "git", "clone", "-q", str(project), str(target))
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_fresh_clone_pulls_everything_and_has_nothing_to_recompute(built_project, tmp_path, remote):
    machine_a = _team_project(built_project, tmp_path / "a", remote)
    run_tool(machine_a, "dvc", "push", "--run-cache")
    machine_b = _clone(machine_a, tmp_path / "b")
    assert not (machine_b / "data" / "sample").exists() and not (machine_b / "models").exists()
    run_tool(machine_b, "dvc", "pull", "--run-cache")
    # Before train's checkpoint folder left its outputs (an uncached `persist` output that no pull can
    # restore), this reported train as changed and a new machine retrained.
    assert "Data and pipelines are up to date" in run_tool(machine_b, "dvc", "status")
    assert _sha256(machine_b / "models" / "model.pt") == _sha256(machine_a / "models" / "model.pt")
    assert len(list((machine_b / "data" / "sample").rglob("*.png"))) == 48


# S3 only: the run cache travels to and from a remote as any file does, and the test above pulls it from both
# kinds; the flow's part (restoring instead of running) does not depend on the remote's kind.
@pytest.mark.parametrize("remote", ["s3"], indirect=True)
def test_the_flow_restores_from_the_run_cache_what_another_machine_ran(
    prefect_api, built_project, tmp_path, remote
):
    machine_a = _team_project(built_project, tmp_path / "a", remote)
    machine_b = _clone(machine_a, tmp_path / "b")  # before A's run: its dvc.lock knows nothing of it
    push = {"orchestrate.push": True, "train.lr": 0.002}
    ran = retrain(project_dir=str(machine_a), overrides=push)
    retrained = ("train", "evaluate", "quantize", "export")
    assert {s["stage"]: s["status"] for s in ran["stages"]} == {
        stage: "ran" if stage in retrained else "unchanged" for stage in STAGES
    }
    assert ran["pushed"]["files"] > 0 and ran["pushed"]["commit"] is None

    # Through the command line, as a user runs it: the images are on the remote only, until the flow pulls.
    sets = [arg for key, value in push.items() for arg in ("--set", f"{key}={str(value).lower()}")]
    cli = CliRunner().invoke(app, ["flow", "--project", str(machine_b), *sets])
    assert cli.exit_code == 0, cli.output
    restored = json.loads(cli.stdout[cli.stdout.index("{") :])
    assert {s["stage"]: s["status"] for s in restored["stages"]} == {
        stage: "restored" if stage in retrained else "unchanged" for stage in STAGES
    }
    for output in ("models/model.pt", "metrics/evaluate.json", "models/export/model.onnx"):
        assert _sha256(machine_b / output) == _sha256(machine_a / output), output


def test_push_without_a_default_remote_fails_before_any_stage(prefect_api, built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    with pytest.raises(PipelineError, match="no default remote; add one with `dvc remote add -d"):
        retrain(project_dir=str(project), overrides={"orchestrate.push": True})

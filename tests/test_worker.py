"""Workers anywhere: `deploy --repository` makes a scheduled deployment whose runs clone the project, install
it and work in the clone. Such runs, taken by workers started in empty folders, pushing and committing a
promoted champion that a third clone pulls, are tested end to end in tests/test_sweep.py: the sweep's runs and
its promotion run are runs of such a deployment."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pipeline.__main__ import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_a_deployment_from_git_clones_installs_and_enters_the_clone(prefect_api):
    pool, name = "anywhere-pool", "nightly-git"
    created = CliRunner().invoke(app, [
        "deploy", "--cron", "0 3 * * *", "--name", name, "--pool", pool, "--ref", "main",
        "--repository", "https://git.example.com/classifier.git", "--install", "python -m pipeline --help",
    ])  # fmt: skip
    assert created.exit_code == 0, created.output
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"retrain/{name}")
        schedules = client.read_deployment_schedules(deployment.id)
    assert deployment.path is None and deployment.parameters == {"project_dir": ".", "commit": True}
    assert deployment.work_pool_name == pool and [s.schedule.cron for s in schedules] == ["0 3 * * *"]
    steps = [(next(iter(s)).rsplit(".", 1)[1], next(iter(s.values()))) for s in deployment.pull_steps]
    assert [kind for kind, _ in steps] == ["git_clone", "run_shell_script", "set_working_directory"]
    assert steps[0][1]["repository"].endswith("classifier.git") and steps[0][1]["branch"] == "main"
    assert steps[1][1]["script"] == "python -m pipeline --help"

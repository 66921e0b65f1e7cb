"""Deployments of the retraining flow: scheduled from this folder for a process worker, served from this
process, or fetched from git by a worker on any machine; and the check that a configured Prefect server
answers before any of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectAlreadyExists
from prefect.runner.storage import GitRepository
from prefect.settings import PREFECT_API_URL

from pipeline.errors import PipelineError
from pipeline.orchestration.flow import FLOW_NAME, retrain

ENTRYPOINT = "pipeline/orchestration/flow.py:retrain"  # relative to the project folder


def require_prefect_api() -> None:
    """Raise a PipelineError when PREFECT_API_URL names a server that does not answer (Prefect's own error is
    a 136-line traceback). Unset, Prefect starts a temporary local server itself: nothing to check."""
    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is None:
        return
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    from_profile = not os.environ.get("PREFECT_API_URL")  # `prefect config set` wrote it in the profile
    unset = f"{'prefect config ' if from_profile else ''}unset PREFECT_API_URL"
    raise PipelineError(
        f"no Prefect server answers at PREFECT_API_URL={url} ({reason}); start it (prefect server start) or "
        f"{unset} to run on a temporary local server"
    )


def deploy(cron: str, name: str, work_pool: str, project_dir: str = ".", serve: bool = False) -> str:
    """Create a scheduled deployment of `retrain` for a process worker, or serve it from this process.

    With `serve`, this process runs the scheduled runs itself and blocks until stopped. Otherwise the
    deployment is registered for the process work pool `work_pool` (created when missing), and
    `prefect worker start --pool <work_pool>` runs its runs. Either way each run gets `project_dir` as an
    absolute path. Returns the deployment's name.
    """
    project = Path(project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise PipelineError(f"{project}: no dvc.yaml here; run deploy from the project folder")
    parameters = {"project_dir": str(project)}
    if serve:
        retrain.serve(name=name, cron=cron, parameters=parameters)
        return f"{FLOW_NAME}/{name}"
    _ensure_process_pool(work_pool)
    # The worker loads this file from the folder that holds the `pipeline` package and runs in it.
    code_root = Path(__file__).resolve().parents[2]
    source = retrain.from_source(source=str(code_root), entrypoint=ENTRYPOINT)
    source.deploy(
        name=name, work_pool_name=work_pool, cron=cron, parameters=parameters, print_next_steps=False
    )
    return f"{FLOW_NAME}/{name}"


def deploy_from_git(
    cron: str | None,
    name: str,
    work_pool: str,
    repository: str,
    ref: str,
    install: str,
    commit: bool = True,
    concurrency_limit: int | None = None,
) -> str:
    """Create a deployment whose runs fetch the project themselves, for a worker on any machine; scheduled
    by `cron`, or run only when asked (None: a sweep's).

    Each run's pull steps clone `repository` at branch `ref`, run `install` in the clone (one command per
    line; empty: none) and enter the clone; the flow then pulls from the DVC remote of the committed
    `.dvc/config` (orchestrate.push must be true there), runs, pushes, and with `commit` commits and pushes
    a promoted model's pointers to `ref`. `concurrency_limit` sets the work pool's (Prefect's) limit of runs
    at once. Returns the deployment's name.
    """
    _ensure_process_pool(work_pool, concurrency_limit)
    deployment = retrain.to_deployment(
        name=name, cron=cron, parameters={"project_dir": ".", "commit": commit}, work_pool_name=work_pool
    )
    deployment.entrypoint = ENTRYPOINT  # relative to the clone, whatever this process's folder is
    deployment.storage = _GitProject(repository, ref, install)
    deployment.apply()
    return f"{FLOW_NAME}/{name}"


class _GitProject(GitRepository):
    """A git clone of the project as Prefect pull steps: clone, install, then work in the clone."""

    def __init__(self, url: str, branch: str, install: str):
        super().__init__(url=url, branch=branch)
        self._install = install

    def to_pull_step(self) -> list[dict[str, Any]]:
        clone = super().to_pull_step()
        clone["prefect.deployments.steps.git_clone"]["id"] = "clone"
        folder = "{{ clone.directory }}"
        steps = [clone]
        if self._install.strip():
            script = {"script": self._install, "directory": folder, "stream_output": True}
            steps.append({"prefect.deployments.steps.run_shell_script": script})
        return [*steps, {"prefect.deployments.steps.set_working_directory": {"directory": folder}}]


def _ensure_process_pool(name: str, concurrency_limit: int | None = None) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass
        if concurrency_limit is not None:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))

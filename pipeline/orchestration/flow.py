"""Prefect orchestration of the DVC pipeline: wiring only.

Each stage is a Prefect task that reproduces that one stage through DVC's Python API (one DVC in the flow's
process for the whole run, not a `dvc` process per stage), so DVC alone decides whether the stage is stale:
a stage whose inputs did not change is skipped, and one that another machine ran is restored from the run
cache, not recomputed. Prefect orders the stages, retries transient failures, logs and reports. Param
overrides are written into params.yaml first (as `dvc exp run -S` does); with an experiment name the finished
workspace is saved with `dvc exp save`, so it shows up in `dvc exp show` next to `dvc exp run` experiments.
With `orchestrate.push` the run pulls from the default DVC remote first and pushes outputs and run cache
after it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.runner.storage import GitRepository
from ruamel.yaml import YAML, RoundTripRepresenter

from pipeline import champion, dvc_api
from pipeline.config import DEFAULT_PARAMS_FILE, OrchestrateParams, Params, set_dotted
from pipeline.dvc_api import TransientDvcFailure
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_optional_json
from pipeline.stages import STAGES
from pipeline.stages.ingest import check_dvc_inputs

FLOW_NAME = "retrain"
ENTRYPOINT = "pipeline/flow.py:retrain"  # relative to the project folder


def require_git_identity(project_dir: str | Path) -> None:
    """Raise a PipelineError unless git knows who commits: `dvc exp save` makes a git commit, and without an
    identity it fails only at the end of the run. As in DVC's git backend, GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL,
    GIT_COMMITTER_NAME and GIT_COMMITTER_EMAIL each fall back to git's user.name / user.email."""
    config = {key: _git_config(Path(project_dir), f"user.{key}") for key in ("name", "email")}
    roles = ("AUTHOR", "COMMITTER")
    missing = [
        f"user.{key}"
        for key in ("name", "email")
        if not all(os.environ.get(f"GIT_{role}_{key.upper()}") or config[key] for role in roles)
    ]
    if missing:
        raise PipelineError(
            f"saving the experiment is a git commit, but git has no {' or '.join(missing)} here; run "
            'git config --global user.name "Your Name"; git config --global user.email you@example.com '
            "(or set GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL, GIT_COMMITTER_NAME, GIT_COMMITTER_EMAIL), then retry"
        )


def _git_config(project: Path, key: str) -> str:
    """`git config --get key` as git resolves it in `project` (repo, global, system); '' when unset."""
    return _git(project, "config", "--get", key, check=False)


def _retry_if_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), TransientDvcFailure)


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str, pull: bool = False) -> dict[str, Any]:
    """One stage through DVC. Returns {stage, status: ran | restored | unchanged, ran, seconds,
    command_seconds}: the task's time, and the stage command's own (its `done in` line; None when it did not
    run), so that the difference is what DVC and the flow add."""
    started = time.perf_counter()
    status, output = dvc_api.call(
        Path(project_dir), f"repro {stage}", lambda repo: dvc_api.reproduce(repo, stage, pull)
    )
    seconds = round(time.perf_counter() - started, 3)
    get_run_logger().info("%s", output)
    command = _command_seconds(stage, output) if status == "ran" else None
    return {"stage": stage, "status": status, "ran": status == "ran", "seconds": seconds,
            "command_seconds": command}  # fmt: skip


def _command_seconds(stage: str, output: str) -> float | None:
    """The seconds of the stage command's last `<stage>: done in <seconds> s` line (a stage under torchrun
    prints one per process, the launcher last); None when there is none."""
    found = re.findall(rf"^{re.escape(stage)}: done in ([0-9.]+) s", output, flags=re.MULTILINE)
    return float(found[-1]) if found else None


def _stage_task(stage: str, settings: OrchestrateParams):
    return run_stage.with_options(
        name=stage,
        retries=settings.retries,
        retry_delay_seconds=settings.retry_delay_seconds,
        retry_condition_fn=_retry_if_transient,
    )


class _NullKeepingRepresenter(RoundTripRepresenter):
    """Writes None as `null` (ruamel's default is an empty value), so untouched keys read as before."""


_NullKeepingRepresenter.add_representer(
    type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "null")
)


@task(cache_policy=NO_CACHE)
def set_params(project_dir: str, overrides: dict[str, Any]) -> None:
    """Write dotted overrides into params.yaml, keeping its comments (what `dvc exp run -S` does)."""
    yaml = YAML()
    yaml.Representer = _NullKeepingRepresenter
    path = Path(project_dir) / DEFAULT_PARAMS_FILE
    document = yaml.load(path)
    for dotted, value in overrides.items():
        set_dotted(document, dotted, value)
    with atomic_path(path) as tmp:
        yaml.dump(document, tmp)


@task(cache_policy=NO_CACHE)
def promotion_gate(params: Params, project_dir: str) -> dict[str, Any]:
    decision = champion.promote(params, project_dir)
    get_run_logger().info("champion gate: %s", decision)
    return decision


def drift_verdict(metrics: dict[str, Any] | None, on_drift: str) -> str | None:
    """What `orchestrate.on_drift` makes of the audit's figures: a warning line, or None. Raises
    PipelineError for `stop` when the audit found the new data drifted from the champion's training set."""
    if not metrics or not metrics.get("drifted") or on_drift == "ignore":
        return None
    line = (
        f"the new images drifted from the champion's training set (old-vs-new AUC {metrics.get('drift_auc')},"
        f" class-prior shift {metrics.get('prior_shift')})"
    )
    if on_drift == "stop":
        raise PipelineError(f"{line}; look at reports/audit/index.html, or set orchestrate.on_drift: warn")
    return line


@task(cache_policy=NO_CACHE)
def drift_gate(params: Params, project_dir: str) -> None:
    """The audit's drift figures as a Prefect artifact before training; warn or stop by on_drift."""
    metrics = read_optional_json(Path(project_dir) / params.paths.metrics("audit")) or {}
    figures = {key: metrics.get(key) for key in ("drifted", "drift_auc", "prior_shift", "label_issues")}
    rows = "\n".join(f"| {key} | {value} |" for key, value in figures.items())
    create_markdown_artifact(
        key="data-drift", markdown=f"| audit | value |\n| --- | --- |\n{rows}", description="Before training"
    )
    warning = drift_verdict(metrics, params.orchestrate.on_drift)
    if warning:
        get_run_logger().warning("audit: %s", warning)


@task(cache_policy=NO_CACHE)
def save_experiment(params: Params, project_dir: str, name: str) -> str:
    """Record the workspace as DVC experiment `name`, metrics and training curves included."""
    project = Path(project_dir)
    # `cache: false` outputs live in git, not the DVC cache; on a clone they may not be committed yet.
    folders = [p for p in (params.paths.metrics_dir, params.paths.live_dir) if (project / p).exists()]
    untracked = [str(folder) for folder in folders]

    def save(repo) -> None:
        repo.experiments.save(name=name, force=True, include_untracked=untracked)

    get_run_logger().info("%s", dvc_api.call(project, "exp save", save)[1])
    return name


@task(cache_policy=NO_CACHE)
def publish(params: Params, project_dir: str, stages: list[dict], decision: dict) -> None:
    """Prefect artifacts: a markdown table of the run's metrics, and the path of the evaluation report."""
    project = Path(project_dir)
    create_markdown_artifact(
        key="retrain-metrics",
        markdown=_metrics_markdown(params, project, stages, decision),
        description="Stages, their metrics and the champion decision of this run",
    )
    report = (project / params.paths.reports_dir / "evaluate" / "report.html").resolve()
    create_link_artifact(key="evaluation-report", link=report.as_uri(), link_text=str(report))


@task(cache_policy=NO_CACHE)
def pull(project_dir: str) -> dict[str, Any]:
    """Bring the workspace to what the default remote holds for this commit: data, outputs, run cache."""
    stats, output = dvc_api.call(Path(project_dir), "pull", dvc_api.pull)
    get_run_logger().info("pull: %s\n%s", stats, output)
    return stats


@task(cache_policy=NO_CACHE)
def push(params: Params, project_dir: str, decision: dict, commit: bool) -> dict[str, Any]:
    """Push outputs and run cache to the default remote. With `commit` and a promoted model, the champion
    folder is tracked by DVC too, and dvc.lock, params, metrics and the champion's pointer are committed and
    pushed to the branch's upstream, so any clone of the branch can `dvc pull` the champion."""
    project, champion_dir = Path(project_dir), params.paths.champion_dir
    record = commit and decision["promoted"]

    def share(repo) -> int:
        if record:
            repo.add(str(project / champion_dir))
        return dvc_api.push(repo)

    files, output = dvc_api.call(project, "push", share)
    get_run_logger().info("push: %d files\n%s", files, output)
    pointers = [DEFAULT_PARAMS_FILE, "dvc.lock", params.paths.metrics_dir, params.paths.live_dir,
                Path(f"{champion_dir}.dvc")]  # fmt: skip
    revision = _commit_and_push(project, pointers, _commit_message(decision)) if record else None
    return {"files": files, "commit": revision}


@flow(name=FLOW_NAME)
def retrain(
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    experiment: str | None = None,
    commit: bool = False,
) -> dict[str, Any]:
    """Run the stages in DAG order (on drift, `orchestrate.on_drift: stop` stops before training), gate
    promotion of the new model and publish artifacts.

    Args:
        project_dir: the project folder (dvc.yaml, params.yaml).
        overrides: dotted params such as {"train.lr": 0.001}, written into params.yaml before the run.
        experiment: when given, the result is saved as a DVC experiment of that name.
        commit: when the model is promoted, commit its pointers and push the branch (needs orchestrate.push);
            what a deployment from git does, so that the next run and every clone find the champion.
    """
    project = str(Path(project_dir).resolve())
    if experiment or commit:
        require_git_identity(project)
    # Validates the overrides (unknown key, wrong type) before anything runs or params.yaml changes.
    params = Params.load(Path(project) / DEFAULT_PARAMS_FILE, overrides)
    sharing = _sharing(params, project, commit)
    if sharing:
        pull(project)
    check_dvc_inputs(params, Path(project))  # DVC's own message would be a bare [Errno 2]
    if overrides:
        set_params(project, overrides)
    stages = []
    for stage in STAGES:
        stages.append(_stage_task(stage, params.orchestrate)(stage, project, sharing))
        if stage == "audit":  # before training: the drift the audit found, shown and acted on
            drift_gate(params, project)
    decision = promotion_gate(params, project)
    if experiment:
        save_experiment(params, project, experiment)
    pushed = push(params, project, decision, commit) if sharing else None
    publish(params, project, stages, decision)
    return {"stages": stages, "champion": decision, "experiment": experiment, "pushed": pushed}


def _sharing(params: Params, project: str, commit: bool) -> bool:
    """Whether the run pulls and pushes: orchestrate.push, checked against the DVC remote config up front."""
    if commit and not params.orchestrate.push:
        raise PipelineError(
            "commit needs orchestrate.push: true (the commit points at data on the DVC remote)"
        )
    if params.orchestrate.push:
        dvc_api.call(Path(project), "remote list", dvc_api.require_remote)
    return params.orchestrate.push


def _commit_message(decision: dict) -> str:
    return f"retrain: promote the new model ({decision['reason']})"


def _commit_and_push(project: Path, paths: list[Path | str], message: str) -> str:
    """Commit `paths` (those that exist) and push to the branch's upstream when it has one; the new commit."""
    present = [str(path) for path in paths if (project / path).exists()]
    _git(project, "add", "--", *present)
    _git(project, "commit", "-q", "-m", message)
    revision = _git(project, "rev-parse", "HEAD")
    if _git(project, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}", check=False):
        _git(project, "push", "-q")
    else:
        get_run_logger().warning(
            "%s: the branch has no upstream; committed %s without pushing", project, revision
        )
    return revision


def _git(project: Path, *args: str, check: bool = True) -> str:
    """`git args` in `project`; its output, or '' when it failed and not `check` (else a PipelineError)."""
    try:
        proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    except OSError as exc:  # no git at all: DVC experiments and commits cannot work either
        if check:
            raise PipelineError(f"{project}: git is not installed ({exc}); install git") from None
        return ""
    if proc.returncode != 0 and check:
        raise PipelineError(
            f"{project}: git {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout.strip() if proc.returncode == 0 else ""


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
    code_root = Path(__file__).resolve().parents[1]
    source = retrain.from_source(source=str(code_root), entrypoint=ENTRYPOINT)
    source.deploy(
        name=name, work_pool_name=work_pool, cron=cron, parameters=parameters, print_next_steps=False
    )
    return f"{FLOW_NAME}/{name}"


def deploy_from_git(cron: str, name: str, work_pool: str, repository: str, ref: str, install: str) -> str:
    """Create a scheduled deployment whose runs fetch the project themselves, for a worker on any machine.

    Each run's pull steps clone `repository` at branch `ref`, run `install` in the clone (one command per
    line; empty: none) and enter the clone; the flow then pulls from the DVC remote of the committed
    `.dvc/config` (orchestrate.push must be true there), runs, pushes, and commits and pushes a promoted
    model's pointers to `ref`. Returns the deployment's name.
    """
    _ensure_process_pool(work_pool)
    deployment = retrain.to_deployment(
        name=name, cron=cron, parameters={"project_dir": ".", "commit": True}, work_pool_name=work_pool
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


def _ensure_process_pool(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def _metrics_markdown(params: Params, project: Path, stages: list[dict], decision: dict) -> str:
    lines = ["| stage | status | seconds | metrics |", "| --- | --- | ---: | --- |"]
    for run in stages:
        path = project / params.paths.metrics(run["stage"])
        figures = read_optional_json(path) or {}
        shown = ", ".join(f"{key} {value:.4g}" for key, value in figures.items() if _is_number(value))
        lines.append(f"| {run['stage']} | {run['status']} | {run['seconds']:.1f} | {shown} |")
    verdict = "promoted" if decision["promoted"] else "not promoted"
    lines += ["", f"**Champion gate**: {verdict} ({decision['reason']})", "", _gate_figures(decision)]
    return "\n".join(lines)


def _gate_figures(decision: dict) -> str:
    """Both models' accuracy on the same test images, and the McNemar p-value, as one markdown line."""
    figures = {"new": decision["new"], "champion": decision["champion"], "McNemar p": decision["p_value"]}
    shown = ", ".join(f"{name} {'-' if value is None else f'{value:.4g}'}" for name, value in figures.items())
    return (
        f"On the same {decision['images']} test images (sha256 {decision['test_sha256'][:12]}): accuracy "
        f"{shown}; margin {decision['margin']}, alpha {decision['alpha']}"
    )


def _is_number(value: Any) -> bool:
    """Top-level numbers of a metrics file are shown; text and nested groups (split's images) are not."""
    return isinstance(value, int | float) and not isinstance(value, bool)

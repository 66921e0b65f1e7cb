"""Prefect orchestration of the DVC pipeline: wiring only.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>`, so DVC alone decides whether the
stage is stale (a stage whose inputs did not change is skipped, not recomputed) while Prefect orders the
stages, retries transient failures, logs and reports. Param overrides are written into params.yaml first
(as `dvc exp run -S` does); with an experiment name the finished workspace is saved with `dvc exp save`,
so it shows up in `dvc exp show` next to experiments made with `dvc exp run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from ruamel.yaml import YAML, RoundTripRepresenter

from pipeline import champion
from pipeline.config import DEFAULT_PARAMS_FILE, OrchestrateParams, Params, set_dotted
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_optional_json
from pipeline.stages import STAGES

FLOW_NAME = "retrain"
# Failures worth a retry: another DVC process holds the repo lock, or the OS reported a passing I/O fault.
# Anything else (a PipelineError about bad data, a bug) fails at once: a retry would fail the same way.
_TRANSIENT_MARKERS = (
    "Unable to acquire lock",
    "Resource temporarily unavailable",
    "Device or resource busy",
    "Stale file handle",
    "Input/output error",
    "Connection reset",
    "Interrupted system call",
)
_OUTPUT_TAIL = 4000


class DvcFailed(RuntimeError):
    """A dvc command (a stage's `repro`, `exp save`) exited non-zero; the message ends with its output."""


class TransientDvcFailure(DvcFailed):
    """A failure that a retry may cure (lock contention, passing I/O fault)."""


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
    try:
        proc = subprocess.run(["git", "config", "--get", key], cwd=project, capture_output=True, text=True)
    except OSError:  # no git at all: DVC experiments cannot work either
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _retry_if_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), TransientDvcFailure)


def _dvc(project: Path, *args: str) -> str:
    """Run DVC (this interpreter's) in `project` and return its combined output; raise DvcFailed."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    # Stage commands are `python -m pipeline ...`: make `python` this environment's interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        error = TransientDvcFailure if any(m in proc.stdout for m in _TRANSIENT_MARKERS) else DvcFailed
        raise error(f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-_OUTPUT_TAIL:]}")
    return proc.stdout


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str) -> dict[str, Any]:
    """One stage through DVC. Returns {stage, status: ran | restored | unchanged, ran, seconds}."""
    started = time.perf_counter()
    output = _dvc(Path(project_dir), "repro", "--single-item", stage)
    seconds = round(time.perf_counter() - started, 3)
    get_run_logger().info("%s", output.strip())
    if f"Running stage '{stage}'" in output:
        status = "ran"
    elif f"Stage '{stage}' is cached" in output:  # DVC's run cache restored outputs of an earlier run
        status = "restored"
    else:
        status = "unchanged"
    return {"stage": stage, "status": status, "ran": status == "ran", "seconds": seconds}


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
    include = [arg for folder in folders for arg in ("--include-untracked", str(folder))]
    output = _dvc(project, "exp", "save", "--force", "--name", name, *include)
    get_run_logger().info("%s", output.strip())
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


@flow(name=FLOW_NAME)
def retrain(
    project_dir: str = ".", overrides: dict[str, Any] | None = None, experiment: str | None = None
) -> dict[str, Any]:
    """Run the stages in DAG order (on drift, `orchestrate.on_drift: stop` stops before training), gate
    promotion of the new model and publish artifacts.

    Args:
        project_dir: the project folder (dvc.yaml, params.yaml).
        overrides: dotted params such as {"train.lr": 0.001}, written into params.yaml before the run.
        experiment: when given, the result is saved as a DVC experiment of that name.
    """
    project = str(Path(project_dir).resolve())
    if experiment:
        require_git_identity(project)
    # Validates the overrides (unknown key, wrong type) before anything runs or params.yaml changes.
    params = Params.load(Path(project) / DEFAULT_PARAMS_FILE, overrides)
    if overrides:
        set_params(project, overrides)
    stages = []
    for stage in STAGES:
        stages.append(_stage_task(stage, params.orchestrate)(stage, project))
        if stage == "audit":  # before training: the drift the audit found, shown and acted on
            drift_gate(params, project)
    decision = promotion_gate(params, project)
    if experiment:
        save_experiment(params, project, experiment)
    publish(params, project, stages, decision)
    return {"stages": stages, "champion": decision, "experiment": experiment}


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
    source = retrain.from_source(source=str(code_root), entrypoint="pipeline/flow.py:retrain")
    source.deploy(
        name=name, work_pool_name=work_pool, cron=cron, parameters=parameters, print_next_steps=False
    )
    return f"{FLOW_NAME}/{name}"


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
    lines += ["", f"**Champion gate**: {verdict} ({decision['reason']}; tolerance {decision['tolerance']})"]
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    """Top-level numbers of a metrics file are shown; text and nested groups (split's images) are not."""
    return isinstance(value, int | float) and not isinstance(value, bool)

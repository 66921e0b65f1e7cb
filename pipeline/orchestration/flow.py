"""The Prefect flow around the DVC pipeline: its tasks and their wiring (deployments: deploy.py; git: git.py).

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

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import DEFAULT_PARAMS_FILE, OrchestrateParams, Params, PathsParams
from pipeline.errors import PipelineError
from pipeline.io import read_optional_json
from pipeline.orchestration import artifacts, champion, dvc_api, git, params_file
from pipeline.orchestration.dvc_api import TransientDvcFailure
from pipeline.stages import contracts
from pipeline.stages.ingest import check_dvc_inputs

FLOW_NAME = "retrain"


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


@task(cache_policy=NO_CACHE)
def set_params(project_dir: str, overrides: dict[str, Any]) -> None:
    """Write dotted overrides into params.yaml, keeping its comments (what `dvc exp run -S` does)."""
    params_file.set_values(Path(project_dir) / DEFAULT_PARAMS_FILE, overrides)


@task(cache_policy=NO_CACHE)
def promotion_gate(
    paths: PathsParams, gate: OrchestrateParams, project_dir: str, replace_champion: bool
) -> dict[str, Any]:
    """The champion gate (its decision lands in `metrics/promote.json`: a saved experiment carries it); the
    audit's drift next to the share of the new test images each model marks unknown, as a Prefect
    artifact."""
    decision = champion.promote(paths, gate, project_dir, replace_champion)
    get_run_logger().info("champion gate: %s", decision)
    create_markdown_artifact(
        key="drift-and-unknown",
        markdown=champion.drift_table(decision["drift"]),
        description="Drift of the new images (audit) and the share of them each model marks unknown",
    )
    return decision


def drift_verdict(metrics: dict[str, Any] | None, on_drift: str, page: Path) -> str | None:
    """What `orchestrate.on_drift` makes of the audit's figures: a warning line, or None. Raises
    PipelineError for `stop` when the audit found the new data drifted from the champion's training set,
    pointing at the audit's `page`."""
    if not metrics or not metrics.get("drifted") or on_drift == "ignore":
        return None
    line = (
        f"the new images drifted from the champion's training set (old-vs-new AUC {metrics.get('drift_auc')},"
        f" class-prior shift {metrics.get('prior_shift')})"
    )
    if on_drift == "stop":
        raise PipelineError(f"{line}; look at {page}, or set orchestrate.on_drift: warn")
    return line


@task(cache_policy=NO_CACHE)
def drift_gate(paths: PathsParams, on_drift: str, project_dir: str) -> None:
    """The audit's drift figures as a Prefect artifact before training; warn or stop by `on_drift`
    (`orchestrate.on_drift`)."""
    metrics = read_optional_json(Path(project_dir) / paths.metrics("audit")) or {}
    figures = {key: metrics.get(key) for key in ("drifted", "drift_auc", "prior_shift", "label_issues")}
    rows = "\n".join(f"| {key} | {value} |" for key, value in figures.items())
    create_markdown_artifact(
        key="data-drift", markdown=f"| audit | value |\n| --- | --- |\n{rows}", description="Before training"
    )
    warning = drift_verdict(metrics, on_drift, paths.reports("audit") / contracts()["audit"].page)
    if warning:
        get_run_logger().warning("audit: %s", warning)


@task(cache_policy=NO_CACHE)
def save_experiment(paths: PathsParams, project_dir: str, name: str) -> str:
    """Record the workspace as DVC experiment `name`, metrics and training curves included."""
    project = Path(project_dir)
    # `cache: false` outputs live in git, not the DVC cache; on a clone they may not be committed yet.
    folders = [p for p in (paths.metrics_dir, paths.live_dir) if (project / p).exists()]
    untracked = [str(folder) for folder in folders]

    def save(repo) -> None:
        repo.experiments.save(name=name, force=True, include_untracked=untracked)

    get_run_logger().info("%s", dvc_api.call(project, "exp save", save)[1])
    return name


@task(cache_policy=NO_CACHE)
def publish(paths: PathsParams, project_dir: str, stages: list[dict], decision: dict) -> None:
    """Prefect artifacts: a markdown table of the run's metrics, and the path of the evaluation report."""
    project = Path(project_dir)
    create_markdown_artifact(
        key="retrain-metrics",
        markdown=artifacts.metrics_markdown(paths, project, stages, decision),
        description="Stages, their metrics and the champion decision of this run",
    )
    evaluate = contracts()["evaluate"]
    report = (project / paths.reports("evaluate") / evaluate.page).resolve()
    create_link_artifact(key="evaluation-report", link=report.as_uri(), link_text=str(report))


@task(cache_policy=NO_CACHE)
def pull(project_dir: str) -> dict[str, Any]:
    """Bring the workspace to what the default remote holds for this commit: data, outputs, run cache."""
    stats, output = dvc_api.call(Path(project_dir), "pull", dvc_api.pull)
    get_run_logger().info("pull: %s\n%s", stats, output)
    return stats


@task(cache_policy=NO_CACHE)
def push(
    paths: PathsParams, project_dir: str, decision: dict | None, commit: bool, experiment: str | None
) -> dict[str, Any]:
    """Push outputs and run cache to the default remote, and a saved `experiment` to the git remote of the
    branch (`dvc exp push`), so `dvc exp pull` brings it to any clone. With `commit` and a promoted model,
    the champion folder is tracked by DVC too, and dvc.lock, params, metrics and the champion's pointer are
    committed and pushed to the branch's upstream, so any clone of the branch can `dvc pull` the champion."""
    project, champion_dir = Path(project_dir), paths.champion_dir
    record = bool(commit and decision and decision["promoted"])
    remote = git.upstream_remote(project) if experiment else None

    def share(repo) -> int:
        if record:
            repo.add(str(project / champion_dir))
        files = dvc_api.push(repo)
        if remote:
            repo.experiments.push(remote, [experiment], push_cache=False)  # its outputs were pushed above
        return files

    files, output = dvc_api.call(project, "push", share)
    get_run_logger().info("push: %d files\n%s", files, output)
    if experiment and not remote:
        get_run_logger().warning("%s: no upstream branch; experiment %s stays here", project, experiment)
    revision = None
    if record:
        pointers = [DEFAULT_PARAMS_FILE, "dvc.lock", paths.metrics_dir, paths.live_dir,
                    Path(f"{champion_dir}.dvc")]  # fmt: skip
        message = f"retrain: promote the new model ({decision['reason']})"
        revision = git.commit_and_push(project, pointers, message, get_run_logger())
    return {"files": files, "commit": revision, "experiment_remote": remote}


@flow(name=FLOW_NAME)
def retrain(
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    experiment: str | None = None,
    commit: bool = False,
    until: str | None = None,
    replace_champion: bool = True,
) -> dict[str, Any]:
    """Run the stages in DAG order (on drift, `orchestrate.on_drift: stop` stops before training), gate
    promotion of the new model and publish artifacts.

    Args:
        project_dir: the project folder (dvc.yaml, params.yaml).
        overrides: dotted params such as {"train.lr": 0.001}, written into params.yaml before the run.
        experiment: when given, the result is saved as a DVC experiment of that name (and, with
            orchestrate.push, pushed to the branch's git remote).
        commit: when the model is promoted, commit its pointers and push the branch (needs orchestrate.push);
            what a deployment from git does, so that the next run and every clone find the champion.
        until: run the stages up to this one only, without the gate (a sweep's shared stages, run once
            and pushed so that every point restores them from the run cache).
        replace_champion: False: the gate judges the new model but leaves the champion (a sweep's points).
    """
    project = str(Path(project_dir).resolve())
    if experiment or commit:
        git.require_identity(project)
    # Validates the overrides (unknown key, wrong type) before anything runs or params.yaml changes.
    params = Params.load(Path(project) / DEFAULT_PARAMS_FILE, overrides)
    sharing = _sharing(params.orchestrate, project, commit)
    if sharing:
        pull(project)
    check_dvc_inputs(params.paths, Path(project))  # DVC's own message would be a bare [Errno 2]
    if overrides:
        set_params(project, overrides)
    stages = []
    for stage, contract in _stages(until).items():
        if "model" in contract.outs:  # before training: the drift the audit found, shown and acted on
            drift_gate(params.paths, params.orchestrate.on_drift, project)
        stages.append(_stage_task(stage, params.orchestrate)(stage, project, sharing))
    decision = None if until else promotion_gate(params.paths, params.orchestrate, project, replace_champion)
    if experiment:
        save_experiment(params.paths, project, experiment)
    pushed = push(params.paths, project, decision, commit, experiment) if sharing else None
    if decision:
        publish(params.paths, project, stages, decision)
    return {"stages": stages, "champion": decision, "experiment": experiment, "pushed": pushed}


def _stages(until: str | None) -> dict[str, Any]:
    """The stage contracts in DAG order, up to `until` (all when None)."""
    stages = contracts()
    if until is None:
        return stages
    if until not in stages:
        raise PipelineError(f"until: no stage {until!r}; the stages are {', '.join(stages)}")
    names = list(stages)
    return {name: stages[name] for name in names[: names.index(until) + 1]}


def _sharing(settings: OrchestrateParams, project: str, commit: bool) -> bool:
    """Whether the run pulls and pushes: orchestrate.push, checked against the DVC remote config up front."""
    if commit and not settings.push:
        raise PipelineError(
            "commit needs orchestrate.push: true (the commit points at data on the DVC remote)"
        )
    if settings.push:
        dvc_api.call(Path(project), "remote list", dvc_api.require_remote)
    return settings.push

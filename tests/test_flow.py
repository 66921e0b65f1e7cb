"""The Prefect flow against a real local Prefect server (prefect_test_harness), on copies of the session's
tiny `built_project` (the whole DAG already run once by DVC)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
import yaml
import zc.lockfile
from helpers import PROJECT_ROOT, copy_project, make_image, run_tool
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.errors import ParamsError
from pipeline.orchestration.dvc_api import DvcFailed
from pipeline.orchestration.flow import _command_seconds, retrain, set_params
from pipeline.stages import STAGES
from pipeline.stages.split import stable_position


@pytest.fixture(scope="module")
def prefect_api() -> str:
    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def first_run(prefect_api, built_project, tmp_path_factory):
    """One flow run with an override and an experiment name, on a project whose DAG has run before."""
    project = copy_project(built_project, tmp_path_factory.mktemp("flow") / "project")
    state = retrain(
        project_dir=str(project),
        overrides={"export.min_top1_agreement": 0.99},
        experiment="tighter-export",
        return_state=True,
    )
    return project, state


def _task_runs(flow_run_id: UUID, expected: int, timeout: float = 60.0) -> dict[str, object]:
    """{task name: task run} once `expected` task runs have a final state. Task runs reach the server as
    events, so they can lag behind the flow's return; the test fails if they have not arrived by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        final = [run for run in runs if run.state and run.state.is_final()]
        if len(final) >= expected:
            return {run.name.rsplit("-", 1)[0]: run for run in runs}
        if time.monotonic() > deadline:
            states = sorted(f"{run.name}: {run.state.type if run.state else None}" for run in runs)
            pytest.fail(f"{len(final)} of {expected} task runs final after {timeout} s: {states}")
        time.sleep(0.5)


def _statuses(result: dict) -> dict[str, str]:
    return {stage["stage"]: stage["status"] for stage in result["stages"]}


def test_flow_run_completes_every_task_and_reruns_only_what_changed(first_run):
    project, state = first_run
    assert state.is_completed(), state.message
    result = state.result()
    # export.* changed: DVC re-runs export only; every other stage is skipped, not recomputed.
    assert _statuses(result) == {stage: "ran" if stage == "export" else "unchanged" for stage in STAGES}
    # The stage command's own time, read from its `done in` line, is inside the task's; none when skipped.
    export = next(stage for stage in result["stages"] if stage["stage"] == "export")
    assert 0 < export["command_seconds"] <= export["seconds"]
    assert {stage["command_seconds"] for stage in result["stages"] if stage["stage"] != "export"} == {None}

    runs = _task_runs(state.state_details.flow_run_id, expected=len(STAGES) + 5)
    assert set(runs) == {*STAGES, "drift_gate", "set_params", "promotion_gate", "save_experiment", "publish"}
    assert {name: run.state.type for name, run in runs.items()} == dict.fromkeys(runs, StateType.COMPLETED)

    assert yaml.safe_load((project / "params.yaml").read_text())["export"]["min_top1_agreement"] == 0.99
    decision = result["champion"]
    assert decision["promoted"] and decision["reason"] == "no champion yet"
    assert (project / "models" / "champion" / "metrics.json").is_file()
    assert (project / "models" / "champion" / "splits.csv").is_file()  # what the audit compares new data with


def test_flow_publishes_metrics_table_and_report_path(first_run):
    project, state = first_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    table = by_key["retrain-metrics"].data
    assert "| export | ran |" in table and "| ingest | unchanged |" in table
    assert "accuracy" in table and "promoted (no champion yet" in table
    assert "| drifted | None |" in by_key["data-drift"].data  # shown before training; no champion before
    # after the gate: the audit's drift next to the share of the new test images each model marks unknown
    drift = by_key["drift-and-unknown"].data
    assert "| None | None | None | n/a | champion model | n/a | n/a |" in drift  # no champion: none is new
    assert "| new model | n/a | " in drift and "marked unknown by" in drift
    report = project / "reports" / "evaluate" / "report.html"
    assert report.is_file()
    assert by_key["evaluation-report"].data.endswith(f"({report.resolve().as_uri()})")


def test_flow_saves_a_dvc_experiment_with_params_and_metrics(first_run):
    project, _ = first_run
    shown = json.loads(run_tool(project, "dvc", "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    revs = {rev["name"]: rev["data"] for exp in experiments for rev in exp["revs"]}
    saved = revs["tighter-export"]
    assert saved["params"]["params.yaml"]["data"]["export"]["min_top1_agreement"] == 0.99
    assert "accuracy" in saved["metrics"]["metrics/evaluate.json"]["data"]


def test_second_run_with_unchanged_inputs_skips_every_stage(first_run):
    project, _ = first_run
    result = retrain(project_dir=str(project))
    assert _statuses(result) == dict.fromkeys(STAGES, "unchanged")
    assert not result["champion"]["promoted"] and result["champion"]["reason"] == "already champion"


class _ReleaseOnRetry(logging.Handler):
    """Releases a held DVC repo lock as soon as Prefect announces the first retry."""

    def __init__(self, lock: zc.lockfile.LockFile):
        super().__init__()
        self.held: zc.lockfile.LockFile | None = lock

    def emit(self, record: logging.LogRecord) -> None:
        if self.held and "Retry 1/" in record.getMessage():
            self.held.close()
            self.held = None


def test_stage_failing_on_a_held_dvc_lock_is_retried_and_succeeds(prefect_api, built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    (project / ".dvc" / "tmp").mkdir(exist_ok=True)
    # Another process holds the repo lock: `dvc repro` gives up after ~3 s, a transient failure.
    releaser = _ReleaseOnRetry(zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock")))
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(releaser)
    try:
        state = retrain(project_dir=str(project), return_state=True)
    finally:
        logger.removeHandler(releaser)
        if releaser.held:
            releaser.held.close()
    assert releaser.held is None, "the first attempt did not fail on the lock"
    assert state.is_completed(), state.message
    runs = _task_runs(state.state_details.flow_run_id, expected=len(STAGES) + 2)
    assert runs["ingest"].run_count == 2
    assert {stage: runs[stage].run_count for stage in STAGES[1:]} == dict.fromkeys(STAGES[1:], 1)
    assert all(run.state.type == StateType.COMPLETED for run in runs.values())


def test_bad_input_fails_at_once_without_retries(prefect_api, built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    state = retrain(project_dir=str(project), overrides={"ingest.source": "csv"}, return_state=True)
    assert state.is_failed()
    with pytest.raises(DvcFailed, match="paths.csv_manifest is not set"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id, expected=2)
    assert runs["ingest"].state.type == StateType.FAILED and runs["ingest"].run_count == 1
    assert "validate" not in runs


def test_unknown_override_fails_before_params_yaml_changes(prefect_api, built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    before = (project / "params.yaml").read_text()
    with pytest.raises(ParamsError, match=r"train\.lrr: unknown key"):
        retrain(project_dir=str(project), overrides={"train.lrr": 0.1})
    assert (project / "params.yaml").read_text() == before


def test_deployment_is_scheduled_and_a_worker_runs_it(prefect_api, built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    pool, cron = "pipeline-test-pool", "0 3 * * *"
    created = CliRunner().invoke(
        app, ["deploy", "--cron", cron, "--name", "nightly-test", "--pool", pool, "--project", str(project)]
    )
    assert created.exit_code == 0, created.output
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/nightly-test")
    assert [schedule.schedule.cron for schedule in deployment.schedules] == [cron]
    assert deployment.parameters == {"project_dir": str(project)}

    flow_run = run_deployment("retrain/nightly-test", timeout=0)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.state.type == StateType.COMPLETED, worker.stdout[-3000:] + worker.stderr[-3000:]
    runs = _task_runs(flow_run.id, expected=len(STAGES) + 2)
    assert set(STAGES) <= set(runs)


def test_set_params_keeps_comments_and_nulls(tmp_path):
    shutil.copy2(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params.fn(str(tmp_path), {"train.lr": 0.003, "train.augment.hflip": 0.25})
    original = (PROJECT_ROOT / "params.yaml").read_text().splitlines()
    written = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(original, written, strict=True) if old != new]
    assert [new.split("#")[0].strip() for _, new in changed] == ["lr: 0.003", "hflip: 0.25"]


def test_cli_flow_rejects_a_malformed_override():
    result = CliRunner().invoke(app, ["flow", "--set", "train.lr"])
    assert result.exit_code == 1
    assert "expected key=value" in result.output


def _natural_split(sha256: str, params: dict) -> str:
    """The split a stable split gives a file from its hash alone (classes too small for that get fillers)."""
    position, split = stable_position(sha256, params["base"]["seed"]), params["split"]
    return (
        "test" if position < split["test"] else "val" if position < split["test"] + split["val"] else "train"
    )


@pytest.mark.slow
def test_retraining_on_grown_data_gates_both_models_on_the_same_test_images(
    prefect_api, built_project, tmp_path
):
    project = copy_project(built_project, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert retrain(project_dir=str(project))["champion"]["promoted"]
    splits_csv = project / params["paths"]["splits"]
    before = pd.read_csv(splits_csv, dtype=str, keep_default_na=False).set_index("path")
    data_root = project / params["paths"]["data_root"]
    for k in range(3):  # 16 -> 18 images per class: 12.5% more
        for i in range(2):
            make_image(data_root / f"class_{k}" / f"new_{i}.png", k, seed=9000 + 10 * k + i)

    state = retrain(project_dir=str(project), return_state=True)

    assert state.is_completed(), state.message
    result, gate = state.result(), state.result()["champion"]
    assert _statuses(result)["train"] == "ran"
    after = pd.read_csv(splits_csv, dtype=str, keep_default_na=False).set_index("path")
    by_hash = [
        path for path, row in before.iterrows() if row["split"] == _natural_split(row["sha256"], params)
    ]
    assert after.loc[by_hash, "split"].equals(before.loc[by_hash, "split"])  # stable: nothing moved
    test = after[after["split"] == "test"]
    assert gate["images"] == len(test) and gate["champion"] is not None and gate["p_value"] is not None
    assert gate["test_sha256"] == hashlib.sha256("\n".join(sorted(test["sha256"])).encode()).hexdigest()
    scored = pd.read_csv(
        project / "reports" / "promote" / "predictions.csv", dtype=str, keep_default_na=False
    )
    assert list(scored["path"]) == sorted(test.index) and (scored["champion"] != "").all()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    table = {artifact.key: artifact.data for artifact in artifacts}["retrain-metrics"]
    assert f"On the same {gate['images']} test images" in table and "McNemar p" in table
    record = json.loads((project / "models" / "champion" / "metrics.json").read_text())
    assert record["gate"] == gate if gate["promoted"] else record["gate"]["champion"] is None


def test_drift_verdict_ignores_warns_or_stops_as_on_drift_says():
    from pipeline.errors import PipelineError
    from pipeline.orchestration.flow import drift_verdict

    drifted = {"drifted": True, "drift_auc": 0.93, "prior_shift": 0.02}
    page = Path("reports/audit/index.html")
    assert drift_verdict(drifted, "ignore", page) is None
    assert "AUC 0.93" in drift_verdict(drifted, "warn", page)
    with pytest.raises(PipelineError, match="look at reports/audit/index.html, or set orchestrate.on_drift"):
        drift_verdict(drifted, "stop", page)
    assert drift_verdict({**drifted, "drifted": False}, "stop", page) is None
    assert drift_verdict(None, "stop", page) is None  # no audit metrics: nothing to act on


def test_command_seconds_is_the_stage_commands_last_done_line():
    torchrun = "train: done in 4.10 s {}\nINFO other\ntrain: done in 4.20 s {}\ntrain: done in 5.75 s {}\n"
    assert _command_seconds("train", torchrun) == 5.75  # the launcher, which waits for its ranks
    assert _command_seconds("train", "pretrain: done in 1.00 s {}") is None
    assert _command_seconds("export", "nothing ran") is None

"""Sweeps across Prefect workers, as a team runs them: a Prefect server backed by PostgreSQL, a bare git
repository, the images on a local DVC remote and everything else on an S3 one (moto on 127.0.0.1), two
workers started at once in two empty folders; `python -m pipeline sweep` from one clone, `--collect` from a
third. The grid's pure parts (points, shared stages) are tested without any of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import (
    PROJECT_ROOT,
    commit,
    copy_project,
    free_port,
    make_image,
    run_tool,
    start_tool,
    stop_tool,
)
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from pipeline.__main__ import _overrides, app
from pipeline.errors import PipelineError
from pipeline.orchestration import sweep


def test_a_grid_is_the_product_of_the_swept_keys_with_values_read_as_yaml():
    points = sweep.grid(["train.lr=1e-4,3e-4", "train.augment.scale=[0.5, 1.0],[0.8,1.0]"], _overrides)

    assert points == [
        {"train.lr": 1e-4, "train.augment.scale": [0.5, 1.0]},
        {"train.lr": 1e-4, "train.augment.scale": [0.8, 1.0]},
        {"train.lr": 3e-4, "train.augment.scale": [0.5, 1.0]},
        {"train.lr": 3e-4, "train.augment.scale": [0.8, 1.0]},
    ]
    assert sweep.grid(["model.backbone='a,b'"], _overrides) == [{"model.backbone": "a,b"}]
    with pytest.raises(PipelineError, match="expected key=value"):
        sweep.grid(["train.lr"], _overrides)


def test_the_stages_before_the_first_that_reads_a_swept_key_are_shared():
    assert sweep.shared_until(["train.lr"]) == "split"
    assert sweep.shared_until(["train.lr", "evaluate.tta"]) == "split"
    assert sweep.shared_until(["model.backbone"]) == "validate"  # the audit embeds images with the model
    assert sweep.shared_until(["split.val_fraction"]) == "audit"
    assert sweep.shared_until(["ingest.num_workers"]) is None
    assert sweep.shared_until(["orchestrate.promote_margin"]) == "export"  # no stage reads it


def test_a_point_whose_params_are_invalid_stops_the_sweep_before_anything_runs():
    with pytest.raises(PipelineError, match=r"sweep point train.lr=-1: .*train.lr"):
        sweep.check_points(PROJECT_ROOT, [{"train.lr": 0.001}, {"train.lr": -1}])
    with pytest.raises(PipelineError, match=r"train.lr=1e\+30: .*JSONB.*below 9.2e18"):
        sweep.check_points(PROJECT_ROOT, [{"train.lr": 1e30}])


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of Debian's packages on 127.0.0.1, run by user postgres when the tests run as
    root (it refuses root), in a folder outside pytest's private temp folder so that user can reach it."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not binaries:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (./run.sh test does it as root)")
    pg = binaries[-1]
    folder = Path(tempfile.mkdtemp(prefix="pipeline-tests-postgres-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"
    run = [*as_user, str(pg / "pg_ctl"), "-D", str(data)]
    initdb = [*as_user, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]
    subprocess.run(initdb, check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run, "-o", options, "-l", str(folder / "log"), "-w", "start"], check=True, capture_output=True
    )
    try:
        subprocess.run([*as_user, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "prefect"], check=True, capture_output=True)  # fmt: skip
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*run, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server(postgres_url, tmp_path_factory):
    """`prefect server start` on PostgreSQL; yields its API URL, set for this process's Prefect client too."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start_tool(
        home, command, home / "server.log", PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=postgres_url, PREFECT_API_URL=api,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{api}/health"):
            assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[
                -3000:
            ]
            time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: api}):
            yield api
    finally:
        stop_tool(server)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _origin(built_project: Path, root: Path, s3: str) -> Path:
    """The team's servers: a bare repository holding the project, its images (three added since the last
    run, so ingest to split must run again) on a local DVC remote, the rest going to the S3 one."""
    project = copy_project(built_project, root / "setup")
    for k in range(3):
        make_image(project / "data/sample" / f"class_{k}" / "added.png", k, seed=777 + k)
    run_tool(project, "git", "rm", "-r", "-q", "--cached", "data/sample")
    run_tool(project, "dvc", "remote", "add", "-d", "shared", "s3://team-bucket/sweep")
    run_tool(project, "dvc", "remote", "modify", "shared", "endpointurl", s3)
    run_tool(project, "dvc", "remote", "add", "images", str(root / "images-remote"))
    run_tool(project, "dvc", "add", "-q", "data/sample")
    pointer = yaml.safe_load((project / "data/sample.dvc").read_text())
    pointer["outs"][0]["remote"] = "images"  # the images live on the local remote
    (project / "data/sample.dvc").write_text(yaml.safe_dump(pointer, sort_keys=False))
    run_tool(project, "dvc", "push", "-q", "data/sample.dvc")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["quantize"]["enabled"] = False  # INT8 is not what a sweep is about: 10 s less per run
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(project, "team set-up")
    bare = root / "origin.git"
    run_tool(root, "git", "init", "-q", "--bare", str(bare))
    run_tool(project, "git", "push", "-q", str(bare), "HEAD:refs/heads/main")
    run_tool(bare, "git", "symbolic-ref", "HEAD", "refs/heads/main")
    return bare


@pytest.mark.slow
def test_a_sweep_runs_across_two_workers_into_one_exp_show_and_promotes_one_model(
    team_server, s3_endpoint, built_project, tmp_path
):
    bare = _origin(built_project, tmp_path, s3_endpoint)
    laptop, third = tmp_path / "laptop", tmp_path / "third"
    run_tool(tmp_path, "git", "clone", "-q", str(bare), str(laptop))
    pool = "sweep-pool"
    workers, logs = [], []
    for name in ("worker-a", "worker-b"):  # each in an empty folder, one run at a time (Prefect's --limit)
        folder = tmp_path / name
        folder.mkdir()
        logs.append(tmp_path / f"{name}.log")
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                   "--limit", "1", "--name", name]  # fmt: skip
        workers.append(start_tool(folder, command, logs[-1], PREFECT_API_URL=team_server,
                                  PREFECT_WORKER_QUERY_SECONDS="1"))  # fmt: skip
    try:
        swept = CliRunner().invoke(app, [
            "sweep", "-S", "train.lr=0.001,0.003,0.01,1e18", "--name", "lrs", "--pool", pool,
            "--install", "python -m pipeline --help", "--limit", "2", "--project", str(laptop),
        ])  # fmt: skip
    finally:
        for worker in workers:
            stop_tool(worker)
    worker_logs = [log.read_text() for log in logs]
    shown = swept.output + "".join(text[-3000:] for text in worker_logs)

    # The bad point failed alone, with its own line, and the sweep's exit code says so.
    assert swept.exit_code == 1, shown
    assert "lrs-4 failed: train.lr=1e+18: train: the weights became NaN or infinite" in swept.output, shown
    assert "3 of 4 points finished" in swept.output, shown
    with get_client(sync_client=True) as client:  # Prefect's own limit on runs at once, set by --limit
        assert client.read_work_pool(pool).concurrency_limit == 2
    states = {name: run.state.type.value for name, run in _flow_runs("lrs").items()}
    promoted = next(name for name in states if name.endswith("-promote"))
    assert states == {"lrs-shared": "COMPLETED", "lrs-1": "COMPLETED", "lrs-2": "COMPLETED",
                      "lrs-3": "COMPLETED", "lrs-4": "FAILED", promoted: "COMPLETED"}, shown  # fmt: skip

    # Both workers ran points; one run at a time each, so a worker's log is its runs one after the other.
    runs = [_runs_in(text) for text in worker_logs]
    points = {f"lrs-{k}" for k in range(1, 5)}
    assert all(set(ran) & points for ran in runs), [list(ran) for ran in runs]
    by_run = {name: text for ran in runs for name, text in ran.items()}
    assert set(by_run) == set(states), list(by_run)
    # The run cache: the stages no point changes ran once, before the points, which restored them; the
    # promotion run recomputed nothing at all.
    shared = ("ingest", "validate", "audit", "split")
    assert all(f"Running stage '{stage}'" in by_run["lrs-shared"] for stage in shared), by_run["lrs-shared"]
    for name in ("lrs-1", "lrs-2", "lrs-3"):
        assert not any(f"Running stage '{stage}'" in by_run[name] for stage in shared), by_run[name][-3000:]
        assert f"Stage '{shared[0]}' is cached" in by_run[name] and "Running stage 'train'" in by_run[name]
    assert "Running stage" not in by_run[promoted], by_run[promoted][-3000:]

    # A third clone pulls the sweep: its three experiments side by side, with their params and metrics.
    run_tool(tmp_path, "git", "clone", "-q", str(bare), str(third))
    collected = CliRunner().invoke(app, ["sweep", "--collect", "lrs", "--project", str(third)])
    assert collected.exit_code == 0, collected.output
    shown_exps = _experiments(json.loads(run_tool(third, "dvc", "exp", "show", "-A", "--json")))
    assert sorted(shown_exps) == ["lrs-1", "lrs-2", "lrs-3"], collected.output
    for name, lr in {"lrs-1": 0.001, "lrs-2": 0.003, "lrs-3": 0.01}.items():
        data = shown_exps[name]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        assert 0.0 <= data["metrics"]["metrics/evaluate.json"]["data"]["accuracy"] <= 1.0

    # At most one promotion: the best point the gate passed (its gate records say which), committed once.
    gates = {
        name: json.loads(run_tool(third, "git", "show", f"{_exp_commit(third, name)}:metrics/promote.json"))
        for name in shown_exps
    }
    best = max(sorted(gates), key=lambda name: gates[name]["new"])  # first of the best on ties, as the sweep
    assert promoted == f"{best}-promote" and f"sweep lrs: {best} promoted" in swept.output, (gates, shown)
    history = run_tool(third, "git", "log", "--format=%s", "main")
    assert history.count("retrain: promote") == 1, history
    params = yaml.safe_load((third / "params.yaml").read_text())
    assert params["train"]["lr"] == shown_exps[best]["params"]["params.yaml"]["data"]["train"]["lr"]
    run_tool(third, "dvc", "pull", "-q")  # the champion, and every output of the promoted point's dvc.lock
    champion = json.loads((third / "models/champion/metrics.json").read_text())
    assert champion["gate"]["new"] == gates[best]["new"]
    assert "Data and pipelines are up to date" in run_tool(third, "dvc", "status")
    left = [path for name in ("worker-a", "worker-b") for path in (tmp_path / name).iterdir()]
    assert not left, "the runs left files in the workers' folders"


def _flow_runs(tag: str) -> dict:
    """The flow runs with `tag`, by name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    return {run.name: run for run in runs}


def _runs_in(worker_log: str) -> dict[str, str]:
    """A worker's log split by the runs it submitted: {flow run name: its part of the log}."""
    parts = re.split(r"Flow run '([\w-]+)' submitted to infrastructure", worker_log)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _experiments(rows: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json`: each named experiment's data (params, metrics)."""
    return {
        rev["name"]: rev["data"]
        for row in rows
        for experiment in row.get("experiments") or []
        for rev in experiment["revs"]
        if rev.get("name")
    }


def _exp_commit(project: Path, name: str) -> str:
    """The commit of experiment `name` (its ref is refs/exps/<baseline>/<name>)."""
    refs = [line.split() for line in run_tool(project, "git", "show-ref").splitlines()]
    return next(sha for sha, ref in refs if ref.startswith("refs/exps/") and ref.endswith(f"/{name}"))

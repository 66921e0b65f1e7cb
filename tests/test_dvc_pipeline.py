"""The real DAG under DVC on tiny data: which stages re-run after which change, and experiments.

Each test works on a copy of the session's `built_project` (this project's dvc.yaml, params and code in a
temp git+DVC repo, run once). Re-runs are checked by running up to `split` (cheap) and asking `dvc status`
which later stages are now stale; the experiments test runs train onward for real.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import (
    PROJECT_ROOT,
    assert_headline_metrics,
    commit,
    copy_project,
    make_image,
    make_image_folder,
    metric_columns,
    run_tool,
    skip_local_state,
    tiny_dvc_project,
    tool_environ,
)

from pipeline.stages import STAGES as CODE_STAGES

STAGES = list(yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"])
AFTER_SPLIT = set(STAGES[STAGES.index("split") + 1 :])
CLASSES = ["class_0", "class_1", "class_2"]  # the built project's
EXPERIMENTS = {
    "fast-full": {"train.lr": 0.01, "train.strategy": "full"},
    "slow-probe": {"train.lr": 0.0005, "train.strategy": "linear_probe"},
}
HEADLINE_STAGES = ("ingest", "validate", "split", "train", "evaluate")  # quantize, export: not this test's
ROW_COLUMNS = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}  # not figures
# The README's view of the experiments for a terminal: the params its example changes, headline figures.
NARROW_COLUMNS = (
    "Experiment",
    "train.strategy",
    "train.lr",
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "ece_after",
    "best_epoch",
    "train_seconds",
)
NARROW_VIEW = "--drop '.*' --keep '(" + "|".join(map(re.escape, NARROW_COLUMNS)) + ")$'"


@pytest.fixture
def project(built_project: Path, tmp_path: Path) -> Path:
    return copy_project(built_project, tmp_path / "project")


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def _stale(project: Path) -> set[str]:
    return set(json.loads(run_tool(project, "dvc", "status", "--json")))


def _set_params(project: Path, **sections: dict) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _experiments(project: Path) -> dict[str, dict]:
    """{experiment name: its params and metrics} from `dvc exp show --json`."""
    shown = json.loads(run_tool(project, "dvc", "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    return {rev["name"]: rev["data"] for exp in experiments for rev in exp["revs"]}


def _sample(project: Path) -> Path:
    return project / yaml.safe_load((project / "params.yaml").read_text())["paths"]["data_root"]


def test_dag_order_is_the_eight_stages():
    assert STAGES == list(CODE_STAGES)


def test_second_repro_runs_nothing(project):
    output = run_tool(project, "dvc", "repro")
    assert _ran(output) == []
    assert all(f"Stage '{stage}' didn't change, skipping" in output for stage in STAGES), output
    assert _stale(project) == set()


def test_touching_an_image_without_changing_it_runs_nothing(project):
    image = next(_sample(project).rglob("*.png"))
    image.touch()  # DVC hashes content, not timestamps
    assert _ran(run_tool(project, "dvc", "repro", "split")) == []
    assert _stale(project) == set()


@pytest.mark.parametrize("change", ["edit", "add"])
def test_changed_or_added_image_reruns_ingest_onward(project, change):
    sample = _sample(project)
    if change == "edit":
        make_image(sample / "class_0" / "img_000.png", 0, seed=999)
    else:
        make_image(sample / "class_1" / "img_new.png", 1, seed=998)
    assert _ran(run_tool(project, "dvc", "repro", "split")) == ["ingest", "validate", "audit", "split"]
    assert _stale(project) == AFTER_SPLIT


def test_audit_params_rerun_the_audit_alone_when_its_table_stays_the_same(project):
    _set_params(project, audit={"shown": 5})  # the page changes, the per-image table does not
    assert _ran(run_tool(project, "dvc", "repro", "split")) == ["audit"]
    assert _stale(project) == set()
    _set_params(project, audit={"label_issues": "off"})  # the table changes: split and onward
    assert _ran(run_tool(project, "dvc", "repro", "split")) == ["audit", "split"]


def test_split_params_rerun_split_onward_not_ingest(project):
    _set_params(project, split={"train": 0.6, "val": 0.2, "test": 0.2})
    assert _ran(run_tool(project, "dvc", "repro", "split")) == ["split"]
    assert _stale(project) == AFTER_SPLIT


def test_a_csv_manifest_outside_data_root_is_a_dependency_of_ingest(project):
    sample = _sample(project)
    images = sorted(path.relative_to(sample).as_posix() for path in sample.rglob("*.png"))
    listing = project / "lists" / "labels.csv"  # relative to the project folder; its paths to data_root
    listing.parent.mkdir()
    listing.write_text("path,label\n" + "".join(f"{path},{path.split('/')[0]}\n" for path in images))
    _set_params(project, paths={"csv_manifest": "lists/labels.csv"})
    assert _ran(run_tool(project, "dvc", "repro", "ingest")) == ["ingest"]
    assert json.loads((project / "reports" / "ingest" / "details.json").read_text())["source"] == "csv"
    assert "ingest" not in _stale(project)

    listing.write_text(listing.read_text().replace(f"{images[0]},", f"{images[0]},relabelled_"))
    status = json.loads(run_tool(project, "dvc", "status", "--json"))
    assert {"changed deps": {"lists/labels.csv": "modified"}} in status["ingest"], status


def _ingest_project(root: Path) -> Path:
    """This project's dvc.yaml, params and code in a fresh git+DVC repo over 2 classes x 2 images in
    `images/`: enough for `dvc repro ingest` and the preflight, without the built project's whole run."""
    shutil.copytree(PROJECT_ROOT / "pipeline", root / "pipeline", ignore=skip_local_state)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["paths"]["data_root"] = "images"
    raw["ingest"]["num_workers"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    make_image_folder(root / "images", classes=2, per_class=2)
    run_tool(root, "git", "init", "-q")
    run_tool(root, "dvc", "init", "-q")
    return root


def _run_sh_pipeline(project: Path, *targets: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The commands of `./run.sh pipeline [targets]` (its `pipeline)` branch, read from run.sh), run as run.sh
    runs them: bash with -euo pipefail, this environment's python and dvc first on PATH. Past `timeout`
    seconds, every process it started is killed (DVC waiting on a FIFO ignores SIGTERM) and TimeoutExpired
    raised."""
    branch = re.search(r"\n\s*pipeline\)\n(.*?);;", (PROJECT_ROOT / "run.sh").read_text(), re.S)
    assert branch and "dvc repro" in branch.group(1)
    env = tool_environ()
    command = ["bash", "-euo", "pipefail", "-c", branch.group(1), "run.sh", "pipeline", *targets]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, cwd=project, env=env, start_new_session=True, **pipes) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow  # about 10 s each: git, DVC and ingest in a fresh project
@pytest.mark.parametrize("blocker", ["dangling link", "name not UTF-8", "FIFO"])
def test_a_data_folder_dvc_cannot_hash_stops_run_sh_in_one_line_whose_fix_works(tmp_path, blocker):
    project = _ingest_project(tmp_path / "project")
    images = project / "images"
    if blocker == "FIFO":  # `dvc repro` waits forever to read it: run.sh passed the check, then hung
        os.mkfifo(images / "class_0" / "p.png")
        expected = (
            "check: paths.data_root: 1 FIFO(s), socket(s) or device(s) under images, which DVC cannot hash "
            "(reading a FIFO or a device never ends): 'class_0/p.png' (FIFO); remove it or move it out of "
            "paths.data_root"
        )
    elif blocker == "dangling link":
        os.symlink("gone.png", images / "class_0" / "broken.png")
        expected = (
            "check: paths.data_root: 1 dangling symbolic link(s) under images, which DVC cannot hash: "
            "'class_0/broken.png'; delete them (find images -xtype l -delete) or replace each with a copy of "
            "its target"
        )
    else:
        shutil.copy2(images / "class_0" / "img_000.png", os.path.join(os.fsencode(images), b"caf\xe9.png"))
        expected = (
            "check: paths.data_root: 1 name(s) under images are not valid UTF-8, which DVC cannot hash: "
            "'caf\\xe9.png'; rename them to UTF-8 (e.g. convmv -r -f latin1 -t utf-8 --notest images) or "
            "remove them"
        )
    if blocker != "FIFO":
        bare = subprocess.run(  # what the user met before the preflight knew: DVC fails before ingest runs
            [sys.executable, "-m", "dvc", "repro", "ingest"], cwd=project, capture_output=True, text=True
        )
        assert bare.returncode != 0 and "ERROR: failed to reproduce 'ingest'" in bare.stderr

    run = _run_sh_pipeline(project, timeout=180)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip() == expected  # one line: no DVC message, no traceback

    if blocker == "FIFO":
        (images / "class_0" / "p.png").unlink()
    elif blocker == "dangling link":
        fix = re.search(r"\((find .*? -delete)\)", run.stderr).group(1)
        subprocess.run(fix, shell=True, cwd=project, check=True)
    else:
        os.rename(os.path.join(os.fsencode(images), b"caf\xe9.png"), images / "class_0" / "café.png")
    assert "source: folder" in run_tool(project, sys.executable, "-m", "pipeline", "check")
    assert _ran(run_tool(project, "dvc", "repro", "ingest")) == ["ingest"]


@pytest.mark.slow  # two `dvc repro` runs of a fresh project
def test_run_sh_pipeline_says_where_outputs_go_when_no_dvc_remote_is_set(tmp_path):
    project = _ingest_project(tmp_path / "project")
    note = "no DVC remote is set, so outputs stay on this machine"
    alone = _run_sh_pipeline(project, "ingest")
    assert alone.returncode == 0, alone.stderr
    assert "Use `dvc push`" in alone.stdout and note in alone.stdout  # DVC's hint, and what it assumes
    run_tool(project, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    (project / "images" / "class_0" / "img_000.png").unlink()  # something to reproduce again
    shared = _run_sh_pipeline(project, "ingest")
    assert shared.returncode == 0 and "Use `dvc push`" in shared.stdout and note not in shared.stdout


@pytest.fixture(scope="module")
def experimented(
    built_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str]]:
    """A copy of the built project after `dvc exp run` of each of EXPERIMENTS; the runs' output by name."""
    project = copy_project(built_project, tmp_path_factory.mktemp("experiments") / "project")
    outputs = {}
    for name, overrides in EXPERIMENTS.items():
        sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
        outputs[name] = run_tool(project, "dvc", "exp", "run", "--name", name, *sets)
    return project, outputs


@pytest.mark.slow
def test_two_experiments_rerun_train_onward_and_compare_in_exp_show(experimented):
    project, outputs = experimented
    for output in outputs.values():
        assert _ran(output) == ["train", "evaluate", "quantize", "export"], output  # train.* -> train onward

    found = _experiments(project)
    assert set(EXPERIMENTS) <= set(found)
    for name, overrides in EXPERIMENTS.items():
        train = found[name]["params"]["params.yaml"]["data"]["train"]
        assert {key: train[key.removeprefix("train.")] for key in overrides} == overrides
        metrics = found[name]["metrics"]
        for stage in ("validate", "split", "train", "evaluate", "quantize", "export"):
            assert "data" in metrics[f"metrics/{stage}.json"], f"{name}: no {stage} metrics: {metrics}"
    train_metrics = [found[name]["metrics"]["metrics/train.json"]["data"] for name in EXPERIMENTS]
    assert train_metrics[0] != train_metrics[1]

    plots = json.loads(run_tool(project, "dvc", "plots", "diff", *EXPERIMENTS, "--json"))["data"]
    curves = [key for key in plots if key.startswith("dvclive/plots/metrics/")]
    assert curves, f"no training curves in {sorted(plots)}"
    revisions = {rev for key in curves for plot in plots[key] for rev in plot.get("revisions", [])}
    assert set(EXPERIMENTS) <= revisions


@pytest.mark.slow
def test_exp_show_has_few_columns_none_per_class_and_a_complete_baseline(experimented):
    project, _ = experimented
    changed = _exp_show_csv(project, "--only-changed")
    columns = [column for column in changed[0] if column not in ROW_COLUMNS]
    # Two train experiments: 2 params, train's and evaluate's figures, quantize's and export's, and the
    # hashes of the dependencies that changed. Per-class metrics would add about 4 columns per class.
    assert len(columns) <= 40, columns

    table = _exp_show_csv(project)
    baseline = [row["rev"] for row in table if row["typ"] == "baseline"]
    assert len(baseline) == 2 and baseline[0] == "workspace", (
        baseline
    )  # and the commit experiments start from
    for row in table:
        broken = sorted(column for column, value in row.items() if value == "!")
        assert not broken, f"{row['Experiment'] or row['rev']}: no value (metrics file missing) in {broken}"

    for name, data in {"baseline": _baseline(project), **_experiments(project)}.items():
        figures = {stage: data["metrics"][f"metrics/{stage}.json"]["data"] for stage in HEADLINE_STAGES}
        for metrics in figures.values():
            assert_headline_metrics(metrics, CLASSES)
        # 30 before evaluate's four trust figures (coverage, set size, singletons, unknown rate: issue 28)
        assert sum(len(metric_columns(metrics)) for metrics in figures.values()) <= 34, (name, figures)


@pytest.mark.slow
def test_the_narrow_view_in_the_docs_fits_160_columns(experimented, monkeypatch):
    project, _ = experimented
    assert f"dvc exp show {NARROW_VIEW}" in (PROJECT_ROOT / "docs" / "experiments.md").read_text()
    monkeypatch.setenv("COLUMNS", "160")
    lines = run_tool(project, "dvc", "exp", "show", "--no-pager", *shlex.split(NARROW_VIEW)).splitlines()
    header = next(line for line in lines if "Experiment" in line)
    assert sorted(header.split()) == sorted(NARROW_COLUMNS), lines  # every kept column shown, none collapsed
    assert max(map(len, lines)) <= 160 and "…" not in "\n".join(lines), "\n".join(lines)
    assert all(any(name in line for line in lines) for name in EXPERIMENTS), lines


def _exp_show_csv(project: Path, *options: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(run_tool(project, "dvc", "exp", "show", "--csv", *options))))


def _baseline(project: Path) -> dict:
    """The params and metrics of the committed baseline (the revision the experiments started from)."""
    shown = json.loads(run_tool(project, "dvc", "exp", "show", "--json"))
    return next(commit["data"] for commit in shown if commit["rev"] != "workspace")


@pytest.mark.slow  # a whole `dvc repro` of a fresh project: about 30 s
def test_a_folder_set_of_label_sets_runs_dvc_repro_through_export_and_predict_answers_with_sets(tmp_path):
    # The same file under two class folders is one image with both labels (base.task: multilabel).
    project = tiny_dvc_project(tmp_path / "project", base={"task": "multilabel"})
    sample = _sample(project)
    merged = sorted((sample / "class_0").iterdir())[:8]
    for file in merged:
        shutil.copy2(file, sample / "class_1" / f"also_{file.name}")
    commit(project, "half of class_0 also shows class_1")

    ran = _ran(run_tool(project, "dvc", "repro"))

    assert ran == STAGES
    splits = pd.read_csv(project / "data/processed/splits.csv", dtype=str, keep_default_na=False)
    both = splits[splits["label"] == "class_0;class_1"]
    assert sorted(both["path"]) == sorted(f"class_0/{file.name}" for file in merged)
    quarantine = pd.read_csv(project / "data/interim/quarantine.csv", dtype=str, keep_default_na=False)
    assert (quarantine["reason"] == "merged_copy").sum() == len(merged)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["map_macro"] <= 1 and "f1_macro_at_0_5" in metrics
    files = [str(sample / path) for path in both["path"][:3]]
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "predict",
        *files,
        "--model",
        "models/export",
        "--format",
        "json",
    ]
    proc = subprocess.run(command, cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    thresholds = json.loads((project / "models/calibration.json").read_text())["thresholds"]
    assert len(answers) == 3
    for answer in answers:  # a set: every label at or above its own threshold, none below
        said = {p["label"]: p["probability"] for p in answer["predictions"]}
        assert set(said) <= set(CLASSES) and all(p >= thresholds[label] for label, p in said.items())


QUEUED = {"queued-a": {"train.lr": 0.003}, "queued-b": {"train.lr": 0.0003}}


def _queue_done(project: Path, names: list[str], timeout: float = 300) -> str:
    """`dvc queue status` once every named experiment has ended (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_tool(project, "dvc", "queue", "status")
        ended = [line for line in status.splitlines() if any(f" {name} " in f" {line} " for name in names)]
        if all(("Success" in line or "Failed" in line) for line in ended) and len(ended) == len(names):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(2)


@pytest.mark.slow
def test_queued_experiments_run_two_at_once_share_the_cache_and_land_in_exp_show(built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    checkpoint = project / "models/checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    # The queue runs each experiment in its own workspace (.dvc/tmp/exps): an absolute cache folder is the
    # one they share; here the one the built run filled.
    _set_params(project, paths={"cache_dir": str(project / "data/cache")})
    commit(project, "one cache for every experiment")
    for name, overrides in QUEUED.items():
        sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
        run_tool(project, "dvc", "exp", "run", "--queue", "--name", name, *sets)
    dvc = [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"]
    env = tool_environ()
    subprocess.run(
        dvc, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    try:
        status = _queue_done(project, list(QUEUED))
    finally:
        subprocess.run([*dvc[:3], "queue", "stop", "--kill"], cwd=project, env=env, capture_output=True)

    assert status.count("Success") == len(QUEUED), status
    found = _experiments(project)
    for name, overrides in QUEUED.items():
        train = found[name]["params"]["params.yaml"]["data"]["train"]
        assert {key: train[key.removeprefix("train.")] for key in overrides} == overrides
        assert "data" in found[name]["metrics"]["metrics/evaluate.json"]
        log = run_tool(project, "dvc", "queue", "logs", name)
        assert _ran(log) == ["train", "evaluate", "quantize", "export"], log
        shared = project / "data/cache"
        assert f"image cache: reusing {shared}/images-" in log, log  # what the built run decoded
        assert f"images from {shared}/features-" in log, log  # and its backbone features
    # each ran in its own workspace: the main one's checkpoint folder is as it was
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before

"""The real DAG under DVC on tiny data: which stages re-run after which change, and experiments.

Each test works on a copy of the session's `built_project` (this project's dvc.yaml, params and code in a
temp git+DVC repo, run once). Re-runs are checked by running up to `split` (cheap) and asking `dvc status`
which later stages are now stale; the experiments test runs train onward for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, copy_project, make_image, run_tool

from pipeline.stages import STAGES as CODE_STAGES

STAGES = list(yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"])
AFTER_SPLIT = set(STAGES[STAGES.index("split") + 1 :])


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


def test_dag_order_is_the_seven_stages():
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
    assert _ran(run_tool(project, "dvc", "repro", "split")) == ["ingest", "validate", "split"]
    assert _stale(project) == AFTER_SPLIT


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
    assert json.loads((project / "metrics" / "ingest.json").read_text())["source"] == "csv"
    assert "ingest" not in _stale(project)

    listing.write_text(listing.read_text().replace(f"{images[0]},", f"{images[0]},relabelled_"))
    status = json.loads(run_tool(project, "dvc", "status", "--json"))
    assert {"changed deps": {"lists/labels.csv": "modified"}} in status["ingest"], status


@pytest.mark.slow
def test_two_experiments_rerun_train_onward_and_compare_in_exp_show(project):
    experiments = {
        "fast-full": {"train.lr": 0.01, "train.strategy": "full"},
        "slow-probe": {"train.lr": 0.0005, "train.strategy": "linear_probe"},
    }
    for name, overrides in experiments.items():
        sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
        output = run_tool(project, "dvc", "exp", "run", "--name", name, *sets)
        assert _ran(output) == ["train", "evaluate", "quantize", "export"], output  # train.* -> train onward

    found = _experiments(project)
    assert set(experiments) <= set(found)
    for name, overrides in experiments.items():
        train = found[name]["params"]["params.yaml"]["data"]["train"]
        assert {key: train[key.removeprefix("train.")] for key in overrides} == overrides
        metrics = found[name]["metrics"]
        for stage in ("validate", "split", "train", "evaluate", "quantize", "export"):
            assert "data" in metrics[f"metrics/{stage}.json"], f"{name}: no {stage} metrics: {metrics}"
    train_metrics = [found[name]["metrics"]["metrics/train.json"]["data"] for name in experiments]
    assert train_metrics[0] != train_metrics[1]

    plots = json.loads(run_tool(project, "dvc", "plots", "diff", *experiments, "--json"))["data"]
    curves = [key for key in plots if key.startswith("dvclive/plots/metrics/")]
    assert curves, f"no training curves in {sorted(plots)}"
    revisions = {rev for key in curves for plot in plots[key] for rev in plot.get("revisions", [])}
    assert set(experiments) <= revisions

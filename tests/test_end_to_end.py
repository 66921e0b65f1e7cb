"""The whole DAG on the bundled sample with the real backbone and bundled weights, via `dvc repro`, then
the ONNX `predict` command on the sample's test images, which must agree with the evaluate stage image by
image."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, run_tool

from pipeline.stages import STAGES

# A quick recipe (linear probe at 64 px) so the real-backbone run fits a CI budget; the default recipe's
# accuracy is measured by the train stage itself (see README) and by benchmarks/.
QUICK = {
    "model": {"image_size": 64},
    "train": {"strategy": "linear_probe", "epochs": 8},
    "quantize": {"benchmark_repeats": 3, "qat_epochs": 2, "qat_images": 128},  # QAT still runs, 1/16 of it
}


@pytest.fixture(scope="module")
def sample_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "project"
    shutil.copytree(
        PROJECT_ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(PROJECT_ROOT / "data" / "sample", root / "data" / "sample")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in QUICK.items():
        raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run_tool(root, "git", "init", "-q")
    run_tool(root, "dvc", "init", "-q")
    run_tool(root, "git", "add", "-A")
    run_tool(root, "git", "commit", "-q", "-m", "sample project")
    run_tool(root, "dvc", "repro")
    return root


@pytest.mark.slow
def test_sample_pipeline_produces_every_artifact_with_real_accuracy(sample_project):
    metrics = {
        stage: json.loads((sample_project / "metrics" / f"{stage}.json").read_text()) for stage in STAGES
    }
    assert metrics["ingest"]["ok"] == 1200
    # A linear probe on real ImageNet features: far above chance (10%); random features would not get here.
    assert metrics["evaluate"]["accuracy"] > 0.65
    assert metrics["export"]["top1_agreement"] >= 0.999
    export = sample_project / "models" / "export"
    for name in ("model.onnx", "labels.json", "preprocess.json", "model_card.md"):
        assert (export / name).is_file(), name
    # Whether INT8 passes the gate depends on this CPU's kernels; either way the export says what it serves.
    shipped = metrics["quantize"]["int8_shipped"]
    assert (export / "model.int8.onnx").is_file() == shipped
    assert metrics["export"]["served"] == ("int8" if shipped else "fp32")
    if shipped:
        assert metrics["quantize"]["int8_mb"] <= 0.30 * metrics["export"]["fp32_mb"]
    assert (sample_project / "reports" / "evaluate" / "report.html").is_file()


@pytest.mark.slow
def test_predict_agrees_with_evaluate_on_every_test_image(sample_project):
    with (sample_project / "models" / "predictions.csv").open() as fh:
        expected = {row["path"]: row["pred"] for row in csv.DictReader(fh)}
    data_root = sample_project / "data" / "sample"
    files = [str(data_root / path) for path in sorted(expected)]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", *files, "--model", "models/export", "--format", "json"]
        + ["--precision", "fp32"],
        cwd=sample_project,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(sample_project)},
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    got = {str(Path(r["path"]).relative_to(data_root)): r["predictions"][0]["label"] for r in results}
    with (sample_project / "data" / "processed" / "splits.csv").open() as fh:
        n_test = sum(row["split"] == "test" for row in csv.DictReader(fh))
    assert len(got) == len(expected) == n_test > 100  # the stable split's test share of 1,200 images
    disagreements = {path: (expected[path], got[path]) for path in expected if got[path] != expected[path]}
    assert not disagreements

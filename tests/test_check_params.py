"""Every params file that `python -m pipeline check` accepts runs, or fails in one line naming the key: a
dozen hostile values, each refused by params loading or by the check, in one line naming its key and what
is valid (nothing runs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, make_image_folder
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.config import NO_CSV_MANIFEST

OUTPUTS_IN_MODELS = "paths.model (models/model.pt), paths.predictions (models/predictions.csv), paths."

# id: (sections of params.yaml, what check's one line says: from "params.yaml: invalid params: " when params
# loading refuses the value, else from `check: `)
CASES = {
    "batch size 0": ({"train": {"batch_size": 0}}, "train.batch_size: expected a positive integer"),
    "batch size < 0": ({"train": {"batch_size": -4}}, "train.batch_size: expected a positive"),
    "eval batch size 0": (
        {"train": {"eval_batch_size": 0}},
        "train.eval_batch_size: expected a positive integer, got 0",
    ),
    "evaluate batch size 0": ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size: expected a"),
    "epochs 0": ({"train": {"epochs": 0}}, "train.epochs: expected a positive integer, got 0"),
    "lr 0": ({"train": {"lr": 0}}, "train.lr: expected a positive number, got 0"),
    "lr < 0": ({"train": {"lr": -0.001}}, "train.lr: expected a positive number, got -0.001"),
    "val + test = 1": (
        {"split": {"train": 0.0, "val": 0.5, "test": 0.5}},
        "split.train: expected a number > 0.0 and <= 1.0, got 0.0",
    ),
    "val 0": (
        {"split": {"train": 0.85, "val": 0.0, "test": 0.15}},
        "split.val: expected a number > 0.0 and <= 1.0, got 0.0",
    ),
    "val + test > 1": (
        {"split": {"val": 0.6, "test": 0.6}},
        "split: train + val + test must be 1.0, got 1.9",
    ),
    "image size 1": (
        {"model": {"image_size": 1}},
        "model.image_size: expected 32 to 1024 pixels (32: the backbone's total stride; null: its "
        "pretrained size), got 1",
    ),
    "image size huge": ({"model": {"image_size": 100_000}}, "model.image_size: expected 32 to 1024"),
    "crop_pct tiny": (
        {"model": {"crop_pct": 0.001}},
        "model.crop_pct: expected a number >= 0.5 and <= 1.0, got 0.001",
    ),
    "extension without its dot": (
        {"ingest": {"extensions": ["png"]}},
        "ingest.extensions: expected file extensions with their dot, e.g. [.jpg, .png], got ['png']",
    ),
    "unknown backbone": (
        {"model": {"backbone": "tf_efficentnet_lite0"}},
        "model.backbone: timm has no pretrained backbone 'tf_efficentnet_lite0'; did you mean "
        "tf_efficientnet_lite0, ",
    ),
    "unknown pretrained tag": (
        {"model": {"backbone": "resnet18.nope", "weights": "none"}},
        "model.backbone: timm has no pretrained backbone 'resnet18.nope'; did you mean resnet18.",
    ),
    "no bundled weights": (
        {"model": {"backbone": "resnet18"}},
        "model.weights: no bundled weights for 'resnet18', only for ['tf_efficientnet_lite0', ",
    ),
    "weights file missing": (
        {"model": {"weights": "file:weights/missing.pt"}},
        "model.weights: file weights/missing.pt not found",
    ),
    "data_root a file": (
        {"paths": {"data_root": "notes.txt"}},
        "paths.data_root: notes.txt is not a folder (it is a file)",
    ),
    "csv_manifest a folder": (
        {"paths": {"csv_manifest": "images"}},
        "paths.csv_manifest: images is not a file",
    ),
    "output inside data_root": (
        {"paths": {"reports_dir": "images/reports"}},
        "paths.reports_dir (images/reports) is inside paths.data_root (images), which DVC hashes as "
        "ingest's input; move it out, or point paths.data_root at a folder of images only",
    ),
    "data_root holds the project": (
        {"paths": {"data_root": "."}},
        "paths.manifest (data/interim/manifest.csv), paths.validated (data/interim/validated.csv), "
        "paths.quarantine (data/interim/quarantine.csv) and 13 more are inside paths.data_root (.)",
    ),
    "data_root inside an output": (
        {"paths": {"data_root": "reports/images"}},
        "paths.data_root: reports/images is inside the output paths.reports_dir (reports), which the "
        "pipeline writes and DVC deletes before its stage runs; keep inputs out of outputs",
    ),
    "csv_manifest inside an output": (
        {"paths": {"csv_manifest": "models/export/labels.csv"}},
        "paths.csv_manifest: models/export/labels.csv is inside the output paths.export_dir",
    ),
    "two outputs at one path": (
        {"paths": {"validated": "data/interim/manifest.csv"}},
        "paths.validated (data/interim/manifest.csv) is the same path as paths.manifest "
        "(data/interim/manifest.csv); give each output a place of its own",
    ),
    "outputs inside an output": (
        {"paths": {"checkpoint_dir": "models"}},
        OUTPUTS_IN_MODELS + "calibration (models/calibration.json) and 4 more are inside "
        "paths.checkpoint_dir (models); give each output a place of its own",
    ),
    "output inside the code": (
        {"paths": {"reports_dir": "pipeline/reports"}},
        "paths.reports_dir (pipeline/reports) is inside the code folder pipeline/, which the stages "
        "depend on; move it out",
    ),
    "output over params.yaml": (
        {"paths": {"metrics_dir": "params.yaml"}},
        "paths.metrics_dir (params.yaml) is the same path as the project's params.yaml; point it elsewhere",
    ),
    "file output an existing folder": (
        {"paths": {"manifest": "folder"}},
        "paths.manifest: folder is a folder, but the pipeline writes a file there; remove it, or point "
        "paths.manifest elsewhere",
    ),
    "folder output an existing file": (
        {"paths": {"metrics_dir": "notes.txt"}},
        "paths.metrics_dir: notes.txt is a file, but the pipeline writes a folder there",
    ),
    "output under a file": (
        {"paths": {"model": "notes.txt/model.pt"}},
        "paths.model: notes.txt/model.pt cannot be created, as notes.txt is a file; remove that file, or "
        "point paths.model elsewhere",
    ),
    "unwritable output folder": (
        {"paths": {"reports_dir": "locked/reports"}},
        "paths.reports_dir: locked/reports cannot be written, as the folder locked is not writable; make it "
        "writable, or point paths.reports_dir elsewhere",
    ),
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder: this project's params.yaml over `images/`, the no-CSV placeholder, a file
    `notes.txt`, an empty `folder/` and a read-only `locked/`."""
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (tmp_path / NO_CSV_MANIFEST).parent.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / NO_CSV_MANIFEST, tmp_path / NO_CSV_MANIFEST)
    (tmp_path / "notes.txt").write_text("not a folder\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "locked").mkdir(mode=0o555)
    _write_params(tmp_path, {"paths": {"data_root": "images"}})
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    (tmp_path / "locked").chmod(0o755)


def _write_params(project: Path, sections: dict) -> None:
    """params.yaml: this project's, with the keys of `sections` set (nested sections updated key by key)."""
    path = project / "params.yaml"
    raw = yaml.safe_load((path if path.is_file() else PROJECT_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_shipped_params_over_a_data_folder_pass(project):
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert "source: folder, data_root: images, backbone: tf_efficientnet_lite0" in result.output


@pytest.mark.parametrize(("sections", "expected"), CASES.values(), ids=CASES.keys())
def test_a_bad_value_fails_check_in_one_line_naming_its_key(project, sections, expected):
    if "locked" in str(sections) and os.access(project / "locked", os.W_OK):
        pytest.skip("this user writes in read-only folders (root)")
    _write_params(project, sections)
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("check: ") and expected in lines[0], lines[0]

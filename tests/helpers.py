"""Helpers shared by the tests: tiny real image folders made in tmp_path, tiny params, temp git+DVC projects.

A plain module (imported as `helpers`), so that tests import what they use; fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Params

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_image(path: Path, label_index: int, size: int = 32, seed: int = 0, mode: str = "RGB") -> Path:
    """A small image whose content depends on its class (a coloured bar at a class-specific place)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    band = (label_index * 7) % size
    pixels[band : band + max(2, size // 5), :, label_index % 3] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32) -> Path:
    """<root>/<class_k>/img_<i>.png, distinct bytes for every file."""
    for k in range(classes):
        for i in range(per_class):
            make_image(root / f"class_{k}" / f"img_{i:03d}.png", k, size=size, seed=1000 * k + i)
    return root


def metric_columns(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A metrics file's columns as `dvc exp show` makes them: nested keys joined with dots."""
    columns: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            columns.update(metric_columns(value, f"{prefix}{key}."))
        else:
            columns[f"{prefix}{key}"] = value
    return columns


def assert_headline_metrics(metrics: dict[str, Any], class_names: Iterable[str]) -> None:
    """Scalars only and no column per class, so a stage's share of `dvc exp show` does not grow with the
    classes (a fixed group such as images per split is fine)."""
    for column, value in metric_columns(metrics).items():
        assert value is None or isinstance(value, bool | int | float | str), (
            f"{column}: {value!r} is no scalar"
        )
        assert not set(column.split(".")) & set(class_names), f"{column}: a per-class figure in the metrics"


def data_stage_params(tmp_path: Path, data_root: Path, **sections: dict) -> Params:
    """Params for the data stages: source `data_root`, every output under tmp_path/out; `sections` override
    whole params sections (e.g. ingest={"num_workers": 0})."""
    out = tmp_path / "out"
    paths = {
        "data_root": str(data_root),
        "manifest": str(out / "manifest.csv"),
        "validated": str(out / "validated.csv"),
        "quarantine": str(out / "quarantine.csv"),
        "splits": str(out / "splits.csv"),
        "metrics_dir": str(out / "metrics"),
        "reports_dir": str(out / "reports"),
        "cache_dir": str(out / "cache"),
        **sections.pop("paths", {}),
    }
    return Params.from_dict({"paths": paths, **sections})


S3_BUCKET = "team-bucket"  # the bucket the `s3_endpoint` fixture's moto server starts with

# A gate that passes any INT8 model: the tiny random models of the tests are not what the gate is about.
SHIP_ANY_INT8 = {"min_agreement": 0.0, "alpha": 1e-12, "min_speedup": 0.0}


# The whole DAG in seconds: a few dozen 32 px images, timm's tiny random-weight backbone, one epoch. No
# quantization-aware fine-tune: it (mostly its second ONNX export) made each tiny quantize run 25 s instead of
# 15 s, and the suite runs the DAG dozens of times. tests/stages/test_quantize*.py test it, and
# test_end_to_end.py with the real backbone through `dvc repro`.
TINY_PARAMS = {
    "ingest": {"num_workers": 0},
    "model": {"backbone": "test_efficientnet", "weights": "none", "image_size": 32},
    "train": {"epochs": 1, "batch_size": 8},
    "quantize": {"benchmark_repeats": 2, "calibration_images": 8, "qat_epochs": 0},
    "orchestrate": {"retry_delay_seconds": 1.0},
}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: one the OS just handed out, closed again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_tool(folder: Path, command: list[str], log: Path, **environ: str) -> subprocess.Popen:
    """`command` started in `folder` in its own process group (stop it with `stop_tool`), `tool_environ` plus
    `environ`, its output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=folder, env=tool_environ(**environ), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_tool(process: subprocess.Popen) -> None:
    """Stop a `start_tool` process and the processes it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tool_environ(**extra: str) -> dict[str, str]:
    """This process's environment, this environment's python (and dvc, prefect) first on PATH, plus `extra`:
    what a command started the way a user starts it (a DVC stage's `python -m ...`) needs to find them."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, **extra, "PATH": path}


def run_tool(project: Path, *args: str) -> str:
    """Run `dvc ...` or `git ...` in `project`, this environment's python first on PATH; return the output."""
    env = tool_environ()
    tool = [sys.executable, "-m", "dvc"] if args[0] == "dvc" else [args[0]]
    proc = subprocess.run([*tool, *args[1:]], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a git+DVC project (DVC's lock and state db left behind, as on a fresh clone)."""
    shutil.copytree(source, target, symlinks=True, ignore=skip_local_state)
    return target


def skip_local_state(folder: str, names: list[str]) -> list[str]:
    in_dvc = Path(folder).name == ".dvc"
    return [name for name in names if name == "__pycache__" or (in_dvc and name == "tmp")]


def commit(project: Path, message: str) -> None:
    run_tool(project, "git", "add", "-A")
    run_tool(project, "git", "commit", "-q", "-m", message)


def tiny_dvc_project(root: Path, **sections: dict) -> Path:
    """This project's code, dvc.yaml and params.yaml (made tiny with TINY_PARAMS, then `sections` merged in)
    with 3 classes x 16 generated images, in a new git+DVC repo with one commit; nothing run yet."""
    import yaml

    shutil.copytree(PROJECT_ROOT / "pipeline", root / "pipeline", ignore=skip_local_state)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for overrides in (TINY_PARAMS, sections):
        for section, values in overrides.items():
            raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    make_image_folder(root / raw["paths"]["data_root"], classes=3, per_class=16)
    run_tool(root, "git", "init", "-q")
    run_tool(root, "dvc", "init", "-q")
    commit(root, "tiny project")  # like a clone: a commit exists before the first run
    return root


def model_project(root: Path, model=None, class_names: tuple[str, ...] = (), **sections: dict) -> Params:
    """A trained-model project for quantize / export / predict, all under `root`: 3 classes x 8 images of
    32 px (4 train, 1 val, 3 test each), a splits CSV, and `model` (default: timm's tiny `test_efficientnet`,
    random weights, seed 0) saved as the model artifact with `class_names` (default: the image folders)."""
    import csv

    import torch

    from pipeline.models import build_model, resolve_data_config, save_trained

    data_root = make_image_folder(root / "images", classes=3, per_class=8)
    rows = [
        {
            "path": f"class_{k}/img_{i:03d}.png",
            "label": f"class_{k}",
            "split": "train" if i < 4 else "val" if i < 5 else "test",
        }
        for k in range(3)
        for i in range(8)
    ]
    with open(root / "splits.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "sha256", "width", "height"])
        writer.writeheader()
        writer.writerows({**row, "sha256": "0" * 64, "width": 32, "height": 32} for row in rows)
    paths = {
        "data_root": str(data_root),
        "splits": str(root / "splits.csv"),
        **{key: str(root / key) for key in ("onnx_dir", "export_dir", "metrics_dir", "reports_dir")},
        "model": str(root / "model.pt"),
        "calibration": str(root / "calibration.json"),
        "feature_bank": str(root / "feature_bank.npy"),
        **sections.pop("paths", {}),
    }
    quantize = {"benchmark_repeats": 2, "calibration_images": 8, **sections.pop("quantize", {})}
    model_section = {"backbone": "test_efficientnet", "weights": "none", "image_size": 32}
    params = Params.from_dict({"paths": paths, "model": model_section, "quantize": quantize, **sections})
    names = list(class_names) or [f"class_{k}" for k in range(3)]
    if model is None:
        torch.manual_seed(0)
        model = build_model(params.model, len(names))
    save_trained(params.paths.model, model.eval(), names, resolve_data_config(params.model), params.to_dict())
    return params


def train_params(root: Path, classes: int = 3, per_class: int = 10, **sections: dict) -> Params:
    """A tiny training setup under `root`: `classes` x `per_class` 40 px images split 60/20/20 per class in a
    splits CSV with real sha256s, timm's tiny random-weight `test_efficientnet` at 32 px, every output under
    root/out. `sections` update params sections (e.g. train={"strategy": "full"})."""
    import csv
    import hashlib

    data_root = root / "images"
    if not data_root.exists():
        make_image_folder(data_root, classes=classes, per_class=per_class, size=40)
    n_train, n_val = round(per_class * 0.6), round(per_class * 0.2)
    with open(root / "splits.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "sha256", "width", "height"])
        writer.writeheader()
        for k in range(classes):
            for i in range(per_class):
                rel = f"class_{k}/img_{i:03d}.png"
                split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
                sha = hashlib.sha256((data_root / rel).read_bytes()).hexdigest()
                row = {"path": rel, "label": f"class_{k}", "split": split, "sha256": sha}
                writer.writerow({**row, "width": 40, "height": 40})
    out = root / "out"
    paths = {
        "data_root": str(data_root),
        "splits": str(root / "splits.csv"),
        "cache_dir": str(root / "cache"),
        "checkpoint_dir": str(out / "checkpoints"),
        "model": str(out / "model.pt"),
        "metrics_dir": str(out / "metrics"),
        "live_dir": str(out / "dvclive"),
        **sections.pop("paths", {}),
    }
    model = {
        "backbone": "test_efficientnet",
        "weights": "none",
        "image_size": 32,
        **sections.pop("model", {}),
    }
    train = {"epochs": 2, "batch_size": 8, "progressive_head_epochs": 1, **sections.pop("train", {})}
    return Params.from_dict({"paths": paths, "model": model, "train": train, **sections})


def multilabel_train_params(root: Path, **sections: dict) -> Params:
    """`train_params` for label sets (`base.task: multilabel`): each image keeps its class folder's label
    and every other one also has `even`, so its splits CSV holds sets such as `class_0;even`."""
    import csv

    params = train_params(root, base={"task": "multilabel"}, **sections)
    with open(params.paths.splits, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):  # each class folder, and "even" on every other image
        row["label"] = f"{row['label']};even" if i % 2 == 0 else row["label"]
    with open(params.paths.splits, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return params


# The child's helpers: cap the address space 1 GiB above what the process holds; its peak RSS in MiB.
CHILD_HELPERS = """
import json, resource, sys
from pathlib import Path

def status(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024

def cap_memory():
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize:") + 2**30, hard))

def peak_mib():  # VmHWM: ru_maxrss starts from the parent's peak, pytest's hundreds of MB
    return status("VmHWM:") / 2**20
"""


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with `CHILD_HELPERS` (cap_memory, peak_mib) defined and `args` in argv."""
    return subprocess.run([sys.executable, "-c", CHILD_HELPERS + code, *args], capture_output=True, text=True)


def mapped_bytes(path: Path) -> int:
    """Bytes of `path` mapped resident in this process (its /proc/self/smaps entries' Rss)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total

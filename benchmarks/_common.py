"""What every benchmark shares: options, the machine description, timing and memory measurement, a temporary
project with the real params, Fashion-MNIST set-up, and the result JSON.

A result is {"benchmark", "machine", "smoke", "settings", "results", "ratios", "targets"}; figures are medians
over repeats (after a warm-up where one makes sense), and every target says its value and whether it was met.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # a dependency of dvc, so always installed with the pipeline
import yaml

from pipeline.config import DEFAULT_PARAMS_FILE, Params, set_dotted
from pipeline.io import read_json, write_json, write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_DATA = REPO_ROOT / "benchmarks" / "data" / "fashion_mnist"
FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SCRIPT = REPO_ROOT / "scripts" / "fashion_mnist.py"
MIB = 1024 * 1024

# Smoke mode: timm's tiny random-weight backbone at 32 px and a handful of images, so every benchmark runs in
# seconds.
SMOKE_PARAMS = {
    "validate.min_images_per_class": 1,
    "model.backbone": "test_efficientnet",
    "model.weights": "none",
    "model.image_size": 32,
    "train.batch_size": 8,
    "ingest.num_workers": 0,
}
_VERSIONS = ("torch", "torchvision", "timm", "onnxruntime", "onnx", "numpy", "pillow", "dvc", "prefect")


@dataclass(frozen=True)
class Options:
    """Command-line options common to all benchmarks."""

    smoke: bool = False
    out_dir: Path = RESULTS_DIR
    data: Path = DEFAULT_DATA  # Fashion-MNIST as PNG folders: <data>/train/<class>/, <data>/test/<class>/
    repeats: int | None = None  # None: the benchmark's own default (1 in smoke mode)
    workdir: Path | None = None  # None: a temporary folder, removed afterwards
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted params, applied last
    project: Path | None = None  # pipeline_overhead: measure a copy of this reproduced DVC project instead

    def settings(self, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The benchmark's settings for this mode, with --repeats and --set applied."""
        chosen = dict(table["smoke" if self.smoke else "full"])
        if self.repeats is not None:
            chosen["repeats"] = self.repeats
        chosen["params"] = {**chosen.get("params", {}), **self.overrides}
        return chosen


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU, cores, memory, load, library versions and the code's commit."""
    versions = {}
    for package in _VERSIONS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min, when the benchmark started
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# ---------------------------------------------------------------------------------------------- timing


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, return value) of one call."""
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def summary(values: list[float]) -> dict[str, Any]:
    """Median, spread and every run of a repeated measurement."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- memory


class BackgroundSampler:
    """Calls `sample()` every `interval` seconds on a daemon thread while the `with` block runs."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


class TreeMemory(BackgroundSampler):
    """Peak memory of a process and all its descendants, sampled on a background thread.

    Two sums per sample: RSS (counts pages shared between forked workers once per process, so it overstates)
    and PSS (shares each shared page out among the processes that map it: the memory the tree really uses).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        super().__init__(interval)
        self.pid = pid or os.getpid()
        self.peak_rss = self.peak_pss = 0

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def figures(self) -> dict[str, float]:
        return {"peak_rss_mib": self.peak_rss / MIB, "peak_pss_mib": self.peak_pss / MIB}


@dataclass
class CommandRun:
    seconds: float
    peak_rss_mib: float
    peak_pss_mib: float
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> CommandRun:
    """Run a command to completion, timing it and sampling the peak memory of its process tree."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, cwd=cwd, env=tool_env(env), stdout=out, stderr=err, text=True)
        with TreeMemory(proc.pid) as memory:
            returncode = proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        run = CommandRun(seconds, memory.peak_rss / MIB, memory.peak_pss / MIB, out.read(), err.read())
    if returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {returncode} in {cwd}:\n{run.output[-4000:]}")
    return run


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child commands: this interpreter first on PATH (DVC stage commands call `python`), no
    analytics, and the repo importable (a child started in a temporary project folder imports `pipeline`)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GX_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1"}  # fmt: skip
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **(extra or {})}


# ---------------------------------------------------------------------------------------------- projects


@contextlib.contextmanager
def workdir(opts: Options, name: str) -> Iterator[Path]:
    """The benchmark's project folder: --workdir/<name> (kept), or a temporary folder (removed)."""
    if opts.workdir is not None:
        folder = Path(opts.workdir) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        yield Path(tmp)


def project_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """The repo's params.yaml with every output path moved under `root` (same layout), plus overrides."""
    base = Params.load(REPO_ROOT / DEFAULT_PARAMS_FILE)
    moved = {
        f"paths.{key}": str(root / value)
        for key, value in base.paths.model_dump().items()
        if value is not None and key not in ("data_root", "csv_manifest")
    }
    # Outputs outside the project folder are refused when a params file is loaded; a benchmark's workdir is
    # such a place on purpose, so its params are built from the loaded ones rather than loaded again.
    return with_overrides(base, {**moved, **(overrides or {})})


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """A copy of `params` with dotted overrides such as {"train.epochs": 3}, validated like params.yaml."""
    raw = params.to_dict()
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    return Params.from_dict(raw, source="benchmark overrides")


def write_params(params: Params, path: Path) -> Path:
    """A params.yaml that `python -m pipeline <stage> --params` (or DVC) reads back as the same Params."""
    return write_text(path, yaml.safe_dump(params.to_dict(), sort_keys=False))


def read_metrics(params_file: Path, stage: str) -> dict[str, Any]:
    """The metrics JSON a stage wrote for the params in `params_file`."""
    return read_json(Params.load(params_file).paths.metrics(stage))


def prepare_splits(params: Params) -> dict[str, Any]:
    """Run the real ingest -> validate -> split stages; returns the split summary."""
    from pipeline.stages import ingest, split, validate

    ingest.run(params)
    validate.run(params)
    return split.run(params)


def seeded_run(
    root: Path, base: Params, name: str, overrides: dict[str, Any], seed: int
) -> tuple[Params, float, float]:
    """One run of the train and evaluate stages with `overrides` and `base.seed` = `seed`, in its own
    checkpoint folder (`name` and the seed) so no run resumes another: (its params, train s, evaluate s)."""
    from pipeline.stages import evaluate, train

    folder = root / f"checkpoints-{name}-{seed}"
    params = with_overrides(base, {**overrides, "base.seed": seed, "paths.checkpoint_dir": str(folder)})
    train_seconds, _ = timed(lambda: train.run(params))
    evaluate_seconds, _ = timed(lambda: evaluate.run(params))
    return params, train_seconds, evaluate_seconds


ARM_FIGURES = ("accuracy", "f1_macro")  # test figures an arm is judged by


def arm_run(root: Path, base: Params, arm: str, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """One seeded run of an arm (`seeded_run`) and its figures: test accuracy and macro F1, the best epoch,
    the train/val accuracy gap at it and at its largest, and the seconds."""
    from pipeline.pages.report import read_training_curves

    params, train_seconds, evaluate_seconds = seeded_run(root, base, slug(arm), overrides, seed)
    metrics = read_json(params.paths.metrics("evaluate"))
    trained = read_json(params.paths.metrics("train"))
    curves = read_training_curves(params.paths.curves_dir)
    train_acc, val_acc = (curves[f"{split}/acc"]["value"].tolist() for split in ("train", "val"))
    best = trained["best_epoch"] - 1
    return {
        "arm": arm,
        "seed": seed,
        **{key: metrics[key] for key in ARM_FIGURES},
        "best_val_acc": trained["best_val_acc"],
        "best_epoch": trained["best_epoch"],
        "epochs_run": trained["epochs_run"],
        "gap_at_best": train_acc[best] - val_acc[best],
        "largest_gap": max(t - v for t, v in zip(train_acc, val_acc, strict=True)),
        "val_acc_by_epoch": [round(acc, 4) for acc in val_acc],
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
    }


def run_arms(
    root: Path, base: Params, arms: dict[str, dict[str, Any]], seeds: list[int]
) -> dict[str, list[dict[str, Any]]]:
    """Every arm (name -> overrides) with every seed (`arm_run`): arm -> its runs in the seeds' order. The
    arms alternate within each seed, so a slow spell of the machine hits all of them."""
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, overrides in arms.items():
            runs[arm].append(arm_run(root, base, arm, overrides, seed))
    return runs


def slug(name: str) -> str:
    """'Smileys & Emotion' -> 'smileys_emotion'; 'crop_pct: 1.0' -> 'crop_pct_1_0'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def judge_arms(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: every figure's summary; per arm but `default`: its paired gains over the default (same seed)
    and whether their median is larger than the noise (the default's largest spread between seeds) with every
    paired gain above zero."""
    default = runs["default"]
    noise = {key: max(r[key] for r in default) - min(r[key] for r in default) for key in ARM_FIGURES}
    gains: dict[str, Any] = {}
    for arm, rows in runs.items():
        if arm == "default":
            continue
        gains[arm] = {}
        for key in ARM_FIGURES:
            paired = [r[key] - d[key] for r, d in zip(rows, default, strict=True)]
            gains[arm][key] = {
                "median": median(paired),
                "runs": paired,
                "beyond_noise": bool(median(paired) > noise[key] and min(paired) > 0),
            }
    keys = (*ARM_FIGURES, "gap_at_best", "largest_gap", "epochs_run", "train_seconds")
    return {
        "runs": runs,
        "summary": {arm: {k: summary([r[k] for r in rows]) for k in keys} for arm, rows in runs.items()},
        "noise": noise,
        "gains": gains,
    }


# ---------------------------------------------------------------------------------------------- data


def ensure_fashion_mnist(root: Path) -> Path:
    """Fashion-MNIST PNG folders at `root` (train/ and test/ of class folders), exported from the Debian
    package `dataset-fashion-mnist` by scripts/fashion_mnist.py when missing; the package is installed when
    this runs as root, otherwise the command to install it is printed and the benchmark stops."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    ensure_debian_package(FASHION_MNIST_SOURCE, "dataset-fashion-mnist")
    subprocess.run([sys.executable, str(FASHION_MNIST_SCRIPT), "full", "--out", str(root)], check=True)
    return root


def ensure_debian_package(path: Path, package: str) -> Path:
    """`path`, which the Debian package `package` ships: installed when missing and this runs as root;
    otherwise the command to install it is printed and the benchmark stops."""
    if Path(path).exists():
        return Path(path)
    command = f"apt-get update && apt-get install -y {package}"
    if os.geteuid() != 0:
        raise SystemExit(f"{path}: not found; install it with `sudo sh -c '{command}'`")
    print(f"installing the Debian package {package}: {command}", file=sys.stderr)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", package], check=True)
    return Path(path)


def class_files(root: Path) -> dict[str, list[str]]:
    """class folder -> sorted file names directly inside it."""
    return {
        entry.name: sorted(
            f.name for f in os.scandir(entry.path) if f.is_file() and not f.name.startswith(".")
        )
        for entry in sorted(os.scandir(root), key=lambda e: e.name)
        if entry.is_dir() and not entry.name.startswith(".")
    }


def fashion_mnist_listing(
    data: Path,
    target: Path,
    val_per_class: int,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    train_fraction: float = 1.0,
    seed: int = 42,
) -> dict[str, int]:
    """Write a CSV manifest (path,label,split; for `paths.csv_manifest`) over the official split: val is
    `val_per_class` images per class drawn from the official train split, train is (a fraction of, or
    `train_per_class` of) the rest, test is (`test_per_class` of) the official test split. Returns counts."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, str]] = []
    for label, names in class_files(data / "train").items():
        order = rng.permutation(len(names))
        val, rest = order[:val_per_class], order[val_per_class:]
        keep = max(1, round(train_fraction * len(rest)))
        if train_per_class is not None:
            keep = min(keep, train_per_class)
        rows += [(f"train/{label}/{names[i]}", label, "val") for i in val]
        rows += [(f"train/{label}/{names[i]}", label, "train") for i in rest[:keep]]
    for label, names in class_files(data / "test").items():
        chosen = (
            rng.permutation(len(names))[:test_per_class] if test_per_class is not None else range(len(names))
        )
        rows += [(f"test/{label}/{names[i]}", label, "test") for i in chosen]
    rows.sort()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return {split: sum(1 for row in rows if row[2] == split) for split in ("train", "val", "test")}


def listed_params(opts: Options, root: Path, listing: dict[str, Any], overrides: dict[str, Any]) -> Params:
    """Params of a project under `root` whose data is a CSV listing over the Fashion-MNIST folders."""
    data = opts.data if opts.smoke else ensure_fashion_mnist(opts.data)
    manifest = root / "listing.csv"
    fashion_mnist_listing(Path(data), manifest, **listing)
    return project_params(
        root, {"paths.data_root": str(data), "paths.csv_manifest": str(manifest), **overrides}
    )


# ---------------------------------------------------------------------------------------------- results


def target(value: float, op: str, threshold: float) -> dict[str, Any]:
    """One target: `value op threshold` (op is >= or <=)."""
    met = value >= threshold if op == ">=" else value <= threshold
    return {"target": f"{op} {threshold:g}", "value": value, "met": bool(met)}


def result(
    name: str,
    opts: Options,
    started: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, Any],
    ratios: dict[str, float],
    targets: dict[str, dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The result payload; `started` is `machine()` taken when the benchmark began (its load average)."""
    return {
        "benchmark": name,
        "machine": {**started, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "smoke": opts.smoke,
        "settings": settings,
        "results": results,
        "ratios": ratios,
        "targets": targets,
        **extra,
    }


def write_result(out_dir: Path, payload: dict[str, Any]) -> Path:
    return write_json(Path(out_dir) / f"{payload['benchmark']}.json", payload)

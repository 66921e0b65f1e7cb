"""scale: how each stage's time, memory and disk grow from ten thousand to a million images on one machine.

Generated, distinct images (`make_images`): small PNGs (32-48 px a side) of per-class motifs (a shape, a
texture, a stripe period) with a random colour pair, position, size and noise, and planted copies: 1% altered
(brightness, a 1 px shift, a mirror or a 10% resize of an earlier image of its class: near-duplicates) and
0.2% byte-identical. 10 to 1,000 classes (one per thousand images). Written by 2 processes, a few hundred
images at a time (memory stays flat), once per size under benchmarks/data/scale/ and reused afterwards.

Each size runs in a project folder of its own, each stage as `python -m pipeline <stage>` in a process of its
own, as DVC runs them: ingest, validate, audit, split, train (`strategy: linear_probe` on the cached features
of the features pass) and evaluate, at `model.image_size` 32 so the backbone's forward passes do not hide the
rest. Per stage and size: wall time, CPU time, the peak RSS of the stage's process and of every worker
(sampled from /proc every 0.2 s; the largest process's exact high-water mark from the kernel, `wait4`), and
the bytes its outputs and the cache folder gained; then the growth exponent of each between the two largest
sizes, log(t2 / t1) / log(n2 / n1): 1 is linear, 2 quadratic. The backbone's own speed is measured apart
(`backbone`: random batches through the folded inference copy the features pass uses), since at a million
images it sets the floor whatever the rest costs.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks._common import (
    MIB,
    REPO_ROOT,
    SMOKE_PARAMS,
    BackgroundSampler,
    Options,
    machine,
    project_params,
    result,
    target,
    timed,
    tool_env,
    workdir,
    write_params,
)
from pipeline.config import NO_CSV_MANIFEST, Params
from pipeline.io import write_json

NAME = "scale"
STAGES = ("ingest", "validate", "audit", "split", "train", "evaluate")
DATA_DIR = REPO_ROOT / "benchmarks" / "data" / "scale"
_COMMON = {
    "model.image_size": 32,
    "train.strategy": "linear_probe",
    "train.epochs": 5,
    # A linear probe's batch, lr scaled with it (32 and 1e-4 before): at 32 a head-only epoch of 1,000 classes
    # stepped AdamW over 1.28 M weights every 32 images (3.9 ms a batch on a 2-core Xeon, bf16 autocast; 7.9
    # ms for 256 images).
    "train.batch_size": 256,
    "train.lr": 8e-4,
    "train.checkpoint_every_s": 600,
    "audit.drift": False,
}
SETTINGS = {
    "full": {
        "repeats": 1,
        "sizes": [10_000, 100_000, 1_000_000],
        "stage_timeout_s": 4 * 3600,
        # The stages' torch/OpenMP threads (None: as this process's environment says). 1: with torch's 2 on 2
        # cores shared with other jobs, the million-image features pass ran at 35 img/s instead of 1,500.
        "threads": 1,
        "params": _COMMON,
    },
    "smoke": {
        "repeats": 1,
        "sizes": [2_000],
        "stage_timeout_s": 600,
        "threads": 1,  # on a busy CI box 2 threads of torch wait on each other (2-thread head epochs: 5x)
        "params": {**_COMMON, **SMOKE_PARAMS, "ingest.num_workers": 2},
    },
}
# The targets, on 2 cores: no stage's time grows faster than n^1.15 between the two largest sizes; at the
# largest, no process above 4 GiB of RSS, and every stage in 45 minutes once the passes that run the network
# over every image are taken out (what a GPU shortens; `network_pass_seconds`).
MAX_TIME_EXPONENT = 1.15
MAX_PEAK_RSS_GIB = 4.0
MAX_MINUTES_WITHOUT_NETWORK = 45.0
_FORMAT = 2  # bump when the generated pixels change: the folders made before are made again
_SEED = 20261206


# ---------------------------------------------------------------------------------------------- images


def classes_for(n: int) -> int:
    """One class per thousand images, 10 to 1,000."""
    return min(1000, max(10, n // 1000))


def make_images(folder: Path, n: int, workers: int = 2) -> dict[str, Any]:
    """`n` PNGs under `folder`/c<class>/<index>.png, made once: a folder whose spec.json matches is reused, a
    folder left half-made is completed (each file is written whole, then renamed). Returns the spec."""
    spec = {"images": n, "classes": classes_for(n), "format": _FORMAT, "seed": _SEED}
    done = folder / "spec.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        return spec
    done.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    step = 500
    tasks = [(str(folder), start, min(start + step, n), n) for start in range(0, n, step)]
    if workers <= 1:
        for task in tasks:
            _write_range(task)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_range, tasks):
                pass
    write_json(done, spec)
    return spec


def image_path(i: int, n: int) -> str:
    """Image `i` of `n`: class i mod K, the (i // K)th of its class."""
    classes = classes_for(n)
    return f"c{i % classes:04d}/{i // classes:06d}.png"


def _write_range(task: tuple[str, int, int, int]) -> None:
    folder, start, stop, n = task
    for i in range(start, stop):
        target_file = Path(folder, image_path(i, n))
        if target_file.is_file():
            continue
        target_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = target_file.with_suffix(".tmp")
        tmp.write_bytes(png_bytes(render(i, n)))
        os.replace(tmp, target_file)


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG file bytes (the same pixels give the same bytes)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render(i: int, n: int) -> Any:
    """Image `i` of `n` (a PIL image). 1 in 100 is an altered copy of the image before it in its class (a
    near-duplicate), 1 in 500 a byte-identical one; the others are drawn from their class's motif."""
    from PIL import Image

    classes = classes_for(n)
    rng = np.random.default_rng((_SEED, i))
    kind = rng.integers(1000)
    if i >= classes and kind < 2:
        return render(i - classes, n)  # same pixels, same PNG bytes
    if i >= classes and kind < 12:
        return _altered(render(i - classes, n), int(kind) % 4, rng)
    return Image.fromarray(_motif(i % classes, rng))


def _motif(label: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: class `label`'s shape (6 kinds) filled with its texture (6 kinds, each drawn at one of
    28 periods), at a random place and size, in a random colour pair, with noise."""
    height, width = (int(v) for v in rng.integers(32, 49, size=2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = (rng.uniform(0.35, 0.65, size=2) * (height, width)).tolist()
    radius = rng.uniform(0.22, 0.42) * min(height, width)
    dy, dx = (y - cy) / radius, (x - cx) / radius
    shape, texture, period = label % 6, (label // 6) % 6, 2.5 + 0.25 * ((label // 36) % 28)
    inside = [
        dx**2 + dy**2 <= 1,
        np.maximum(abs(dx), abs(dy)) <= 0.8,
        (dy <= 0.8) & (abs(dx) <= (dy + 1) / 2),
        abs(np.hypot(dx, dy) - 0.75) <= 0.25,
        (np.minimum(abs(dx), abs(dy)) <= 0.25) & (np.maximum(abs(dx), abs(dy)) <= 1),
        abs(dx) + abs(dy) <= 1,
    ][shape]
    angle = rng.uniform(-0.2, 0.2)
    u, v = x * math.cos(angle) + y * math.sin(angle), y * math.cos(angle) - x * math.sin(angle)
    pattern = [
        (np.hypot(x - cx, y - cy) // period) % 2 == 0,  # rings (a plain fill made 168 classes look alike)
        (v // period) % 2 == 0,
        (u // period) % 2 == 0,
        ((u + v) // period) % 2 == 0,
        ((u // period) + (v // period)) % 2 == 0,
        np.hypot(u % period - period / 2, v % period - period / 2) <= period / 3,
    ][texture]
    background, foreground = rng.integers(0, 256, size=(2, 3))
    while np.abs(background - foreground).sum() < 150:
        foreground = rng.integers(0, 256, size=3)
    pixels = np.where((inside & pattern)[..., None], foreground, background).astype(np.float32)
    pixels += rng.normal(0, rng.uniform(3, 12), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _altered(image: Any, kind: int, rng: np.random.Generator) -> Any:
    """A near-duplicate of `image`: brightness +/-6%, a 1 px shift, a mirror or a 10% resize."""
    from PIL import Image, ImageChops, ImageEnhance, ImageOps

    if kind == 0:
        return ImageEnhance.Brightness(image).enhance(float(rng.choice([0.94, 1.06])))
    if kind == 1:
        return ImageChops.offset(image, 1, 1)
    if kind == 2:
        return ImageOps.mirror(image)
    side = (round(image.width * 1.1), round(image.height * 1.1))
    return image.resize(side, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------- benchmark


def run(opts: Options, sizes: list[int] | None = None) -> dict[str, Any]:
    """Every stage at every size (`sizes`, or the settings'); a size's later stages are skipped once one
    fails (the audit excepted: split runs without its table) or runs past `stage_timeout_s`."""
    started, settings = machine(), opts.settings(SETTINGS)
    if sizes:
        settings["sizes"] = sorted(sizes)
    results: dict[str, Any] = {"sizes": {}}
    with workdir(opts, NAME) as root:
        for n in settings["sizes"]:
            data = (root / "data" if opts.smoke else DATA_DIR) / f"n{n}"
            made, spec = timed(lambda n=n, data=data: make_images(data, n))
            project = root / f"n{n}"
            project.mkdir(parents=True, exist_ok=True)
            params = _project(project, data, settings["params"])
            threads = _threads_env(settings["threads"])
            stages = _run_size(project, params, n, settings["stage_timeout_s"], threads)
            results["sizes"][str(n)] = {**spec, "generate_seconds": made, "data": str(data), "stages": stages}
            if opts.workdir is None:
                shutil.rmtree(project, ignore_errors=True)  # a million images leave gigabytes of caches
        results["backbone"] = _backbone_speed(params, 2 if opts.smoke else 20, settings["threads"])
        disk = _disk(root if opts.smoke else DATA_DIR)
    results["growth"] = _growth(results["sizes"])
    plot = _plot(results, Path(opts.out_dir) / f"{NAME}.png")
    ratios = {
        f"{stage}_seconds_exponent": figures["seconds"]
        for stage, figures in results["growth"].get("exponents", {}).items()
        if figures.get("seconds") is not None
    }
    targets = {
        f"{key.removesuffix('_seconds_exponent')}_time_exponent": target(value, "<=", MAX_TIME_EXPONENT)
        for key, value in ratios.items()
    }
    largest = results["largest"] = _largest(results["sizes"][str(max(settings["sizes"]))]["stages"])
    for key, most in (
        ("peak_rss_gib", MAX_PEAK_RSS_GIB),
        ("minutes_without_network_passes", MAX_MINUTES_WITHOUT_NETWORK),
    ):
        goal = target(largest[key], "<=", most)
        targets[f"largest_{key}"] = {**goal, "met": goal["met"] and largest["complete"]}
    omp = os.environ.get("OMP_NUM_THREADS")  # what the stages inherit when `threads` is None
    settings.update(cores=os.cpu_count(), cpu_flags=_cpu_flags(), disk=disk, omp_num_threads=omp)
    return result(NAME, opts, started, settings, results, ratios, targets, plot=plot.name)


def _largest(stages: dict[str, Any]) -> dict[str, Any]:
    """The largest size's figures the targets read: its largest peak RSS, its minutes in all and without the
    network's passes, and whether every stage ran to the end (a stage that failed or never ran would
    otherwise make the minutes look short)."""
    done = [stages.get(stage, {}) for stage in STAGES]
    return {
        "complete": all(f.get("returncode") == 0 and not f.get("timed_out") for f in done),
        "peak_rss_gib": max(figures["peak_rss_mib"] for figures in stages.values()) / 1024,
        "minutes": sum(figures["seconds"] for figures in stages.values()) / 60,
        "minutes_without_network_passes": sum(
            figures["seconds"] - figures["network_pass_seconds"] for figures in stages.values()
        )
        / 60,
    }


def _project(project: Path, data: Path, overrides: dict[str, Any]) -> Params:
    """The repo's params with every output under `project`, the images at `data`, and `overrides`; written
    to `project`/params.yaml for the stage commands."""
    params = project_params(
        project, {"paths.data_root": str(data), "paths.csv_manifest": str(NO_CSV_MANIFEST), **overrides}
    )
    write_params(params, project / "params.yaml")
    return params


def _threads_env(threads: int | None) -> dict[str, str]:
    """The environment that holds the stage commands to `threads` (torch reads OMP_NUM_THREADS)."""
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads)}


def _run_size(
    project: Path, params: Params, images: int, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for stage in STAGES:
        cache_before = _bytes(params.paths.cache_dir)
        figures = run_stage(stage, project, timeout, env)
        figures["seconds_per_1000_images"] = 1000 * figures["seconds"] / images
        figures["output_bytes"] = sum(_bytes(path) for path in _outputs(stage, params))
        figures["cache_bytes_added"] = _bytes(params.paths.cache_dir) - cache_before
        stages[stage] = figures
        print(f"scale: {project.name} {stage}: {_line(figures)}", file=sys.stderr, flush=True)
        if figures["returncode"] != 0 and stage != "audit":
            break
    return stages


def _line(figures: dict[str, Any]) -> str:
    state = "ok" if figures["returncode"] == 0 else f"FAILED ({figures['returncode']})"
    return (
        f"{state}, {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB "
        f"({figures['processes']} processes, sum {figures['peak_rss_sum_mib']:.0f} MiB)"
    )


def _outputs(stage: str, params: Params) -> list[Path]:
    """What the stage's contract says it writes, and its metrics file."""
    from pipeline.stages import contracts

    declared = contracts()[stage]
    return [params.paths.ref(ref) for ref in (*declared.outs, f"metrics:{stage}")]


def _bytes(path: Path) -> int:
    """Bytes of the file, or of every file under the folder; 0 when there is none."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, name)).st_size for name in files)
    return total


# ---------------------------------------------------------------------------------------------- one stage


def run_stage(stage: str, project: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`python -m pipeline <stage>` in `project` (`env`: added to its environment): wall and CPU seconds,
    peak memory of its processes, the seconds its `done in` line gives, the backbone's img/s where its
    features pass printed one; the output goes to `project`/logs/<stage>.log."""
    log_file = project / "logs" / f"{stage}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    begun = time.perf_counter()
    with log_file.open("w") as out:
        command = [sys.executable, "-m", "pipeline", stage, "--params", "params.yaml"]
        proc = subprocess.Popen(command, cwd=project, env=tool_env(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        with _TreePeaks(proc.pid) as peaks:
            returncode, usage, timed_out = _wait(proc, timeout)
    seconds = time.perf_counter() - begun
    text = log_file.read_text(errors="replace")
    return {
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        "stage_seconds": _done_seconds(stage, text),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB: the largest process's high-water mark (kernel)
        **peaks.figures(),
        "backbone_images_per_s": _backbone_rate(text),
        "network_pass_seconds": _network_pass_seconds(text),
        "load_average_1min_before": round(load, 2),
        **({} if returncode == 0 else {"error": text[-3000:]}),
    }


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, Any, bool]:
    """(exit code, its resource usage, whether it was killed for running past `timeout` seconds). wait4
    gives the process's own usage with that of the workers it waited for: ru_maxrss is the largest one's."""
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage, killed.is_set()


def _done_seconds(stage: str, text: str) -> float | None:
    """The seconds of the stage's last line, `<stage>: done in <seconds> s {...}` (pipeline/__main__.py)."""
    found = re.findall(rf"^{stage}: done in ([0-9.]+) s", text, flags=re.MULTILINE)
    return float(found[-1]) if found else None


def _backbone_rate(text: str) -> float | None:
    """The img/s of the features pass's last progress line (written for passes over 10 s), if any."""
    found = re.findall(r"backbone features \d+/\d+: \d+/\d+ img.*?, ([0-9.e+]+) img/s", text)
    return float(found[-1]) if found else None


# The progress lines of the passes that run the network over every image: the features pass (audit) and
# evaluate's passes over val and test
_NETWORK_PASSES = r"(?:backbone features \d+/\d+|evaluate val|evaluate test)"


def _network_pass_seconds(text: str) -> float:
    """Seconds of the passes that run the network over every image (decoding included), from the `done in`
    of their progress lines (pipeline.progress, written for passes over 10 s): what a GPU shortens."""
    found = re.findall(rf"{_NETWORK_PASSES}: \d+/\d+ img.*?, done in ((?:\d+ (?:h|min|s) ?)+)$", text, re.M)
    units = {"h": 3600, "min": 60, "s": 1}
    return float(
        sum(
            int(value) * units[unit] for done in found for value, unit in re.findall(r"(\d+) (h|min|s)", done)
        )
    )


class _TreePeaks(BackgroundSampler):
    """Peak RSS of a process and each of its descendants (workers), and of their sum, read from /proc every
    `interval` seconds (RSS only: cheap, unlike PSS, which parses smaps; forked workers' shared pages count
    in each, so the sum overstates)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(interval)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.peak_sum = 0
        self._known: dict[int, psutil.Process] = {}

    def figures(self) -> dict[str, Any]:
        workers = [rss for pid, rss in self.peaks.items() if pid != self.pid]
        return {
            "peak_rss_sampled_mib": self.peaks.get(self.pid, 0) / MIB,
            "peak_rss_sum_mib": self.peak_sum / MIB,
            "worker_peak_rss_mib": max(workers, default=0) / MIB,
            "processes": len(self.peaks),
        }

    def sample(self) -> None:
        try:
            root = self._known.setdefault(self.pid, psutil.Process(self.pid))
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for process in tree:
            try:
                rss = self._known.setdefault(process.pid, process).memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
        self.peak_sum = max(self.peak_sum, total)


# ---------------------------------------------------------------------------------------------- backbone


def _backbone_speed(params: Params, seconds: float, threads: int | None) -> dict[str, Any]:
    """Images/s of the features pass's network alone (the backbone with BatchNorm folded, as
    `training.features` runs it, its batch size, precision and memory format) on random batches, with
    `threads` torch threads (None: torch's default)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _images_per_s(params, seconds)
    finally:
        torch.set_num_threads(before)


def _images_per_s(params: Params, seconds: float) -> dict[str, Any]:
    import torch

    from pipeline.models import build_model
    from pipeline.training.distributed import Dist
    from pipeline.training.features import feature_pass, inference_copy

    batch_size, precision, channels_last = feature_pass(params.features, Dist())
    backbone = build_model(params.model, num_classes=None).backbone.to(precision.device).eval()
    side = params.model.image_size
    batch = torch.randn(batch_size, 3, side, side, device=precision.device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        network = inference_copy(backbone, batch[:2])
        for _ in range(3):  # a process's first passes create its kernels
            with precision.autocast():
                network(batch)
        images, begun = 0, time.perf_counter()
        while time.perf_counter() - begun < seconds or images < 4 * batch_size:
            with precision.autocast():
                network(batch)
            images += batch_size
        elapsed = time.perf_counter() - begun
    return {
        "model": params.model.backbone,
        "image_size": side,
        "batch_size": batch_size,
        "precision": precision.name,
        "threads": torch.get_num_threads(),
        "images_per_s": images / elapsed,
    }


# ---------------------------------------------------------------------------------------------- growth


_GROWING = ("seconds", "cpu_seconds", "peak_rss_mib", "peak_rss_sum_mib", "output_bytes", "cache_bytes_added")


def _growth(sizes: dict[str, Any]) -> dict[str, Any]:
    """Each stage's exponent k of figure ~ n^k between the two largest sizes where it ran to completion, and
    the sizes it used; none with fewer than two such sizes."""
    exponents: dict[str, Any] = {}
    for stage in STAGES:
        done = sorted(
            (int(n), size["stages"][stage])
            for n, size in sizes.items()
            if size["stages"].get(stage, {}).get("returncode") == 0
        )
        if len(done) < 2:
            continue
        (small, low), (large, high) = done[-2:]
        exponents[stage] = {"between": [small, large]}
        for key in _GROWING:
            exponents[stage][key] = exponent(low[key], high[key], small, large)
    return {"exponents": exponents}


def exponent(low: float, high: float, small: int, large: int) -> float | None:
    """k in high / low = (large / small)^k; None when either figure is not positive."""
    if not (low and high and low > 0 and high > 0):
        return None
    return math.log(high / low) / math.log(large / small)


def _plot(results: dict[str, Any], path: Path) -> Path:
    """Seconds per stage against images, log-log, with the backbone alone (all images once, at the
    measured rate) and a line of slope 1 for reference."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.5), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    sizes = sorted(int(n) for n in results["sizes"])
    for stage in STAGES:
        points = [
            (n, results["sizes"][str(n)]["stages"][stage]["seconds"])
            for n in sizes
            if results["sizes"][str(n)]["stages"].get(stage, {}).get("returncode") == 0
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=stage)
    rate = results.get("backbone", {}).get("images_per_s")
    if rate:
        axes.plot(sizes, [n / rate for n in sizes], linestyle="--", color="grey", label="backbone alone")
    if sizes:
        axes.plot(sizes, [sizes[0] / 1000 * (n / sizes[0]) for n in sizes], linestyle=":", color="black",
                  label="slope 1 (1 ms/image)")  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("images")
    axes.set_ylabel("seconds (wall, stage command)")
    axes.set_title("Stage time against data size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata={"Software": None})
    return path


# ---------------------------------------------------------------------------------------------- machine


def _cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide the backbone's speed (AVX-512, VNNI, AMX, bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    wanted = re.compile(r"avx512\w*|avx_vnni|amx\w*|avx2")
    return sorted({flag for flag in (flags.group(1).split() if flags else []) if wanted.fullmatch(flag)})


def _disk(path: Path) -> dict[str, Any]:
    """The file system holding `path`: device, type, size, free space, and whether the disk spins."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    fields = subprocess.run(["df", "-P", "-T", str(path)], capture_output=True, text=True).stdout.split("\n")
    device, kind = (fields[1].split()[:2] + ["", ""])[:2] if len(fields) > 1 else ("", "")
    usage = shutil.disk_usage(path)
    rotational = Path("/sys/block", Path(device).name.rstrip("0123456789"), "queue", "rotational")
    return {
        "device": device,
        "type": kind,
        "size_gib": round(usage.total / 1024**3, 1),
        "free_gib": round(usage.free / 1024**3, 1),
        "rotational": rotational.read_text().strip() == "1" if rotational.is_file() else None,
    }

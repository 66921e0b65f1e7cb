"""audit_scale: how the audit's passes grow with the number of images, on random data (no backbone, no files).

Near-duplicate search (`checks.candidate_pairs`: `similar_pairs` + `pixel_nearest`, as the audit runs them, on
random 1,280-d embeddings and random 48 px thumbnails, both read from memory-mapped files): wall time and peak
memory at each size, by the approximate path (faiss HNSW, what runs above `checks.ANN_ABOVE` images) and, at
the smaller sizes, by the exact one (all pairs); the fitted exponent between the two largest sizes. Planted
copies measure what the approximate search still finds: a row in each hundred is a near-identical embedding
(cosine ~0.99: `similarity`), one a noisy one (cosine ~0.71: `neighbours`), one a mirrored thumbnail with an
unrelated embedding (`pixel_nearest`).

The pixel check of the candidates (`checks.aligned_correlation`) costs the same per candidate pair at any
size: timed on all candidates at the smaller sizes, projected by the candidate count above. The label-issue
pass (k-fold logistic regression + cleanlab) and the drift test (old-vs-new logistic regression) are timed on
class-structured random embeddings. Each measurement runs in a fresh process: its peak RSS (kernel high-water
mark, counts the pages of the memory-mapped inputs it read) and its peak anonymous memory (heap, sampled).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import MIB, BackgroundSampler, Options, machine, result, target, tool_env, workdir

NAME = "audit_scale"
_EXACT = 10**12  # ann_above for the exact path: never approximate
SETTINGS = {
    "full": {
        "repeats": 1,
        "sizes": (10_000, 20_000, 50_000, 100_000),
        "exact_sizes": (5_000, 10_000, 20_000),
        "verify_sizes": (5_000,),  # the pixel check of every candidate pair timed at these sizes
        "label_sizes": (10_000, 20_000, 40_000),
        "dims": 1280,
        "classes": 10,
        "params": {},
    },
    "smoke": {
        "repeats": 1,
        "sizes": (300, 600),
        "exact_sizes": (300, 600),
        "verify_sizes": (300,),
        "label_sizes": (300, 600),
        "dims": 64,
        "classes": 3,
        "params": {},
    },
}
_PLANTED = {
    "similarity": (97, 0.15),
    "neighbours": (98, 1.0),
    "pixel_nearest": (99, None),
}  # row % 100, noise
_SOURCE = 37  # a planted row copies the row this many before it, in its own hundred


def make_data(folder: Path, n: int, dims: int, seed: int = 0) -> tuple[Path, Path]:
    """Random (n, dims) float16 embeddings and (n, 48, 48) uint8 thumbnails as .npy files in `folder`, with
    the planted copies (_PLANTED); made a hundred thousand rows at a time."""
    from numpy.lib.format import open_memmap

    embeddings_file, thumbs_file = folder / f"embeddings-{n}-{dims}.npy", folder / f"thumbs-{n}.npy"
    embeddings = open_memmap(embeddings_file, mode="w+", dtype=np.float16, shape=(n, dims))
    thumbs = open_memmap(thumbs_file, mode="w+", dtype=np.uint8, shape=(n, 48, 48))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        block = rng.standard_normal((stop - start, dims), dtype=np.float32)
        pixels = rng.integers(0, 256, size=(stop - start, 48, 48), dtype=np.uint8)
        for offset, noise in _PLANTED.values():
            rows = np.arange(offset, stop - start, 100)
            if noise is None:  # the same picture mirrored, another embedding
                pixels[rows] = pixels[rows - _SOURCE][:, :, ::-1]
            else:
                block[rows] = block[rows - _SOURCE] + noise * rng.standard_normal((len(rows), dims))
        embeddings[start:stop], thumbs[start:stop] = block, pixels
    embeddings.flush()
    thumbs.flush()
    return embeddings_file, thumbs_file


def planted(n: int) -> dict[str, np.ndarray]:
    """kind -> (P,) keys first * n + second of the planted pairs among the first n rows."""
    keys = {}
    for kind, (offset, _) in _PLANTED.items():
        rows = np.arange(offset, n, 100)
        keys[kind] = (rows - _SOURCE) * n + rows
    return keys


class _AnonymousPeak(BackgroundSampler):
    """Peak RssAnon of this process (heap and other private memory; not the pages of mapped files), sampled
    every `interval` seconds."""

    def __init__(self, interval: float = 0.02):
        super().__init__(interval)
        self.peak = 0

    def now(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample(self) -> None:
        self.peak = max(self.peak, self.now())


def _search(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: candidate_pairs on the first n rows; with `verify`, the pixel check of them all."""
    from pipeline.config import AuditParams
    from pipeline.stages.audit import checks

    n, ann_above = job["n"], job["ann_above"]
    embeddings = np.load(job["embeddings"], mmap_mode="r")[:n]
    thumbs = np.load(job["thumbs"], mmap_mode="r")[:n]
    audit = AuditParams()
    with _AnonymousPeak() as anonymous, tempfile.TemporaryDirectory(prefix="audit-scale-") as tmp:
        before = anonymous.now()
        started, cpu = time.perf_counter(), _cpu_seconds()
        unit = checks.unit_embeddings(embeddings, Path(tmp) if n > ann_above else None)
        alike, candidates = checks.candidate_pairs(unit, thumbs, audit, ann_above)
        figures = {"seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu}
        figures.update(alike=len(alike), candidates=len(candidates))
        if job["verify"]:
            started = time.perf_counter()
            checks.verified(unit, thumbs, alike, candidates, audit.pixel_correlation)
            figures["verify_seconds"] = time.perf_counter() - started
    found = np.union1d(alike.keys(n), candidates.keys(n))
    for kind, keys in planted(n).items():
        figures[f"recall_{kind}"] = float(np.isin(keys, found).mean()) if len(keys) else 1.0
    return {**figures, **_memory(anonymous, before)}


def _cpu_seconds() -> float:
    """User + system time of this process, all its threads: less swayed than wall time by other jobs."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _labels(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the label-issue pass and the drift test on class-structured random embeddings."""
    from pipeline.stages.audit import checks

    n, dims, classes = job["n"], job["dims"], job["classes"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, size=n)
    centres = rng.standard_normal((classes, dims), dtype=np.float32)
    embeddings = centres[labels] + 3 * rng.standard_normal((n, dims), dtype=np.float32)
    with _AnonymousPeak() as anonymous:
        before = anonymous.now()
        started = time.perf_counter()
        probabilities = checks.out_of_fold_probabilities(embeddings, labels, 5, 0)
        fitted = time.perf_counter()
        checks.label_issues(labels, probabilities)
        ranked = time.perf_counter()
        halves = np.arange(n) < n // 2
        checks.two_sample_auc(embeddings, halves, ~halves, 5, 0)
        drift = time.perf_counter()
    seconds = {"k_fold_probe": fitted - started, "cleanlab": ranked - fitted, "drift": drift - ranked}
    return {"seconds": seconds, **_memory(anonymous, before)}


def _memory(anonymous: _AnonymousPeak, before: int) -> dict[str, float]:
    """Peak RSS (VmHWM: this process since it started; not ru_maxrss, which keeps the parent's peak across
    fork and exec) and peak anonymous memory, in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {
        "peak_rss_mib": int(status["VmHWM"].split()[0]) * 1024 / MIB,
        "peak_anonymous_mib": anonymous.peak / MIB,
        "anonymous_before_mib": before / MIB,
    }


def _in_fresh_process(function: str, job: dict[str, Any]) -> dict[str, Any]:
    """`function`(job) of this module in a new interpreter: its own peak memory, nothing left from the last
    size (a subprocess, not multiprocessing: nothing of the caller's __main__ runs again)."""
    call = f"print(json.dumps({function}(json.loads(sys.argv[1]))))"
    code = f"import json, sys; from {__name__} import {function}; {call}"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        capture_output=True,
        text=True,
        env=tool_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{function}({job}) exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """The power of n through the two largest sizes: seconds ~ n ** exponent."""
    (n1, t1), (n2, t2) = sorted(zip(sizes, seconds, strict=True))[-2:]
    return math.log(t2 / t1) / math.log(n2 / n1)


def run(opts: Options) -> dict[str, Any]:
    from pipeline.stages.audit import checks

    started, settings = machine(), opts.settings(SETTINGS)
    sizes, exact_sizes = list(settings["sizes"]), list(settings["exact_sizes"])
    results: dict[str, Any] = {"ann_above": checks.ANN_ABOVE, "approximate": {}, "exact": {}, "labels": {}}
    with workdir(opts, NAME) as root:
        files = make_data(root, max(sizes + exact_sizes), settings["dims"])
        for path, key, chosen in (("approximate", 0, sizes), ("exact", _EXACT, exact_sizes)):
            for n in chosen:
                job = {"n": n, "ann_above": key, "embeddings": str(files[0]), "thumbs": str(files[1])}
                job["verify"] = path == "exact" and n in settings["verify_sizes"]
                results[path][n] = _in_fresh_process("_search", job)
    for n in settings["label_sizes"]:
        job = {"n": n, "dims": settings["dims"], "classes": settings["classes"]}
        results["labels"][n] = _in_fresh_process("_labels", job)
    results["pixel_check"] = _pixel_check(results)
    return _payload(opts, started, settings, results)


def _pixel_check(results: dict[str, Any]) -> dict[str, Any]:
    """Seconds per candidate pair of the pixel check, and what it projects to at each approximate size."""
    timed = {n: r for n, r in results["exact"].items() if "verify_seconds" in r}
    per_pair = max(r["verify_seconds"] / max(r["candidates"], 1) for r in timed.values())
    projected = {n: per_pair * r["candidates"] for n, r in results["approximate"].items()}
    return {
        "seconds_per_candidate_pair": per_pair,
        "measured_at": sorted(timed),
        "projected_seconds": projected,
    }


def _payload(opts: Options, started: dict, settings: dict, results: dict[str, Any]) -> dict[str, Any]:
    approximate, exact, labels = results["approximate"], results["exact"], results["labels"]
    sizes = sorted(approximate)
    search = exponent(sizes, [approximate[n]["seconds"] for n in sizes])
    projected = results["pixel_check"]["projected_seconds"]
    total = exponent(sizes, [approximate[n]["seconds"] + projected[n] for n in sizes])
    label_sizes = sorted(labels)
    cpu = exponent(sizes, [approximate[n]["cpu_seconds"] for n in sizes])
    ratios = {"search_exponent": search, "search_cpu_exponent": cpu, "search_and_pixel_check_exponent": total}
    for part in ("k_fold_probe", "cleanlab", "drift"):
        ratios[f"{part}_exponent"] = exponent(label_sizes, [labels[n]["seconds"][part] for n in label_sizes])
    both = sorted(set(sizes) & set(exact))
    if both:
        ratios["exact_vs_approximate_seconds"] = exact[both[-1]]["seconds"] / approximate[both[-1]]["seconds"]
    recall = min(approximate[n][f"recall_{kind}"] for n in sizes for kind in _PLANTED)
    ratios["planted_recall_approximate"] = recall
    targets = {
        "search_exponent": target(search, "<=", 1.15),
        "planted_recall_approximate": target(recall, ">=", 0.95),
    }
    return result(NAME, opts, started, settings, results, ratios, targets)

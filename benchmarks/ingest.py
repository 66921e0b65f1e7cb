"""ingest: images/s and peak memory of the real ingest + validate stages on the 70,000 Fashion-MNIST PNGs,
with 1 and 2 decoding worker processes.

The stages run in this process (`pipeline.stages.<stage>.run`), after one untimed ingest + validate that
warms the page cache and pays the one-time imports (Great Expectations takes seconds), so the figures are the
stages' work; `python -m pipeline <stage>` adds an interpreter start and those imports on top. Runs of the
two worker counts alternate, so a change in machine load hits both alike. Peak memory is sampled over this
process and its decoding workers together, in one more run per worker count: the sampler parses each
process's smaps every 50 ms, CPU that the timed runs would otherwise lose (more so with 2 workers on 2 cores).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Options,
    TreeMemory,
    ensure_fashion_mnist,
    machine,
    median,
    project_params,
    result,
    summary,
    target,
    timed,
    workdir,
)
from pipeline.config import Params
from pipeline.stages import ingest, validate

NAME = "ingest"
SETTINGS = {
    "full": {"workers": [1, 2], "repeats": 3, "params": {}},
    "smoke": {"workers": [1, 2], "repeats": 1, "params": {}},
}
# The Fashion-MNIST export is <root>/{train,test}/<class>/<file>.png: the class is the second folder level.
_SOURCE = {"ingest.source": "folder", "ingest.label_depth": 2}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    data = Path(opts.data) if opts.smoke else ensure_fashion_mnist(opts.data)
    with workdir(opts, NAME) as root:
        params = {
            workers: project_params(root, {"paths.data_root": str(data), **_SOURCE, **settings["params"],
                                           "ingest.num_workers": workers})
            for workers in settings["workers"]
        }  # fmt: skip
        _measure(params[settings["workers"][-1]])  # warm-up: page cache, imports
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in settings["workers"]}
        for _ in range(settings["repeats"]):
            for workers in settings["workers"]:
                runs[workers].append(_measure(params[workers]))
        memory = {workers: _peak_memory(params[workers]) for workers in settings["workers"]}

    results = {f"workers_{w}": {**_aggregate(r), **memory[w]} for w, r in runs.items()}
    results["files"] = runs[settings["workers"][0]][0]["files"]
    low, high = (f"workers_{w}" for w in (min(settings["workers"]), max(settings["workers"])))
    ratios = {
        "speedup_ingest_validate": results[high]["images_per_s"] / results[low]["images_per_s"],
        "speedup_ingest_only": results[high]["ingest_images_per_s"] / results[low]["ingest_images_per_s"],
    }
    # PSS: pages the forked workers share with this process count once, as the kernel allots them.
    peak = max(results[f"workers_{w}"]["peak_pss_mib"] for w in settings["workers"])
    targets = {
        "images_per_s_2_workers": target(results[high]["images_per_s"], ">=", 1000),
        "peak_memory_mib": target(peak, "<=", 1024),
        "speedup_2_vs_1_worker": target(ratios["speedup_ingest_validate"], ">=", 1.7),
    }
    settings.update(data=str(data), source=_SOURCE, cores=os.cpu_count())
    return result(NAME, opts, started, settings, results, ratios, targets)


def _measure(params: Params) -> dict[str, Any]:
    """One timed ingest + validate from scratch, then ingest again: the rows of unchanged files reused."""
    load = os.getloadavg()[0]
    shutil.rmtree(params.paths.cache_dir, ignore_errors=True)  # an earlier run's rows would be reused
    ingest_seconds, metrics = timed(lambda: ingest.run(params))
    validate_seconds, _ = timed(lambda: validate.run(params))
    rerun_seconds, _ = timed(lambda: ingest.run(params))
    return {
        "files": metrics["files_scanned"],
        "ok": metrics["ok"],
        "ingest_seconds": ingest_seconds,
        "validate_seconds": validate_seconds,
        "rerun_ingest_seconds": rerun_seconds,
        "load_average_1min_before": round(load, 2),
    }


def _peak_memory(params: Params) -> dict[str, float]:
    """Peak memory of this process and its workers over one untimed ingest + validate."""
    shutil.rmtree(params.paths.cache_dir, ignore_errors=True)
    with TreeMemory() as memory:
        ingest.run(params)
        validate.run(params)
    return memory.figures()


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    files = runs[0]["files"]
    total = [r["ingest_seconds"] + r["validate_seconds"] for r in runs]
    return {
        "seconds": summary(total),
        "ingest_seconds": summary([r["ingest_seconds"] for r in runs]),
        "validate_seconds": summary([r["validate_seconds"] for r in runs]),
        "images_per_s": files / median(total),
        "ingest_images_per_s": files / median([r["ingest_seconds"] for r in runs]),
        "rerun_ingest_seconds": summary([r["rerun_ingest_seconds"] for r in runs]),  # every row reused
        "ok": runs[0]["ok"],
        "load_average_1min_before": [r["load_average_1min_before"] for r in runs],
    }

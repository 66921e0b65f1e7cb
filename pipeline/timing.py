"""Wall-clock timing of a model runner: median latency, throughput, and two runners timed in turns."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `call` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_BLOCK = 5  # timed calls in a row of one runner in paired_batch1_ms


def paired_batch1_ms(
    first: Callable[[np.ndarray], object],
    second: Callable[[np.ndarray], object],
    inputs: np.ndarray,
    repeats: int,
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of two runners timed in alternating blocks, so that a machine whose load
    drifts slows both alike. Blocks, not single calls: right after one ONNX Runtime session runs, its idle
    threads still spin for a while and slow the other session; each block's first call is untimed."""
    single = np.ascontiguousarray(inputs[:1])
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, -(-repeats // _BLOCK))):
        for run, spent in ((first, times[0]), (second, times[1])):
            run(single)
            for _ in range(_BLOCK):
                start = time.perf_counter()
                run(single)
                spent.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1])


def speed(run: Callable[[np.ndarray], object], inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput at batch 32 (images/s) of `run` on real inputs."""
    batch32 = np.ascontiguousarray(np.resize(inputs, (32, *inputs.shape[1:])))  # cycles through the inputs
    single = np.ascontiguousarray(inputs[:1])
    return {
        "batch1_ms": 1000.0 * median_seconds(lambda: run(single), repeats),
        "batch32_img_per_s": 32.0 / median_seconds(lambda: run(batch32), repeats),
    }

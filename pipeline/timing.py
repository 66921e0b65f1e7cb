"""Wall-clock timing of a model runner: median latency, throughput, two runners timed one after the other."""

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


def adjacent_batch1_ms(
    first: Callable[[np.ndarray], object],
    second: Callable[[np.ndarray], object],
    inputs: np.ndarray,
    repeats: int,
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of two runners timed one right after the other, each after its own warm-up,
    so that a machine whose speed drifts over minutes times both alike. Not call by call in turns: each ONNX
    Runtime session then ran slower right after the other (its threads, its weights out of cache), and the
    default run read a 4.6x INT8 speed-up where separate timings gave 1.7x."""
    single = np.ascontiguousarray(inputs[:1])
    return tuple(1000.0 * median_seconds(lambda run=run: run(single), repeats) for run in (first, second))


def speed(run: Callable[[np.ndarray], object], inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput at batch 32 (images/s) of `run` on real inputs."""
    batch32 = np.ascontiguousarray(np.resize(inputs, (32, *inputs.shape[1:])))  # cycles through the inputs
    single = np.ascontiguousarray(inputs[:1])
    return {
        "batch1_ms": 1000.0 * median_seconds(lambda: run(single), repeats),
        "batch32_img_per_s": 32.0 / median_seconds(lambda: run(batch32), repeats),
    }

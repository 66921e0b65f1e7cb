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
    rounds: int = 3,
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of two runners, timed in blocks one right after the other, each block after
    its own warm-up, in `rounds` rounds with the order swapped each round; each runner's median over rounds.
    Blocks, not call by call in turns: each ONNX Runtime session then ran slower right after the other (its
    threads, its weights out of cache), and the default run read a 4.6x INT8 speed-up where separate timings
    gave 1.7x. Rounds: in one run of the default pipeline FP32 read 1.3 ms where the reruns read 1.7 ms, which
    turned a 1.7-1.8x speed-up into 1.1x and flipped the quantize gate."""
    single = np.ascontiguousarray(inputs[:1])
    runners, times = (first, second), ([], [])
    for round_ in range(rounds):
        for i in (0, 1) if round_ % 2 == 0 else (1, 0):
            times[i].append(1000.0 * median_seconds(lambda run=runners[i]: run(single), repeats))
    return statistics.median(times[0]), statistics.median(times[1])


def speed(run: Callable[[np.ndarray], object], inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput at batch 32 (images/s) of `run` on real inputs."""
    batch32 = np.ascontiguousarray(np.resize(inputs, (32, *inputs.shape[1:])))  # cycles through the inputs
    single = np.ascontiguousarray(inputs[:1])
    return {
        "batch1_ms": 1000.0 * median_seconds(lambda: run(single), repeats),
        "batch32_img_per_s": 32.0 / median_seconds(lambda: run(batch32), repeats),
    }

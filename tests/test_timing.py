"""timing: two runners timed one right after the other, each after its own untimed warm-up (a fake clock)."""

from __future__ import annotations

import numpy as np

from pipeline import timing


def test_adjacent_latency_times_each_runner_after_its_warm_up(monkeypatch):
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def runner(name: str, scale: float):
        """The first 3 calls (warm-up) take 100 x `scale` seconds, the next ones 1, 2, 3, 4, 5 x: counted, the
        warm-up would move the median from 3 to 4.5 x."""

        def run(batch: np.ndarray) -> None:
            assert batch.shape == (1, 3, 4, 4)
            position = calls.count(name)
            now[0] += scale * (100.0 if position < 3 else position - 2)
            calls.append(name)

        return run

    fp32_ms, int8_ms = timing.adjacent_batch1_ms(
        runner("fp32", 0.002), runner("int8", 0.001), np.zeros((3, 3, 4, 4), np.float32), repeats=5
    )
    assert (round(fp32_ms, 6), round(int8_ms, 6)) == (6.0, 3.0)
    assert calls == ["fp32"] * 8 + ["int8"] * 8  # all of one, then all of the other

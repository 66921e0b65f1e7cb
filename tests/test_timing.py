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
        runner("fp32", 0.002), runner("int8", 0.001), np.zeros((3, 3, 4, 4), np.float32), repeats=5, rounds=1
    )
    assert (round(fp32_ms, 6), round(int8_ms, 6)) == (6.0, 3.0)
    assert calls == ["fp32"] * 8 + ["int8"] * 8  # all of one, then all of the other


def test_rounds_swap_the_order_and_a_slow_spell_in_one_block_does_not_decide(monkeypatch):
    now = [0.0]
    blocks: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def runner(name: str, ms: float):
        def run(batch: np.ndarray) -> None:
            if not blocks or blocks[-1] != name:
                blocks.append(name)
            fast_spell = name == "fp32" and len(blocks) == 1  # the first FP32 block runs at 3/4 of its speed
            now[0] += (0.75 if fast_spell else 1.0) * ms / 1000.0

        return run

    fp32_ms, int8_ms = timing.adjacent_batch1_ms(
        runner("fp32", 2.0), runner("int8", 1.0), np.zeros((2, 3, 4, 4), np.float32), repeats=5, rounds=3
    )
    assert blocks == ["fp32", "int8", "fp32", "int8"]  # rounds fp32 int8 | int8 fp32 | fp32 int8
    assert (round(fp32_ms, 6), round(int8_ms, 6)) == (2.0, 1.0)  # one round alone would have read 1.5 ms

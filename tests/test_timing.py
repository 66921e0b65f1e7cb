"""timing: two runners timed in alternating blocks, each block's first call untimed (a fake clock)."""

from __future__ import annotations

import numpy as np

from pipeline import timing


def test_paired_latency_alternates_blocks_and_skips_each_blocks_first_call(monkeypatch):
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def runner(name: str, scale: float):
        """Calls in a block take 1, 2, 3, 4, 5 x `scale` seconds; the block's first call (another session's
        threads still spinning) takes 100 x: counted, it would move the median from 3 to 3.5 x."""

        def run(batch: np.ndarray) -> None:
            assert batch.shape == (1, 3, 4, 4)
            position = 0
            while position < len(calls) and calls[-1 - position] == name:
                position += 1
            now[0] += scale * (100.0 if position == 0 else position)
            calls.append(name)

        return run

    fp32_ms, int8_ms = timing.paired_batch1_ms(
        runner("fp32", 0.002), runner("int8", 0.001), np.zeros((3, 3, 4, 4), np.float32), repeats=10
    )
    assert (round(fp32_ms, 6), round(int8_ms, 6)) == (6.0, 3.0)
    assert calls == (["fp32"] * 6 + ["int8"] * 6) * 2  # 2 blocks each of 1 untimed + 5 timed calls

"""Progress lines of long passes when stderr is no terminal: at the interval, with done/total, rate, ETA."""

from __future__ import annotations

import io
import sys

import pytest

from pipeline import progress as progress_module
from pipeline.progress import Progress, progress, progress_line


class _Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(steps: list[tuple[float, int]], total: int, interval: float = 10.0) -> list[str]:
    """Lines written for `steps` of (seconds elapsed since the last step, items done in it), then close."""
    clock, lines = _Clock(), []
    with Progress("features", total, "img", interval=interval, clock=clock, write=lines.append) as bar:
        for seconds, done in steps:
            clock.now += seconds
            bar.update(done)
    return lines


def test_a_line_each_interval_with_done_total_rate_and_eta():
    # 100 images, 4 per second: 1 s per update of 4 images, 25 updates.
    lines = _run([(1.0, 4)] * 25, total=100)
    assert lines[0] == "features: 40/100 img (40%), 4 img/s, ETA 15 s"
    assert lines[1] == "features: 80/100 img (80%), 4 img/s, ETA 5 s"
    assert lines[2] == "features: 100/100 img (100%), 4 img/s, done in 25 s"
    assert len(lines) == 3


def test_no_flood_however_many_updates_and_nothing_for_a_short_pass():
    many = _run([(0.0625, 1)] * 1600, total=1600)  # 100 s in 1,600 updates
    assert len(many) == 10, "one line per 10 s; the last one (at 100 s) is the closing line"
    assert many[-1].endswith("done in 1 min 40 s")
    assert len(_run([(0.0625, 1)] * 1601, total=1601)) == 11, "the closing line when the last one was earlier"
    assert _run([(0.5, 1)] * 19, total=19) == [], "a pass shorter than the interval prints nothing"


def test_a_slow_start_reports_at_the_first_update_after_the_interval():
    lines = _run([(25.0, 1), (1.0, 1)], total=10)
    assert lines[0] == "features: 1/10 img (10%), 0.04 img/s, ETA 3 min 45 s"  # 9 left at 1 per 25 s


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        (0, 10, 30.0, "x: 0/10 file (0%), 0 file/s, ETA unknown"),
        (1, 1000, 7.5, "x: 1/1000 file (0%), 0.133 file/s, ETA 2 h 04 min"),
        (3, 0, 1.0, "x: 3/0 file, 3 file/s, done in 1 s"),
        (36_034, 70_000, 2.0, "x: 36034/70000 file (51%), 18017 file/s, ETA 2 s"),
        (1999, 4000, 2.0, "x: 1999/4000 file (50%), 1000 file/s, ETA 2 s"),
    ],
)
def test_line_edge_cases(done, total, elapsed, expected):
    assert progress_line("x", done, total, "file", elapsed) == expected


def test_without_a_terminal_progress_writes_lines_through_the_log(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or file: no terminal
    monkeypatch.setattr(progress_module, "INTERVAL_S", 0.0)
    with caplog.at_level("INFO", logger="pipeline.progress"), progress("ingest", 2, "file") as bar:
        assert isinstance(bar, Progress)
        bar.update(1)
        bar.update(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "ingest: 1/2 file (50%)",
        "ingest: 2/2 file (100%)",
    ]
    with progress("other rank", 2, "file", enabled=False) as silent:
        assert not isinstance(silent, Progress) and silent.disable

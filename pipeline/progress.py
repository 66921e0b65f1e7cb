"""Progress of long passes (decoding, feature extraction, epochs, evaluation).

On a terminal: a tqdm bar. Elsewhere (`dvc repro` under the Prefect flow, a log file, CI), where a bar would
be one unreadable line or nothing: a log line every `INTERVAL_S` seconds with done/total, rate and ETA, so a
long pass never looks like a hang, and a short one prints nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

log = logging.getLogger(__name__)

INTERVAL_S = 10.0


def progress(desc: str, total: int, unit: str, enabled: bool = True) -> tqdm | Progress:
    """A tqdm bar when stderr is a terminal, else timed `Progress` lines; silent when not `enabled` (e.g. on
    the ranks of a distributed run other than the first). Use as a context manager, calling `update(n)`."""
    if not enabled or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
    return Progress(desc, total, unit)


class Progress:
    """Counts `update(n)` calls against `total` and writes a line through `write` once at least `interval`
    seconds of `clock` have passed since the last (and a closing line if it wrote any)."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = log.info,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.interval = INTERVAL_S if interval is None else interval
        self._clock, self._write = clock, write
        self.done, self.lines, self._shown = 0, 0, 0  # _shown: `done` in the last line
        self._start = self._last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def close(self) -> None:
        if self.lines and self._shown != self.done:
            self._emit(self._clock())

    def _emit(self, now: float) -> None:
        self.lines, self._shown = self.lines + 1, self.done
        self._write(progress_line(self.desc, self.done, self.total, self.unit, now - self._start))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def progress_line(desc: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """'epoch 3/11 train: 20/38 batch (53%), 1.9 batch/s, ETA 9 s'; 'done in' instead of an ETA at the end."""
    rate = done / elapsed if elapsed > 0 else 0.0
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    if done >= total:
        when = f"done in {_duration(elapsed)}"
    else:
        when = f"ETA {_duration((total - done) / rate)}" if rate > 0 else "ETA unknown"
    shown = f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"  # 0.04, 4, 57.1, 999, 18017
    return f"{desc}: {done}/{total} {unit}{percent}, {shown} {unit}/s, {when}"


def _duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

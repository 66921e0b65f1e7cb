"""DVC in the flow's own process: reproduce one stage, pull, push and track a folder through DVC's Python API.

One `dvc` process per stage cost about 0.7 s of start-up each; the API costs about 0.1 s a stage once DVC is
imported. DVC's log and the output of the stage commands it starts (they inherit file descriptors 1 and 2) are
captured into one text, in order, which the flow logs and quotes when a call fails.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")
# Failures worth a retry: another DVC process holds the repo lock, or the OS reported a passing I/O fault.
# Anything else (a PipelineError about bad data, a bug) fails at once: a retry would fail the same way.
_TRANSIENT_MARKERS = (
    "Unable to acquire lock",
    "Resource temporarily unavailable",
    "Device or resource busy",
    "Stale file handle",
    "Input/output error",
    "Connection reset",
    "Interrupted system call",
)
_OUTPUT_TAIL = 4000


class DvcFailed(RuntimeError):
    """A DVC call (a stage's reproduction, a push, `exp save`) failed; the message ends with its output."""


class TransientDvcFailure(DvcFailed):
    """A failure that a retry may cure (lock contention, passing I/O fault)."""


def failure(action: str, detail: str, output: str) -> DvcFailed:
    """DvcFailed, or TransientDvcFailure when the text names a passing fault; ends with the output's tail."""
    message = f"dvc {action} failed: {detail}\n{output[-_OUTPUT_TAIL:]}"
    transient = any(marker in message for marker in _TRANSIENT_MARKERS)
    return (TransientDvcFailure if transient else DvcFailed)(message)


def call(project: Path, action: str, work: Callable[[Any], T]) -> tuple[T, str]:
    """`work(repo)` on the DVC repo at `project`; returns its result and the captured output.

    Raises DvcFailed (TransientDvcFailure when a retry may cure it) on any DVC error, a stage command's
    non-zero exit included.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with tempfile.TemporaryFile() as sink:
        try:
            with _captured(sink), _inside(project), Repo(str(project)) as repo:
                result = work(repo)
        except DvcException as exc:
            raise failure(action, _reasons(exc), _read(sink)) from None
        return result, _read(sink)


def reproduce(repo: Any, stage: str, pull: bool) -> str:
    """Reproduce one stage (`dvc repro --single-item`); with `pull`, fetch what a run-cache restore needs.
    Returns ran, restored (outputs of an identical earlier run, from the run cache) or unchanged."""
    # Stage commands are `python -m pipeline ...`: make `python` this environment's interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    target = f"{Path(repo.root_dir) / 'dvc.yaml'}:{stage}"
    messages = _DvcLog()
    with messages.listening():
        changed = repo.reproduce(target, single_item=True, pull=pull, run_env={"PATH": path})
    if any(text.startswith("Running stage") for text in messages.texts):
        return "ran"
    return "restored" if changed else "unchanged"


def require_remote(repo: Any) -> str:
    """The default remote's name; a PipelineError when there is none."""
    name = repo.config["core"].get("remote")
    if not name:
        raise PipelineError(
            f"{repo.root_dir}: orchestrate.push is true but DVC has no default remote; add one with "
            "`dvc remote add -d <name> <url>` (docs/teams.md) or set "
            "orchestrate.push: false"
        )
    return name


def pull(repo: Any) -> dict[str, Any]:
    """Fetch and check out what the remote holds for this commit (data, outputs in dvc.lock, run cache).
    Objects the remote lacks are skipped: the stages that need them run (or restore) instead."""
    from dvc.exceptions import DownloadError

    try:
        return repo.pull(run_cache=True, allow_missing=True)
    except DownloadError as exc:  # e.g. the first run against an empty remote
        logging.getLogger(__name__).warning("pull: %s; stages whose outputs are missing will run", exc)
        return {"fetched": 0, "missing": exc.amount}


def push(repo: Any) -> int:
    """Push the workspace's outputs, the run cache and the outputs its entries name. Returns files pushed.

    `dvc push --run-cache` uploads the run-cache entries but not the `cache: false` outputs they name
    (metrics, plots); without those another machine cannot restore a stage from the run cache."""
    from dvc.stage.cache import _get_stage_hash

    pushed = repo.push(run_cache=True)
    entries = []
    for stage in repo.index.stages:
        if stage.cmd and _hashable(stage):
            key = _get_stage_hash(stage)
            folder = Path(repo.stage_cache._get_cache_dir(key))
            entries += [(key, value.name) for value in folder.iterdir()] if folder.is_dir() else []
    for objects in repo.stage_cache.get_used_objs(entries).values():
        pushed += len(repo.cloud.push(objects).transferred)
    return pushed


def _hashable(stage: Any) -> bool:
    """DVC's `_can_hash`, False where a dependency is missing (a run of the first stages only: the later
    ones never ran here and have no run-cache entry to push)."""
    from dvc.stage.cache import _can_hash

    try:
        return _can_hash(stage)
    except FileNotFoundError:
        return False


class _DvcLog(logging.Handler):
    """Collects the messages DVC logs while listening (to tell a run from a run-cache restore)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())

    @contextmanager
    def listening(self) -> Iterator[None]:
        logger = logging.getLogger("dvc")
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)


# DVC's loggers: `import dvc` gives each handlers bound to the sys.stdout and sys.stderr of that moment.
_DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")


@contextmanager
def _captured(sink: IO[bytes]) -> Iterator[None]:
    """File descriptors 1 and 2, which the commands DVC starts inherit, and DVC's log all go to `sink`.
    DVC's own handlers write to the streams they found at import (closed by now, when a caller had swapped
    sys.stdout then, and DVC raises on a failed log line), so they are swapped out meanwhile."""
    loggers = [logging.getLogger(name) for name in _DVC_LOGGERS]
    stream = open(os.dup(sink.fileno()), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_handlers = [(logger.handlers[:], logger.level) for logger in loggers]
    for stream_ in (sys.stdout, sys.stderr):
        stream_.flush()
    saved = [os.dup(1), os.dup(2)]
    for logger in loggers:
        logger.handlers, logger.level = [handler], logging.INFO
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        for stream_ in (sys.stdout, sys.stderr):
            stream_.flush()
        for fd, original in zip((1, 2), saved, strict=True):
            os.dup2(original, fd)
            os.close(original)
        for logger, (handlers, level) in zip(loggers, saved_handlers, strict=True):
            logger.handlers, logger.level = handlers, level
        handler.close()


@contextmanager
def _inside(project: Path) -> Iterator[None]:
    """The project as working directory, as under the `dvc` command: parts of DVC resolve paths against it."""
    previous = os.getcwd()
    os.chdir(project)
    try:
        yield
    finally:
        os.chdir(previous)


def _read(sink: IO[bytes]) -> str:
    sink.seek(0)
    return sink.read().decode("utf-8", errors="replace").strip()


def _reasons(exc: BaseException) -> str:
    """An exception and its causes, outermost first (DVC wraps a failed stage command in its own error)."""
    reasons = []
    while exc is not None:
        reasons.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "; ".join(dict.fromkeys(reason for reason in reasons if reason))

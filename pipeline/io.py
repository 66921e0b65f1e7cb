"""Atomic file output: every artifact is written to a temp file beside it and renamed into place,
so a crash mid-stage leaves the previous version intact (and a later write removes the dead run's temp)."""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `target` atomically.

    Use for writers that want a filename (torch.save, onnx.save, matplotlib, pandas).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=_temp_prefix(target), suffix=suffix or target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _full_disk_names(target, tmp):
            yield tmp
            tmp.chmod(0o644)  # mkstemp creates 0600; artifacts are meant to be shared
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces the `target` folder as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        with _full_disk_names(target, tmp):
            yield tmp
            tmp.chmod(0o755)  # mkdtemp creates 0700
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder named for `target` in its parent, for files a stage needs only while it
    runs (arrays too large for memory), removed on exit; a killed run's is removed by the next
    (`_remove_dead_temps`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _full_disk_names(target: Path, tmp: Path) -> Iterator[None]:
    """A full disk met while writing `tmp` is reported as writing `target`: a write() names no file, and the
    temp name means nothing to the user."""
    try:
        yield
    except OSError as exc:
        named = exc.filename is None or str(exc.filename).startswith(str(tmp))
        if exc.errno != errno.ENOSPC or not named:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc


@functools.cache
def _owner() -> str:
    """This machine and PID namespace: a pid names a process only within one (containers share disks). Both
    outlive a process (a fork keeps them), so they are read once."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")  # 'pid:[4026531836]'
    except OSError:  # not Linux
        namespace = "0"
    return f"{socket.gethostname()}~{namespace}"


def _temp_prefix(target: Path) -> str:
    """`.<name>.<host>~<pid namespace>~<pid>.`: a temp name that says which process writes it."""
    return f".{target.name}.{_owner()}~{os.getpid()}."


def _remove_dead_temps(target: Path) -> None:
    """Remove temp files and folders of `target` left by runs that were killed mid-write.

    The rule cannot delete a live writer's temp: only names of this machine and PID namespace are judged, and
    only those whose pid no longer exists are removed. A reused pid errs the safe way (the leftover stays
    until that process ends). Age is no test (a concurrent writer started before us owns an older temp), so
    names without an owner (`.<name>.old`, temps from before this scheme) are left alone.
    """
    owned = re.compile(rf"\.{re.escape(target.name)}\.{re.escape(_owner())}~(\d+)\.")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = owned.match(leftover.name)
        if match and not _alive(int(match[1])):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: Path | str, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json(target: Path | str, payload: Any) -> Path:
    """The one JSON writer for metrics and metadata: sorted keys, stable formatting, trailing newline."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(source: Path | str) -> Any:
    return json.loads(Path(source).read_text(encoding="utf-8"))


def read_optional_json(source: Path | str) -> Any:
    """A JSON file's content, or None when there is no such file (a stage that has not run, no champion)."""
    return read_json(source) if Path(source).is_file() else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")

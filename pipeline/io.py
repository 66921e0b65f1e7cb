"""Atomic file output: every artifact is written to a temp file beside it and renamed into place,
so a crash mid-stage leaves the previous version intact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")

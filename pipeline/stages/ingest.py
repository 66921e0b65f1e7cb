"""Stage: ingest. Find every candidate image in the data source, hash and decode it (within a memory budget),
write the manifest.

The manifest has one row per candidate (usable or not, with the reason), sorted by path and free of
timestamps, so the same input gives a byte-identical file. Files are inspected in a process pool and rows
are streamed to disk in path order, so memory stays flat however many images there are. Sources are only read.

Each image is decoded once in the whole pipeline: the decode that proves a file whole is made at the scale the
image cache needs (`model.backbone`, `model.image_size`, `model.crop_pct`), and the square the audit and train
stages read is put into the cache from it (`cache.Prefill`). Those params only warm a content-addressed cache,
so they are not the stage's DVC params: after a change of them, train decodes the images it lacks itself.

Each task's rows are kept under `paths.cache_dir`/ingest-<source>/ (`_Chunks`), keyed by its files' paths,
labels and stat (size, mtime, ctime, inode) and by the inspection code and settings: a killed ingest resumes
from its finished tasks, and a re-run after new images arrived inspects only the tasks they fall in, since a
task ends where a path's hash says (`task_ranges`), not after a count of files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import multiprocessing
import os
import shlex
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import NO_CSV_MANIFEST, IngestParams, ModelParams, Params, PathsParams
from pipeline.data import cache, images
from pipeline.data.labels import LabelSets
from pipeline.data.labels import parse as labels_of
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json, write_text
from pipeline.progress import progress
from pipeline.stages import Stage

STAGE = Stage(
    summary="Scan the data source, hash and decode every image (in bounded memory), write the manifest.",
    params=("ingest", "base.task", "base.label_separator", "paths.data_root", "paths.csv_manifest"),
    deps=("data_root", "csv_manifest"),  # csv_manifest: pipeline/data/no_csv_manifest.csv (empty) for none
    outs=("manifest", "details:ingest"),
    warms=("model",),
)

log = logging.getLogger(__name__)


def _scan_tree(ingest: IngestParams, paths: PathsParams, separator: str, presplit: bool) -> images.Scan:
    return images.scan_tree(
        paths.data_root,
        ingest.extensions,
        follow_symlinks_inside_root=ingest.follow_symlinks_inside_root,
        label_depth=ingest.label_depth,
        presplit=presplit,
        separator=separator,
    )


def _read_listing(ingest: IngestParams, paths: PathsParams, separator: str) -> images.Scan:
    """The CSV manifest's candidates; the rows that repeat an earlier row are ignored with a warning."""
    listing = paths.csv_manifest
    scan = images.read_listing(paths.data_root, listing, ingest.follow_symlinks_inside_root, separator)
    if scan.repeated_rows:
        lines = images.first_few([str(line) for line in scan.repeated_rows])
        log.warning(
            "ingest: %s: ignored %d row(s) that repeat an earlier row (same file, label and split), on "
            "line(s) %s; delete them to silence this",
            listing,
            len(scan.repeated_rows),
            lines,
        )
    return scan


# Each source's candidates from (ingest, paths, separator: the multilabel task's label separator, or "").
_SOURCES: dict[str, Callable[[IngestParams, PathsParams, str], images.Scan]] = {
    "folder": lambda ingest, paths, separator: _scan_tree(ingest, paths, separator, presplit=False),
    "presplit": lambda ingest, paths, separator: _scan_tree(ingest, paths, separator, presplit=True),
    "csv": _read_listing,
}


def run(params: Params) -> dict:
    source = check_inputs(params.ingest, params.paths)
    separator = LabelSets.of(params.base.task, params.base.label_separator).separator
    data_config = _cache_config(params.model, params.paths.cache_dir)
    metrics, details = _scan_and_inspect(params.ingest, params.paths, source, separator, data_config)
    details["source"] = source
    write_json(params.paths.details("ingest"), details)
    write_json(params.paths.metrics("ingest"), metrics)
    if over := details["status"].get("over_memory_budget"):
        log.warning(
            "ingest: %d image(s) need more than ingest.max_decode_mib = %d MiB to decode: status "
            "over_memory_budget in %s (with their width, height and mode); raise ingest.max_decode_mib or "
            "downscale them",
            over,
            params.ingest.max_decode_mib,
            params.paths.manifest,
        )
    _warn_notes(details["notes"], params.paths.details("ingest"))
    log.info(
        "ingest: %d of %d files usable (%s); manifest %s, details %s",
        metrics["ok"],
        metrics["files_scanned"],
        source,
        params.paths.manifest,
        params.paths.details("ingest"),
    )
    return {"source": source, **metrics}


def _warn_notes(notes: dict[str, list[str]], details: Path) -> None:
    """One warning per kind of note (`images.NOTES`): images used, but not quite as a viewer shows them."""
    for kind, paths in notes.items():
        shown = images.first_few([repr(path) for path in paths])
        log.warning("ingest: %d image(s) %s: %s (all in %s)", len(paths), images.NOTES[kind], shown, details)


def _cache_config(model: ModelParams, cache_dir: Path) -> dict[str, Any] | None:
    """The preprocessing whose squares ingest puts into the image cache; None (and no squares) when
    `model.backbone` gives none, which `python -m pipeline check` and the train stage report. Resolving it
    imports timm and torch (2.5 s, a tenth of ingesting 2,000 camera photos, and 400 MB each worker would
    inherit), so it is remembered under `cache_dir`, keyed by the model params and timm's version."""
    settings = [model.backbone, model.image_size, model.crop_pct, importlib.metadata.version("timm")]
    name = hashlib.blake2b(json.dumps(settings).encode(), digest_size=8).hexdigest()
    memo = cache_dir / "data-configs" / f"{name}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(memo.read_text(encoding="utf-8"))
    from pipeline.models import resolve_data_config

    try:
        config = resolve_data_config(model)
    except PipelineError:
        return None
    with contextlib.suppress(OSError):  # not remembered: the next run resolves it again
        write_json(memo, config)
    return config


def _scan_and_inspect(
    ingest: IngestParams, paths: PathsParams, source: str, separator: str, data_config: dict[str, Any] | None
) -> tuple[dict, dict]:
    """Find the candidates, write the manifest; its headline figures (metrics) and the rest (details).
    `separator`: a multilabel task's label separator, else "". With `data_config`, each usable image's
    cached square is made from the decode that proves it whole."""
    scan = _SOURCES[source](ingest, paths, separator)
    if all(c.status == "empty_class_folder" for c in scan.candidates):
        raise PipelineError(
            f"paths.data_root: no image files under {paths.data_root} (skipped {scan.skipped_hidden} "
            f"hidden and {scan.skipped_non_image} non-image entries; ingest.extensions = "
            f"{ingest.extensions}); put images in one folder per class"
        )

    started = time.perf_counter()
    statuses: Counter[str] = Counter()
    labels: set[str] = set()
    notes: dict[str, list[str]] = {}
    total = len(scan.candidates)
    ranges = task_ranges(scan.candidates, files_per_task(total, ingest.chunksize, ingest.num_workers))
    chunks = _Chunks.of(ingest, paths)
    used, reused = set(), 0
    inspector = _inspector(ingest, paths.data_root, scan.candidates, chunks, data_config)
    prefill = None if data_config is None else cache.Prefill(paths.cache_dir, data_config)
    with atomic_path(paths.manifest) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh, inspector as imap:
            csv.writer(fh, lineterminator="\n").writerow(images.MANIFEST_COLUMNS)
            with progress("ingest", total, "file") as bar:
                for key, found, (text, counts, usable_labels, noted), squares in imap(_inspect_range, ranges):
                    fh.write(text)
                    if prefill is not None and squares is not None:
                        prefill.add(*squares)
                    statuses.update(counts)
                    labels |= usable_labels
                    for kind, noted_paths in noted.items():
                        notes.setdefault(kind, []).extend(noted_paths)
                    bar.update(counts.total())
                    used.add(key)
                    reused += counts.total() if found else 0
    if prefill is not None:
        prefill.close()
    chunks.keep_only(used)
    seconds = time.perf_counter() - started
    if reused:
        log.info("ingest: %d of %d files' rows reused from an earlier run (%s)", reused, total, chunks.folder)

    files = total - statuses["empty_class_folder"]
    metrics = {
        "files_scanned": files,
        "ok": statuses["ok"],
        "seconds": round(seconds, 3),
        "images_per_second": round(files / seconds, 1) if seconds > 0 else 0.0,
    }
    details = {
        "manifest_rows": total,
        "status": dict(sorted(statuses.items())),
        "skipped_hidden": scan.skipped_hidden,
        "skipped_non_image": scan.skipped_non_image,
        "repeated_csv_rows": len(scan.repeated_rows),
        "classes": len({name for cell in labels for name in labels_of(cell, separator)}),
        "rows_reused": reused,  # from an earlier run's finished tasks (_Chunks)
        "squares_cached": 0 if prefill is None else prefill.added,  # into the image cache: train, audit
        "notes": dict(sorted(notes.items())),  # images.NOTES kind -> the usable images it applies to
    }
    return metrics, details


def files_per_task(total: int, chunksize: int, workers: int) -> int:
    """Files per task: `chunksize` at most, since each task costs the parent about 0.5 ms (70,000 files:
    256 -> 1,024 took the parent's CPU from 0.39 to 0.29 s), and small enough for 4 tasks per worker, so a
    small set of slow files still spreads over every worker."""
    return max(1, min(chunksize, math.ceil(total / (4 * max(workers, 1)))))


def task_ranges(candidates: list[images.Candidate], most: int) -> list[tuple[int, int]]:
    """(start, stop) of each task: a task ends after a path whose hash is 0 modulo `most` // 2, or at `most`
    files. Ends set by the paths themselves, not by a count, make a new or deleted file change the task it
    falls in and no other (a cut forced at `most` moves only up to the next hash-set end), so a re-run reuses
    every other task's rows (`_Chunks`). Tasks average `most` // 2 files or a little under."""
    period = max(1, most // 2)
    ranges, start = [], 0
    for i, candidate in enumerate(candidates):
        if zlib.crc32(candidate.path.encode()) % period == 0 or i + 1 - start >= most:
            ranges.append((start, i + 1))
            start = i + 1
    if start < len(candidates):
        ranges.append((start, len(candidates)))
    return ranges


def check_inputs(ingest: IngestParams, paths: PathsParams, for_dvc: bool = False) -> str:
    """The source ingest will read (folder, presplit or csv), once its input paths are checked: raises a
    PipelineError with one line per problem. `python -m pipeline check` runs this before `dvc repro` with
    `for_dvc`, which adds the checks of `check_dvc_inputs`."""
    problems = _path_problems(paths, Path("."), for_dvc)
    if problems:
        raise PipelineError("\n".join(problems))
    return _resolve_source(ingest, paths)


def check_dvc_inputs(paths: PathsParams, project: Path = Path(".")) -> None:
    """Raise a PipelineError, one line per problem, on the inputs that make `dvc repro` fail before ingest
    runs with a bare `[Errno 2]`: a data_root or CSV manifest that is not there (the NO_CSV_MANIFEST
    placeholder included: DVC reads it), and entries of the data folder DVC cannot hash. Paths are relative to
    `project`, the folder of params.yaml. The flow runs this at its start; the source settings are ingest's
    to report."""
    problems = _path_problems(paths, project, for_dvc=True)
    if problems:
        raise PipelineError("\n".join(problems))


def _path_problems(paths: PathsParams, project: Path, for_dvc: bool) -> list[str]:
    root, listing = project / paths.data_root, project / paths.csv_manifest
    placeholder = paths.csv_listing is None
    problems = []
    if not root.is_dir():
        what = "it is a file" if root.exists() else "it does not exist"
        problems.append(
            f"paths.data_root: {root} is not a folder ({what}); set it in params.yaml (relative to the "
            "project folder) to the folder of your images: <class>/<image>, or train/ val/ [test/] of classes"
        )
    elif for_dvc:
        problems += _dvc_blockers(root)
    if (for_dvc or not placeholder) and not listing.is_file():
        fix = (
            f"restore this placeholder for 'no CSV manifest' (git checkout -- {listing})"
            if placeholder
            else f"fix it in params.yaml (relative to the project folder), or set it to {NO_CSV_MANIFEST}"
        )
        problems.append(f"paths.csv_manifest: {listing} is not a file; {fix}")
    return problems


def _dvc_blockers(root: Path) -> list[str]:
    """One line per kind of entry under `root` that DVC cannot hash, naming the first few and what to do.
    Ingest run by itself lists them in the manifest (`broken_symlink`, `non_utf8_name`)."""
    dangling, non_utf8, special = images.dvc_blockers(root)
    where = shlex.quote(str(root))
    problems = []
    if dangling:
        named = images.first_few([repr(path) for path in dangling])
        problems.append(
            f"paths.data_root: {len(dangling)} dangling symbolic link(s) under {root}, which DVC cannot "
            f"hash: {named}; delete them (find {where} -xtype l -delete) or replace each with a copy of its "
            "target"
        )
    if non_utf8:
        named = images.first_few([repr(os.fsencode(path))[1:] for path in non_utf8])  # 'bad\xff.png'
        problems.append(
            f"paths.data_root: {len(non_utf8)} name(s) under {root} are not valid UTF-8, which DVC cannot "
            f"hash: {named}; rename them to UTF-8 (e.g. convmv -r -f latin1 -t utf-8 --notest {where}) or "
            "remove them"
        )
    if special:
        them = "it" if len(special) == 1 else "them"
        problems.append(
            f"paths.data_root: {len(special)} FIFO(s), socket(s) or device(s) under {root}, which DVC cannot "
            f"hash (reading a FIFO or a device never ends): {images.first_few(special)}; remove {them} or "
            f"move {them} out of paths.data_root"
        )
    return problems


def _resolve_source(ingest: IngestParams, paths: PathsParams) -> str:
    """`auto`: a CSV manifest when one is set, pre-split when train/ and val/ exist, else class folders."""
    source, root = ingest.source, paths.data_root
    if source == "csv" and paths.csv_listing is None:
        raise PipelineError("ingest.source is csv but paths.csv_manifest is not set; set it to your CSV file")
    if source == "presplit" and not images.has_presplit_layout(root):
        raise PipelineError(
            f"ingest.source is presplit but {root} has no train/ and val/ (or valid/, validation/) folders; "
            "set ingest.source: auto or folder"
        )
    if source != "auto":
        return source
    if paths.csv_listing is not None:
        return "csv"
    return "presplit" if images.has_presplit_layout(root) else "folder"


class _Chunks:
    """Finished tasks' results, one JSON file each in `folder` (a folder per data root, under
    `paths.cache_dir`), named by a digest of the task's candidates, their files' stat and `code`, the
    inspection settings and code (images.py): the same files unchanged give the same name. Rows are
    trusted while a file's size, mtime, ctime and inode stay the same, as DVC's own state does. Files are
    written whole (renamed into place), so a kill loses at most the tasks under way."""

    def __init__(self, folder: Path, code: str):
        self.folder, self.code = folder, code

    @classmethod
    def of(cls, ingest: IngestParams, paths: PathsParams) -> _Chunks:
        root = str(paths.data_root.resolve())
        folder = paths.cache_dir / f"ingest-{hashlib.blake2b(root.encode(), digest_size=8).hexdigest()}"
        settings = [ingest.max_decode_pixels, ingest.max_decode_mib, images.READ_WHOLE_LIMIT, _CHUNK_FORMAT]
        code = hashlib.blake2b(Path(images.__file__).read_bytes(), digest_size=16)
        code.update(json.dumps(settings).encode())
        return cls(folder, code.hexdigest())

    def key(self, root: str, candidates: list[images.Candidate]) -> str:
        digest = hashlib.blake2b(self.code.encode(), digest_size=16)
        for candidate in candidates:
            try:
                st = os.stat(os.path.join(root, candidate.path))
                stat = f"{st.st_size},{st.st_mtime_ns},{st.st_ctime_ns},{st.st_ino},{st.st_mode}"
            except OSError as error:
                stat = f"error {error.errno}"
            fields = (candidate.path, candidate.label, candidate.split, candidate.status, stat)
            digest.update(json.dumps(fields).encode())
        return digest.hexdigest()

    def load(self, key: str) -> _Result | None:
        try:
            stored = (self.folder / f"{key}.json").read_text(encoding="utf-8")
            text, counts, labels, noted = json.loads(stored)
        except (OSError, ValueError, TypeError):
            return None  # not there yet, or unreadable: inspected again
        return text, Counter(counts), set(labels), noted

    def save(self, key: str, result: _Result) -> None:
        text, counts, labels, noted = result
        with contextlib.suppress(OSError):  # a cache that cannot be written costs a re-run, not this one
            write_text(self.folder / f"{key}.json", json.dumps([text, counts, sorted(labels), noted]))

    def keep_only(self, keys: set[str]) -> None:
        """Delete the results of tasks this run did not have (files since changed, moved or deleted)."""
        for stale in self.folder.glob("[!.]*.json") if self.folder.is_dir() else ():  # not a writer's temp
            if stale.stem not in keys:
                stale.unlink(missing_ok=True)


_CHUNK_FORMAT = 1  # bump when a task's stored result changes shape
_Result = tuple[str, Counter[str], set[str], dict[str, list[str]]]

# Set by _start_inspector in each decoding process (in this one for `ingest.num_workers: 0`): the candidates
# travel once per worker, a task is only a (start, stop) range, and what comes back is finished CSV text, so
# the parent's share per file is nearly nothing and 2 workers use 2 cores.
_INSPECTOR: dict[str, Any] = {}


def _start_inspector(
    root: str,
    max_decode_pixels: int,
    max_decode_bytes: int,
    candidates: list[images.Candidate],
    chunks: _Chunks,
    data_config: dict[str, Any] | None,
) -> None:
    _INSPECTOR.update(
        root=root,
        max_decode_pixels=max_decode_pixels,
        max_decode_bytes=max_decode_bytes,
        candidates=candidates,
        chunks=chunks,
        data_config=data_config,
    )


_Squares = tuple[list[str], np.ndarray]  # the images' cache identities, their squares (n, 3, side, side)


def _inspect_range(bounds: tuple[int, int]) -> tuple[str, bool, _Result, _Squares | None]:
    """The key of candidates[start:stop] (`_Chunks.key`), whether an earlier run's result was found, the
    result: their manifest rows as CSV text, with their status counts, usable labels and the paths of each
    kind of note (`images.NOTES`); and the cached squares of the usable ones (None when the result was
    found, or no data config was given). A task's squares take up to chunksize x 3 x side^2 bytes (1,024
    images at 160 px: 100 MB)."""
    candidates, chunks = _INSPECTOR["candidates"][slice(*bounds)], _INSPECTOR["chunks"]
    key = chunks.key(_INSPECTOR["root"], candidates)
    if (found := chunks.load(key)) is not None:
        return key, True, found, None
    data_config = _INSPECTOR["data_config"]
    keep_side = None if data_config is None else cache.cache_side(data_config)
    names: list[str] = []
    squares: list[np.ndarray] = []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    statuses: Counter[str] = Counter()
    labels: set[str] = set()
    noted: dict[str, list[str]] = {}
    for candidate in candidates:
        row = images.inspect(
            _INSPECTOR["root"],
            _INSPECTOR["max_decode_pixels"],
            candidate,
            max_decode_bytes=_INSPECTOR["max_decode_bytes"],
            keep_side=keep_side,
        )
        if (reduced := row.pop("reduced", None)) is not None:
            squares.append(cache.square_of(reduced, data_config))
            names.append(cache.identity(candidate.path, str(row["sha256"])))
        writer.writerow([row[column] for column in images.MANIFEST_COLUMNS])
        statuses[row["status"]] += 1
        if row["status"] == "ok":
            labels.add(row["label"])
        for kind in row.get("notes", ()):
            noted.setdefault(kind, []).append(candidate.path)
    result = (buffer.getvalue(), statuses, labels, noted)
    chunks.save(key, result)
    return key, False, result, (names, np.stack(squares)) if squares else None


@contextlib.contextmanager
def _inspector(
    ingest: IngestParams,
    root: Path,
    candidates: list[images.Candidate],
    chunks: _Chunks,
    data_config: dict[str, Any] | None,
) -> Iterator[Callable]:
    """An ordered lazy map for _inspect_range over the candidates under `root`: in this process for
    `ingest.num_workers: 0`, else over a process pool whose workers get the candidates once, when they
    start."""
    budget = ingest.max_decode_mib * images.MIB
    settings = (str(root), ingest.max_decode_pixels, budget, candidates, chunks, data_config)
    if ingest.num_workers == 0:
        _start_inspector(*settings)
        try:
            yield map
        finally:
            _INSPECTOR.clear()
        return
    with multiprocessing.Pool(ingest.num_workers, _start_inspector, settings) as pool:
        yield pool.imap

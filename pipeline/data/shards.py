"""Rows keyed by content, on disk in shards written once: the store under the image and feature caches.

A store is a folder of shards. A shard is two `.npy` files never changed once written: `<name>.rows.npy`,
its rows (n, *row), then `<name>.keys.npy`, their (n,) 16-byte keys, each written atomically and the keys
last, so a shard exists only once complete: a kill keeps every finished shard and loses at most the one
being written. The index is every key with its shard and row, as numpy arrays sorted by key (24 bytes a row:
24 MB at a million), read from the keys files alone; rows are read by index, never loaded whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from pipeline.io import atomic_path

KEY = np.dtype("S16")  # a blake2b digest of 16 bytes: no collision in 2^64 rows

_ROWS, _KEYS = ".rows.npy", ".keys.npy"
_GATHER_BYTES = 32 * 2**20  # rows gathered at a time by `save`: 13,000 float16 rows of 1,280


def release(*arrays: object) -> None:
    """Unmap from this process the pages of each memory-mapped array (a numpy.memmap or a view of one) that
    it touched: madvise(MADV_DONTNEED). The kernel keeps them in its page cache, a shared mapping's dirty
    pages too (they are written back as usual), so the data is intact and a later read faults them back in
    from the cache. Without it a pass over a file-backed array leaves every page it read or wrote counted in
    the process's RSS: 7.2 GB at a million images in the audit (thumbnails, features, unit embeddings).
    Arrays in memory are left alone."""
    for array in arrays:
        mapped = getattr(array, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here, views share it
        if mapped is not None and not mapped.closed and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of `n` rows `size` at a time: how every pass over rows too many for memory (float64
    probabilities, a memory-mapped file) takes them."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


BLOCK_ROWS = 4096  # rows at a time of a pass over (N, K) float64 figures: 33 MB at 1,000 classes


def digests(strings: Iterable[str]) -> np.ndarray:
    """(N,) keys of `strings`: the same string has the same key in every store."""
    return np.array([hashlib.blake2b(s.encode(), digest_size=16).digest() for s in strings], dtype=KEY)


class _Open(NamedTuple):
    """A shard's rows file, open: where its row 0 starts, one row's shape and the dtype."""

    file: BinaryIO
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


class ShardRows:
    """The rows of the named shards in `folder`, read with `os.preadv` straight into the caller's array.

    Not through memmaps: the kernel maps 64 KB around every page a read faults in (fault-around), so reading
    a tenth of a million-image cache (36 px squares) at random through memmaps took 3.7 GB of RSS, the whole
    cache; reads here hold only what was asked for. Cheap to make: each DataLoader worker opens its own files
    (pickling drops them).
    """

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = Path(folder), names  # shard number -> name
        self._files: dict[int, _Open] = {}

    def row_type(self, shard: int) -> tuple[tuple[int, ...], np.dtype]:
        """The shape of one row of shard `shard`, and its dtype."""
        opened = self._file(shard)
        return opened.shape, opened.dtype

    def gather(self, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the row at (shard[i], row[i]); `out` is a C-contiguous array (n, *row) of the shards'
        dtype, in memory. One read a row: 4.3 us per 3.9 KB square from the page cache (a memmap: 1.5 us)."""
        size = out[:1].nbytes
        for i, (number, index) in enumerate(zip(shard.tolist(), row.tolist(), strict=True)):
            opened = self._file(number)
            where = opened.offset + index * size
            if os.preadv(opened.file.fileno(), [memoryview(out[i : i + 1]).cast("B")], where) != size:
                raise OSError(f"{opened.file.name}: shorter than its header says; delete it to rebuild it")

    def save(self, path: Path, shard: np.ndarray, row: np.ndarray) -> None:
        """The rows at (shard[i], row[i]), in order, as one `.npy` file (N, *row) at `path`, gathered a block
        at a time (`_GATHER_BYTES`) and written with plain writes: memory bounded by the block whatever N, and
        no page of the file mapped here."""
        shape, dtype = self.row_type(int(shard[0]))
        block = max(1, _GATHER_BYTES // (int(np.prod(shape)) * dtype.itemsize or 1))
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (len(shard), *shape),
        }
        with open(path, "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            for start in range(0, len(shard), block):
                rows = np.empty((len(shard[start : start + block]), *shape), dtype)
                self.gather(shard[start : start + block], row[start : start + block], rows)
                file.write(rows.tobytes())

    def _file(self, shard: int) -> _Open:
        if shard not in self._files:
            file = open(self.folder / f"{self.names[shard]}{_ROWS}", "rb")  # noqa: SIM115 (kept open)
            version = np.lib.format.read_magic(file)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = header(file)
            self._files[shard] = _Open(file, file.tell(), tuple(shape[1:]), dtype)
        return self._files[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}


class ShardStore(ShardRows):
    """Every shard in `folder` (created on the first write), their index, and new shards."""

    def __init__(self, folder: Path):
        super().__init__(folder, [])
        self._keys: list[np.ndarray] = []  # per shard, (n,) KEY
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # sorted keys, shard, row
        for keys_file in sorted(self.folder.glob(f"*{_KEYS}")) if self.folder.is_dir() else []:
            name = keys_file.name[: -len(_KEYS)]
            if not name.startswith(".") and (self.folder / f"{name}{_ROWS}").is_file():  # not a temp
                self._add(name, np.load(keys_file))

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys)

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) int32 shard and (N,) int32 row of each key; shard -1 where the store lacks the key."""
        sorted_keys, shard, row = self._sorted()
        if not len(sorted_keys):
            return np.full(len(keys), -1, np.int32), np.zeros(len(keys), np.int32)
        at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        found = sorted_keys[at] == keys
        return np.where(found, shard[at], -1).astype(np.int32), np.where(found, row[at], 0).astype(np.int32)

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Indices, in order, of the first row of each key the store lacks (a repeated key: its first row)."""
        unique, first = np.unique(keys, return_index=True)
        return np.sort(first[self.locate(unique)[0] < 0])

    @contextmanager
    def write(self, keys: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
        """A new shard of len(keys) rows of `shape`, as a writable memmap the caller fills (its pages are
        unmapped once it is committed, so a pass maps one shard at a time)."""
        with self._new(keys) as tmp:
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(keys), *shape))
            yield rows
            rows.flush()
            del rows

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """A new shard holding `rows` (n, *row), already in memory."""
        with self._new(keys) as tmp, open(tmp, "wb") as file:
            np.save(file, rows)

    @contextmanager
    def _new(self, keys: np.ndarray) -> Iterator[Path]:
        """Where to write a new shard's rows; on a clean exit they are committed, then the keys, then the
        shard is indexed. Named by its keys: a rerun of the same work after a kill writes the same name over
        any half-written rows."""
        keys = np.asarray(keys, dtype=KEY)
        name = hashlib.sha256(keys.tobytes()).hexdigest()[:20]
        with atomic_path(self.folder / f"{name}{_ROWS}") as tmp:
            yield tmp
        with atomic_path(self.folder / f"{name}{_KEYS}") as tmp, open(tmp, "wb") as file:
            np.save(file, keys)
        self._add(name, keys)

    def _add(self, name: str, keys: np.ndarray) -> None:
        self.names.append(name)
        self._keys.append(keys)
        self._index = None  # re-sorted on the next lookup, not after every shard of a pass

    def _sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._index is None:
            keys = np.concatenate(self._keys) if self._keys else np.empty(0, KEY)
            shard = np.concatenate([np.full(len(k), i, np.int32) for i, k in enumerate(self._keys)] or [[]])
            row = np.concatenate([np.arange(len(k), dtype=np.int32) for k in self._keys] or [[]])
            order = np.argsort(keys, kind="stable")
            self._index = keys[order], shard[order].astype(np.int32), row[order].astype(np.int32)
        return self._index

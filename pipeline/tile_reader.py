"""Tiles read by byte ranges: each shard's index read once and cached, neighbouring tiles coalesced
into one read, checksums checked, decoding in threads.

zarr reads a tile of a sharded array through its per-chunk Python pipeline (1-2 ms of bookkeeping
per tile, more than the JPEG decode). :class:`TileReader` reads the same bytes directly, using the
layout of :mod:`pipeline._shards`: per requested shard, the index (one suffix read, then cached),
then the requested chunks as byte ranges, neighbours within ``gap`` bytes merged into one read (on
an object store: ranged GETs, issued together through fsspec's ``cat_ranges``), then each chunk
through the array's own codecs (crc32c checked first, then ``hlss.jpeg`` or Blosc) in a pool of
threads. Single tiles, runs and random batches all take this path.

:class:`TileArray` is what :meth:`pipeline.store.SlideStore.tiles` returns: the slide's
:class:`~pipeline.store.CheckedArray`, wrapped so that its first-axis reads (``tiles[i]``, ``tiles[a:b]``,
``tiles.get_orthogonal_selection((rows,))``) use the reader. Anything it does not handle (other
selections, arrays that are not sharded as the tiler shards them, schema-1 stores' missing chunks)
and anything that goes wrong (a damaged shard) is read again through zarr, so results and
:class:`~pipeline.store.StoreDamageError` messages are zarr's.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ._shards import EMPTY, ShardLayout

__all__ = ["TileReader", "TileArray", "MissingChunk"]

GAP = 256 * 1024
"""Bytes between two wanted chunks of a shard below which they are read as one range."""

_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


class MissingChunk(LookupError):
    """A wanted shard or chunk is not stored (zarr reads it as the fill value, or finds the damage)."""


def _pool() -> ThreadPoolExecutor | None:
    """The process's decoding threads (zarr's ``threading.max_workers``, else the CPU count); None for one.
    Made again in a forked child (a parent's pool does not survive the fork)."""
    global _POOL
    n = zarr.config.get("threading.max_workers") or os.cpu_count() or 1
    if n <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(n, thread_name_prefix="tile-decode"))
        return _POOL[1]


class TileReader:
    """Reads tiles ``(k, T, T, 3)`` of one sharded tile array by byte ranges (see the module docstring).

    ``array``: the plain zarr array; ``layout``: its :class:`~pipeline._shards.ShardLayout`
    (None: not a layout this reader handles; use zarr). Indexes are cached for the reader's life
    (a committed slide's shards never change in place: retiling writes a new slide group).
    """

    def __init__(self, array: zarr.Array, gap: int = GAP) -> None:
        self.array, self.gap = array, gap
        self.layout = ShardLayout.of(array)
        self._indexes: dict[int, np.ndarray] = {}
        self._dtype = array.dtype
        store = array.store_path.store
        self._folder = Path(str(store.root)) / array.store_path.path if isinstance(store, LocalStore) else None
        self._paths: dict[str, str] = {}  # shard key -> its file

    def __getstate__(self) -> dict[str, Any]:
        return {"array": self.array, "gap": self.gap}  # indexes are read again where it is unpickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["array"], state["gap"])

    def tile(self, row: int) -> np.ndarray:
        """One tile ``tile_shape[1:]`` (``row`` in ``0 .. N-1``): one index lookup, one read, one decode."""
        layout = self.layout
        shard = row // layout.shard_tiles
        if shard not in self._indexes:
            self._load_indexes([shard])
        start, length = (int(v) for v in self._indexes[shard][row - shard * layout.shard_tiles])
        if start == EMPTY:
            raise MissingChunk(f"tile {row} is not stored in shard {shard}")
        raw = self._read_ranges([(layout.shard_key(shard), start, start + length)])[0]
        out = np.empty(layout.tile_shape[1:], dtype=self._dtype)
        layout.decode_tile_into(raw, out)
        return out

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Tiles ``rows`` (int indices along the first axis, any order, repeats allowed), in that order.

        Raises :class:`MissingChunk` for a chunk or shard not stored, ``ValueError`` for a checksum
        mismatch, and whatever a codec raises for bytes it cannot decode.
        """
        layout = self.layout
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *layout.tile_shape[1:]), dtype=self._dtype)
        if not len(rows):
            return out
        if len(rows) == 1:  # the common single-tile read: no sorting
            wanted, first, where = rows, np.zeros(1, np.int64), np.zeros(1, np.int64)
        else:
            wanted, first, where = np.unique(rows, return_index=True, return_inverse=True)
        raws = self._chunks(wanted)
        pool = _pool() if len(wanted) > 1 else None
        targets = [out[k] for k in first]  # each wanted tile decoded once, into its first place
        if pool is not None:
            list(pool.map(layout.decode_tile_into, raws, targets))
        else:
            for raw, target in zip(raws, targets):
                layout.decode_tile_into(raw, target)
        repeats = np.flatnonzero(np.arange(len(rows)) != first[where])
        out[repeats] = out[first[where[repeats]]]
        return out

    def jpeg_bytes(self, rows: np.ndarray) -> list[bytes] | None:
        """The stored JPEG stream of each of ``rows`` (any order, repeats allowed), checksum checked
        and stripped, for a decoder elsewhere (e.g. on a GPU); None when the array's chunks are not
        ``hlss.jpeg`` RGB tiles. Raises as :meth:`read` does."""
        if not self.layout.is_jpeg_rgb:
            return None
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        wanted, where = np.unique(rows, return_inverse=True)
        payloads = [self.layout.jpeg_payload(raw) for raw in self._chunks(wanted)]
        return [payloads[k] for k in where.tolist()]

    # -- bytes ------------------------------------------------------------------------------------
    def _chunks(self, rows: np.ndarray) -> list[memoryview]:
        """The stored bytes of each chunk of ``rows`` (sorted, unique), read as few ranges as possible."""
        s = self.layout.shard_tiles
        shards = rows // s
        self._load_indexes(np.unique(shards).tolist())
        spans = []  # (shard, start, end) of each chunk
        for shard, row in zip(shards.tolist(), rows.tolist()):
            start, length = (int(v) for v in self._indexes[shard][row - shard * s])
            if start == EMPTY:
                raise MissingChunk(f"tile {row} is not stored in shard {shard}")
            spans.append((shard, start, start + length))
        groups = _coalesce(spans, self.gap)
        data = self._read_ranges([(self.layout.shard_key(g[0]), g[1], g[2]) for g in groups])
        out: list[memoryview] = [memoryview(b"")] * len(spans)
        for (shard, start, _end, members), blob in zip(groups, data):
            view = memoryview(blob)
            for k in members:
                _, a, b = spans[k]
                out[k] = view[a - start : b - start]
        return out

    def _load_indexes(self, shards: list[int]) -> None:
        todo = [s for s in shards if s not in self._indexes]
        if not todo:
            return
        size = self.layout.index_bytes
        if self.layout.index_at_start:
            blobs = self._read_ranges([(self.layout.shard_key(s), 0, size) for s in todo])
        else:
            blobs = self._read_suffixes([self.layout.shard_key(s) for s in todo], size)
        for s, blob in zip(todo, blobs):
            self._indexes[s] = self.layout.decode_index(blob)

    def _read_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """``[start, end)`` of each ``(key, start, end)`` (keys relative to the array)."""
        if self._folder is not None:
            return [_pread(self._path(key), start, end - start) for key, start, end in ranges]
        requests = [(self._key(key), RangeByteRequest(start, end)) for key, start, end in ranges]
        return self._store_get(requests)

    def _read_suffixes(self, keys: list[str], size: int) -> list[bytes]:
        if self._folder is not None:
            return [_pread(self._path(key), -size, size) for key in keys]
        return self._store_get([(self._key(key), SuffixByteRequest(size)) for key in keys])

    def _path(self, key: str) -> str:
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = str(self._folder / key)
        return path

    def _key(self, key: str) -> str:
        return f"{self.array.store_path.path}/{key}".lstrip("/")

    def _store_get(self, requests: list) -> list[bytes]:
        """Ranged reads of an object store, issued together (fsspec ``cat_ranges`` for S3 and the like)."""
        store = self.array.store_path.store
        got = sync(store.get_partial_values(default_buffer_prototype(), requests))
        missing = [key for (key, _), buf in zip(requests, got) if buf is None]
        if missing:
            raise MissingChunk(f"not stored: {missing[0]}")
        return [buf.to_bytes() for buf in got]


def _pread(path: str, start: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``start`` (negative: from the end)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MissingChunk(f"not stored: {path}") from None
    try:
        if start < 0:
            start = max(0, os.fstat(fd).st_size + start)
        data = os.pread(fd, length, start)
    finally:
        os.close(fd)
    if len(data) != length:
        raise ValueError(f"{path}: {len(data)} bytes at {start}, expected {length} (truncated shard)")
    return data


def _coalesce(spans: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, int, list[int]]]:
    """Merge the byte spans ``(shard, start, end)`` of one shard that lie within ``gap`` of each other:
    ``(shard, start, end, [indices of the spans it covers])`` per read."""
    order = sorted(range(len(spans)), key=lambda k: spans[k])
    groups: list[tuple[int, int, int, list[int]]] = []
    for k in order:
        shard, start, end = spans[k]
        if groups and groups[-1][0] == shard and start - groups[-1][2] <= gap:
            g = groups[-1]
            groups[-1] = (shard, g[1], max(g[2], end), g[3] + [k])
        else:
            groups.append((shard, start, end, [k]))
    return groups


class TileArray:
    """The tiles of a committed slide: ``checked``, the slide's :class:`~pipeline.store.CheckedArray`,
    whose first-axis reads go through a :class:`TileReader` (the checked zarr read for the rest, and
    for whatever the reader cannot read). Every other attribute (``shape``, ``attrs``, ``array``,
    ``path``...) is the checked array's."""

    def __init__(self, checked: Any) -> None:
        self.checked = checked
        self._reader = TileReader(checked.array)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("checked", "_reader"):  # e.g. while unpickling
            raise AttributeError(attr)
        return getattr(self.checked, attr)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.checked.__array__(dtype, copy)

    def __repr__(self) -> str:
        return f"TileArray({self.checked.array!r})"

    def __getitem__(self, selection: Any) -> Any:
        n = self.checked.array.shape[0]
        if isinstance(selection, (int, np.integer)) and -n <= int(selection) < n and self._reader.layout is not None:
            try:
                return self._reader.tile(int(selection) % n)
            except Exception:  # missing or damaged: zarr reads it again and names the damage
                return self.checked[selection]
        rows = self._rows(selection)
        out = None if rows is None else self._fast(rows)
        return self.checked[selection] if out is None else out

    def get_orthogonal_selection(self, selection: Any, *args: Any, **kwargs: Any) -> Any:
        first = selection[0] if isinstance(selection, tuple) and len(selection) == 1 else None
        out = None
        if first is not None and not args and not kwargs and np.asarray(first).dtype.kind in "iu":
            out = self._fast(np.asarray(first))
        return self.checked.get_orthogonal_selection(selection, *args, **kwargs) if out is None else out

    def _rows(self, selection: Any) -> np.ndarray | None:
        """The first-axis rows of ``tiles[a:b]``; None for any other selection."""
        if isinstance(selection, slice) and selection.step in (None, 1):
            return np.arange(self.checked.array.shape[0])[selection]
        return None

    def jpeg_bytes(self, rows: np.ndarray) -> list[bytes] | None:
        """The stored JPEG stream of each tile of ``rows`` (see :meth:`TileReader.jpeg_bytes`); None
        when the tiles are not stored as ``hlss.jpeg`` or cannot be read this way (read them as
        arrays then: zarr names any damage)."""
        if self._reader.layout is None:
            return None
        try:
            return self._reader.jpeg_bytes(np.asarray(rows) % max(self.checked.array.shape[0], 1))
        except Exception:
            return None

    def _fast(self, rows: np.ndarray) -> np.ndarray | None:
        """The tiles of ``rows`` by byte ranges; None when zarr must read them (see the module docstring)."""
        if self._reader.layout is None or rows.ndim != 1:
            return None
        n = self.checked.array.shape[0]
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            return None  # zarr raises the IndexError
        try:
            return self._reader.read(rows % n if n else rows)
        except Exception:  # missing or damaged: zarr reads it again and names the damage
            return None

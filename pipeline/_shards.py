"""Whole shards of a tile array, written and read without zarr's per-chunk Python pipeline.

The tile arrays are zarr 3 arrays with the ``sharding_indexed`` codec (spec:
https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/v1.0.html): one stored
object per shard of ``S`` tiles, each tile an inner chunk ``(1, T, T, 3)``. A shard object is::

    chunk 0 | chunk 1 | ... | chunk k-1 | index          (index_location "end", the default)
    index | chunk 0 | ... | chunk k-1                     (index_location "start")

* each chunk: the tile through the array's inner codecs (e.g. ``hlss.jpeg`` or bytes + Blosc),
  then ``crc32c``: the encoded bytes followed by their CRC-32C, 4 bytes little-endian;
* the index: ``S x 2`` little-endian uint64, ``(offset, length)`` in bytes of each chunk within
  the object (offsets from the object's first byte), ``2**64 - 1`` twice for a chunk that is not
  there (the tiles past the end of the array in the last shard), followed by its own CRC-32C;
* chunks lie in Morton order of their position in the shard, which for shards split along the
  first axis only (``(S, 1, 1, 1)`` chunks per shard, the store's case) is tile order.

zarr itself writes exactly these bytes (``tests/pipeline/test_shards.py`` compares them), so plain
``zarr.open_group`` reads the result, checksums included. What differs is the cost: zarr spends
1.1-1.7 ms of Python per tile on bookkeeping, more than the JPEG codec; here every chunk goes
through the array's own codec objects (their synchronous ``_encode_sync``/``_decode_sync``, so the
bytes are zarr's; ``hlss.jpeg`` + crc32c chunks are encoded with that codec's own encoder call and
google_crc32c, as those two codecs do, without their buffer wrapping), in a pool of threads
(libjpeg-turbo, Blosc and crc32c release the GIL), and the shard is ONE write (one file, or one PUT
on an object store).

:class:`ShardLayout` is that description of one array; :func:`write_shard` writes one shard;
:mod:`pipeline.tile_reader` reads tiles back by byte ranges.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import google_crc32c
import imagecodecs
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.dtype import UInt64
from zarr.core.sync import sync

from .codecs import JpegCodec

__all__ = ["EMPTY", "ShardLayout", "Tiles", "codec_pool", "write_shard"]

EMPTY = 2**64 - 1
"""Offset and length of a chunk that is not in its shard."""

Tiles = np.ndarray | Sequence[np.ndarray]
"""The tiles of a shard: one ``(k, *tile_shape[1:])`` array, or a sequence of ``(k_i, ...)`` arrays
(e.g. views of the blocks they were read in) whose concatenation they are."""


def _each_tile(tiles: Tiles) -> list[np.ndarray]:
    """The single tiles of ``tiles`` (views), in order."""
    if isinstance(tiles, np.ndarray):
        return list(tiles)
    return [t for piece in tiles for t in piece]


@dataclass(frozen=True)  # not slots: functools.cached_property needs __dict__
class ShardLayout:
    """How one sharded array lays out a shard (see the module docstring).

    ``tile_shape``: one inner chunk, e.g. ``(1, T, T, 3)``; ``shard_tiles``: chunks per shard (S);
    ``n_tiles``: the array's first-axis length; ``index_at_start``: the index precedes the chunks.
    """

    array: zarr.Array
    tile_shape: tuple[int, ...]
    shard_tiles: int
    n_tiles: int
    index_at_start: bool
    _codec: ShardingCodec
    _chunk_spec: ArraySpec
    _index_spec: ArraySpec

    @classmethod
    def of(cls, array: zarr.Array) -> ShardLayout | None:
        """The layout of ``array``, or None when it is not a shard layout this module handles
        (not sharded, shards split along more than the first axis, or a codec without a
        synchronous path): its reads and writes then go through zarr."""
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or array.shards is None:
            return None
        codec = codecs[0]
        inner, outer = tuple(codec.chunk_shape), tuple(array.shards)
        if inner[1:] != outer[1:] or tuple(array.shape[1:]) != outer[1:]:
            return None
        if not all(hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync")
                   for c in (*codec.codecs, *codec.index_codecs)):
            return None
        proto = default_buffer_prototype()
        config = ArrayConfig(order="C", write_empty_chunks=True)
        chunk_spec = ArraySpec(shape=inner, dtype=array.metadata.data_type, fill_value=array.metadata.fill_value,
                               config=config, prototype=proto)
        s = outer[0] // inner[0]
        index_spec = ArraySpec(shape=(s,) + (1,) * (len(inner) - 1) + (2,), dtype=UInt64(endianness="little"),
                               fill_value=EMPTY, config=ArrayConfig(order="C", write_empty_chunks=False),
                               prototype=proto)
        return cls(array, inner, s, int(array.shape[0]), codec.index_location.value == "start", codec,
                   chunk_spec, index_spec)

    # -- shards -------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return -(-self.n_tiles // self.shard_tiles)

    def shard_key(self, shard: int) -> str:
        """The key of shard ``shard`` relative to the array, e.g. ``c/3/0/0/0``."""
        return self.array.metadata.encode_chunk_key((shard,) + (0,) * (len(self.tile_shape) - 1))

    def tiles_in(self, shard: int) -> int:
        """Tiles stored in shard ``shard`` (the last may hold fewer than ``shard_tiles``)."""
        return min(self.shard_tiles, self.n_tiles - shard * self.shard_tiles)

    @property
    def index_bytes(self) -> int:
        """Size of an encoded shard index (``S x 16`` bytes plus what its codecs add, e.g. 4 for crc32c)."""
        return self._codec._shard_index_size(self._index_spec.shape[:-1])

    # -- chunks -------------------------------------------------------------------------------
    def encode_tile(self, tile: np.ndarray) -> bytes:
        """The stored bytes of one inner chunk (a tile of ``tile_shape`` or ``tile_shape[1:]``)."""
        spec = self._chunk_spec
        data: Any = spec.prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(tile).reshape(spec.shape))
        for c in self._codec.codecs:
            data = c._encode_sync(data, spec)
        return data.to_bytes()

    def decode_tile(self, raw: bytes | memoryview | np.ndarray) -> np.ndarray:
        """The tile ``tile_shape[1:]`` of one stored inner chunk; a checksum mismatch raises
        ``ValueError("... checksum do not match ...")`` (zarr's own message)."""
        spec = self._chunk_spec
        data: Any = spec.prototype.buffer.from_bytes(raw)
        for c in reversed(self._codec.codecs):
            data = c._decode_sync(data, spec)
        return data.as_numpy_array().reshape(spec.shape[1:])

    def decode_tile_into(self, raw: bytes | memoryview, out: np.ndarray) -> None:
        """:meth:`decode_tile` straight into ``out`` (``tile_shape[1:]``): for ``hlss.jpeg`` + crc32c
        the checksum is checked and libjpeg-turbo decodes into ``out`` (no copy); else a copy."""
        if not self.is_jpeg_rgb:
            out[...] = self.decode_tile(raw)
            return
        imagecodecs.jpeg8_decode(self.jpeg_payload(raw), out=out)

    def jpeg_payload(self, raw: bytes | memoryview) -> bytes:
        """The JPEG stream of one stored ``hlss.jpeg`` + crc32c chunk, its checksum checked."""
        payload = bytes(memoryview(raw)[:-4])  # google_crc32c takes no views
        if google_crc32c.value(payload) != int.from_bytes(memoryview(raw)[-4:], "little"):
            raise ValueError("Stored and computed checksum do not match (crc32c of a tile chunk)")
        return payload

    @functools.cached_property
    def is_jpeg_rgb(self) -> bool:
        """Chunks are ``hlss.jpeg`` RGB tiles followed by their crc32c (the tiler's lossy layout)."""
        codecs = self._codec.codecs
        return (len(codecs) == 2 and isinstance(codecs[0], JpegCodec) and isinstance(codecs[1], Crc32cCodec)
                and self.tile_shape[-1] == 3)

    def encode_index(self, lengths: list[int]) -> bytes:
        """The encoded index of a shard whose chunks, in order, are ``lengths`` bytes long."""
        table = np.full(self._index_spec.shape, EMPTY, dtype="<u8")
        flat = table.reshape(self.shard_tiles, 2)
        first = self.index_bytes if self.index_at_start else 0
        ends = np.cumsum(lengths, dtype=np.uint64)
        flat[: len(lengths), 0] = first + ends - np.asarray(lengths, np.uint64)
        flat[: len(lengths), 1] = lengths
        return self._index_codecs_encode(table)

    def decode_index(self, raw: bytes | memoryview) -> np.ndarray:
        """``(S, 2) uint64`` (offset, length) per chunk (:data:`EMPTY` for absent ones); a
        checksum mismatch raises ``ValueError`` as for chunks."""
        spec = self._index_spec
        data: Any = spec.prototype.buffer.from_bytes(raw)
        for c in reversed(self._codec.index_codecs):
            data = c._decode_sync(data, spec)
        return data.as_numpy_array().reshape(self.shard_tiles, 2)

    def _index_codecs_encode(self, table: np.ndarray) -> bytes:
        spec = self._index_spec
        data: Any = spec.prototype.nd_buffer.from_numpy_array(table)
        for c in self._codec.index_codecs:
            data = c._encode_sync(data, spec)
        return data.to_bytes()

    def encode_shard(self, tiles: Tiles, pool: Executor | None = None) -> bytes:
        """One whole shard object of ``tiles`` ((k, *tile_shape[1:]), k <= S, or pieces of it: see
        :data:`Tiles`), chunks encoded in ``pool``."""
        each = _each_tile(tiles)
        encode = self._encode_parts
        parts = list(pool.map(encode, each)) if pool is not None else [encode(t) for t in each]
        index = self.encode_index([sum(map(len, c)) for c in parts])
        chunks = [b for c in parts for b in c]
        return b"".join([index, *chunks] if self.index_at_start else [*chunks, index])

    def _encode_parts(self, tile: np.ndarray) -> tuple[bytes, ...]:
        """The stored bytes of one inner chunk as pieces to join (:meth:`encode_tile`'s bytes): for
        ``hlss.jpeg`` + crc32c libjpeg-turbo's bytes and their CRC-32C, with the codec's own encoder
        call but without zarr's buffer wrapping (about 20 µs a tile) and the copy that appends the
        checksum."""
        if not self.is_jpeg_rgb:
            return (self.encode_tile(tile),)
        data = self._codec.codecs[0].encode_array(tile)
        return data, google_crc32c.value(data).to_bytes(4, "little")


def write_shard(layout: ShardLayout, shard: int, tiles: Tiles, pool: Executor | None = None) -> None:
    """Write shard number ``shard`` holding ``tiles`` (all its tiles: ``layout.tiles_in(shard)``;
    one array or pieces of it, see :data:`Tiles`) as one object: one file write, or one PUT on an
    object store."""
    want = layout.tiles_in(shard)
    got = len(tiles) if isinstance(tiles, np.ndarray) else sum(len(t) for t in tiles)
    if got != want:
        raise ValueError(f"shard {shard} holds {want} tiles, got {got}")
    data = layout.encode_shard(tiles, pool)
    target = layout.array.store_path / layout.shard_key(shard)
    sync(target.set(default_buffer_prototype().buffer.from_bytes(data)))


def codec_pool() -> ThreadPoolExecutor | None:
    """Threads for encoding or decoding chunks: as many as zarr's ``threading.max_workers`` (the
    runner sets it to a worker's ``--threads``; unset: the CPU count), None for one (run inline)."""
    n = zarr.config.get("threading.max_workers") or os.cpu_count() or 1
    return ThreadPoolExecutor(n, thread_name_prefix="tile-codec") if n > 1 else None

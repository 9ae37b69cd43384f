"""Reading a tiled TIFF level straight from the file: one ``pread`` and one decode per source tile.

tiffslide reads a region through a zarr view of the TIFF (tifffile's ``ZarrTiffStore``), whose
per-chunk Python path costs more CPU than the JPEG decode itself (``benchmarks/README.md``, "Tile
I/O at codec speed"). Here the level's tile table (``page.dataoffsets`` / ``databytecounts``) is
read directly and each tile touched by a region is decoded once with tifffile's own decoder for the
page (``page.decode``: imagecodecs, the page's ``JPEGTables``, its colorspace and YCbCr handling),
with the arguments that store passes, so the pixels are the ones tiffslide returns.

Baseline 8-bit RGB/YCbCr JPEG tiles skip ``page.decode``'s wrapping and are decoded by the same
imagecodecs call with the same arguments (tifffile's ``jpeg_decode_colorspace``), straight into a
buffer: the tile's own slot of the output when a source tile is exactly one output tile, else a
scratch buffer each thread reuses. A fresh output array per tile costs about a fifth of the decode
(allocation, page faults and imagecodecs' zero fill; ``benchmarks/README.md``).

Only levels the view would read the same way take this path (:func:`direct_level`); any other is
read through tiffslide.
"""

from __future__ import annotations

import os
import threading

import imagecodecs
import numpy as np

__all__ = ["DirectLevel", "DirectLevels", "direct_level", "jpeg_chroma"]

# (luma horizontal, vertical sampling factor) in a 3-component YCbCr JPEG whose chroma are 1 x 1
_CHROMA = {(1, 1): "444", (2, 1): "422", (2, 2): "420"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class DirectLevel:
    """One stored pyramid level (a tiled ``tifffile.TiffPage``) read by byte ranges.

    Thread-safe: reads use ``os.pread`` on a descriptor of its own, tifffile's decode closure keeps
    no state between calls, and each thread decodes into a scratch tile of its own.
    """

    def __init__(self, fd: int, page) -> None:
        self._fd = fd
        self._decode = page.decode  # resolves (and caches) the codec once
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self._counts = np.asarray(page.databytecounts, np.int64)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self._tw, self._th = int(page.tilewidth), int(page.tilelength)
        self._across = -(-self.width // self._tw)
        self._args = {"_fullsize": True}
        if page.jpegtables is not None:
            self._args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:
            self._args["jpegheader"] = page.jpegheader
        self._jpeg = _jpeg_args(page)
        self._scratch = threading.local()
        self.chroma: str | None = None  # YCbCr JPEG: set by direct_level from the level's first tile

    def read(self, x: int, y: int, w: int, h: int, parts: np.ndarray | None = None) -> np.ndarray:
        """``(h, w, 3) uint8`` RGB of the rectangle at level px ``(x, y)``; outside the level (and in
        empty tiles) zeros, as tiffslide pads.

        ``parts`` ``(n, 4)`` int64 (x, y, w, h) level px: only the source tiles that meet one of these
        rectangles are decoded; the rest of the rectangle is left zero (a block of kept tiles needs
        only their pixels, not every source tile of its bounding box).
        """
        out = np.zeros((h, w, 3), np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = self._tw, self._th
        needed = self._needed(parts, (x0, y0, x1, y1))
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                if needed is not None and (ty, tx) not in needed:
                    continue
                tile = self._tile(ty * self._across + tx)
                if tile is None:
                    continue
                # the part of this tile inside the rectangle, in level px
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[ay0 - ty * th : ay1 - ty * th,
                                                                 ax0 - tx * tw : ax1 - tx * tw, :3]
        return out

    def read_tiles(self, xs: np.ndarray, ys: np.ndarray, size: int, out: np.ndarray) -> None:
        """Fill ``out`` ``(n, size, size, 3) uint8`` with the squares of ``size`` level px whose
        top-left corners are ``(xs[k], ys[k])`` level px (``(n,)`` int); outside the level and in
        empty tiles zeros, the pixels :meth:`read` gives for the same squares.

        Each source tile a square meets is decoded once and its part of every square it meets is
        copied straight into that square's slot: no region between them, no zero-filling of
        pixels a source tile covers.
        """
        xs, ys = np.asarray(xs, np.int64), np.asarray(ys, np.int64)
        # the part of each square inside the level, level px (empty for one wholly outside)
        x0, y0 = np.maximum(xs, 0), np.maximum(ys, 0)
        x1, y1 = np.minimum(xs + size, self.width), np.minimum(ys + size, self.height)
        partial = (x0 != xs) | (y0 != ys) | (x1 != xs + size) | (y1 != ys + size)
        out[partial] = 0  # rare: squares over the level's edge keep zeros where no source tile is
        k, tx, ty = self._pairs(x0, y0, x1, y1)
        tw, th = self._tw, self._th
        # each (square, source tile) pair: their common rectangle, level px
        ax0, ay0 = np.maximum(x0[k], tx * tw), np.maximum(y0[k], ty * th)
        ax1, ay1 = np.minimum(x1[k], (tx + 1) * tw), np.minimum(y1[k], (ty + 1) * th)
        # that rectangle's rows and columns in the square (q*) and in the source tile (s*)
        qy0, qy1, qx0, qx1 = ay0 - ys[k], ay1 - ys[k], ax0 - xs[k], ax1 - xs[k]
        sy0, sy1, sx0, sx1 = ay0 - ty * th, ay1 - ty * th, ax0 - tx * tw, ax1 - tx * tw
        rows = zip((ty * self._across + tx).tolist(), k.tolist(), *(v.tolist() for v in
                   (qy0, qy1, qx0, qx1, sy0, sy1, sx0, sx1)))
        whole = (th, tw) == (size, size) and out.flags.c_contiguous
        index, tile = -1, None
        for src, sq, q0, q1, q2, q3, s0, s1, s2, s3 in rows:
            if src != index:  # pairs come sorted by source tile: each is decoded once
                index = src
                if whole and q0 == s0 == 0 and q2 == s2 == 0 and q1 == s1 == size and q3 == s3 == size:
                    slot = out[sq]  # this square is the source tile: decoded in place
                    tile = self._tile(src, into=slot)
                    if tile is slot:
                        continue
                else:
                    tile = self._tile(src)
            if tile is None:
                out[sq, q0:q1, q2:q3] = 0
            else:
                out[sq, q0:q1, q2:q3] = tile[s0:s1, s2:s3, :3]

    def _pairs(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
               y1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (square, source tile) pair that meets, for squares clipped to the level
        ``[x0, x1) x [y0, y1)`` level px ``(n,)``: ``(k, tx, ty)`` ``(m,)`` int64 (square index, source
        tile column and row), sorted by source tile in row-major order (the file's usual order)."""
        keep = np.flatnonzero((x1 > x0) & (y1 > y0))
        c0, r0 = x0[keep] // self._tw, y0[keep] // self._th
        nc, nr = (x1[keep] - 1) // self._tw - c0 + 1, (y1[keep] - 1) // self._th - r0 + 1
        per = nc * nr  # source tiles each square meets
        k = np.repeat(keep, per)
        j = np.arange(len(k)) - np.repeat(np.cumsum(per) - per, per)  # pair's number within its square
        tx, ty = np.repeat(c0, per) + j % np.repeat(nc, per), np.repeat(r0, per) + j // np.repeat(nc, per)
        order = np.lexsort((k, tx, ty))
        return k[order], tx[order], ty[order]

    def _needed(self, parts: np.ndarray | None, clip: tuple[int, int, int, int]) -> set[tuple[int, int]] | None:
        """(row, column) of the source tiles that ``parts`` meet inside ``clip`` (x0, y0, x1, y1), or
        None for all."""
        if parts is None:
            return None
        p = np.asarray(parts, np.int64).reshape(-1, 4)
        px0, py0 = np.maximum(p[:, 0], clip[0]), np.maximum(p[:, 1], clip[1])
        px1, py1 = np.minimum(p[:, 0] + p[:, 2], clip[2]), np.minimum(p[:, 1] + p[:, 3], clip[3])
        keep = (px1 > px0) & (py1 > py0)
        tiles: set[tuple[int, int]] = set()
        for a, b, c, d in zip(px0[keep] // self._tw, py0[keep] // self._th,
                              (px1[keep] - 1) // self._tw, (py1[keep] - 1) // self._th):
            tiles.update((ty, tx) for ty in range(b, d + 1) for tx in range(a, c + 1))
        return tiles

    def _tile(self, index: int, into: np.ndarray | None = None) -> np.ndarray | None:
        """Tile ``index`` of the tile table as ``(th, tw, samples)``, or None for an empty (sparse) tile.

        A JPEG tile is decoded into ``into`` (``(th, tw, 3) uint8``, C-contiguous) when given, else
        into this thread's scratch buffer, which the next call overwrites: use the pixels before then.
        """
        data = self._bytes(index)
        if data is None:
            return None
        if self._jpeg is not None:
            buf = into if into is not None else self._buffer()
            try:
                return imagecodecs.jpeg8_decode(data, out=buf, **self._jpeg)
            except Exception:  # another size or precision, or damage: tifffile's decoder says which
                pass
        decoded = self._decode(data, index, **self._args)[0]
        return decoded.reshape(self._th, self._tw, -1)

    def _bytes(self, index: int) -> bytes | None:
        """The stored bytes of tile ``index``, or None for an empty (sparse) tile."""
        count = int(self._counts[index])
        if count == 0 or int(self._offsets[index]) == 0:
            return None
        data = os.pread(self._fd, count, int(self._offsets[index]))
        if len(data) != count:
            raise OSError(f"tile {index} ends past the end of the file ({len(data):,} of {count:,} bytes read)")
        return data

    def _buffer(self) -> np.ndarray:
        """This thread's ``(th, tw, 3) uint8`` scratch tile."""
        buf = getattr(self._scratch, "tile", None)
        if buf is None:
            buf = self._scratch.tile = np.empty((self._th, self._tw, 3), np.uint8)
        return buf


def _jpeg_args(page) -> dict | None:
    """``imagecodecs.jpeg8_decode`` arguments that decode ``page``'s tiles as ``page.decode`` does, for
    baseline 8-bit 3-sample JPEG (RGB or YCbCr, no JPEG header tag); None for any other page."""
    try:
        from tifffile.tifffile import jpeg_decode_colorspace
    except ImportError:  # an older or newer tifffile: its own decoder only
        return None
    if (page.compression != 7 or page.bitspersample != 8 or page.samplesperpixel != 3 or page.extrasamples
            or page.photometric not in (2, 6) or page.jpegheader is not None or page.planarconfig != 1):
        return None
    colorspace, outcolorspace = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples,
                                                       page.is_jfif)
    return {"tables": page.jpegtables, "colorspace": colorspace, "outcolorspace": outcolorspace,
            "shape": (int(page.tilelength), int(page.tilewidth))}


def direct_level(fd: int, tiffslide_handle, level: int) -> DirectLevel | None:
    """A :class:`DirectLevel` for ``level`` of a ``tiffslide.TiffSlide``, or None where its zarr view
    would read the level differently or the decoder is missing, so tiffslide must read it.

    Taken: one tiled page per level, RGB(A) ``uint8`` samples stored contiguously (axes ``YXS``),
    no series composition (Leica SCN), not NDPI (whose levels are single JPEGs mapped onto virtual
    tiles), and a compression whose first non-empty tile tifffile decodes here.
    """
    props = tiffslide_handle.properties
    tif = tiffslide_handle.ts_tifffile
    if props.get("tiffslide.series-axes") != "YXS" or getattr(tif, "is_ndpi", False):
        return None
    if tiffslide_handle.zarr_group.attrs.get("tiffslide.series-composition") is not None:
        return None
    series = tif.series[int(props.get("tiffslide.series-index", 0))]
    lv = series.levels[level]
    if len(lv.pages) != 1:
        return None
    page = lv.pages[0]
    if (getattr(page, "keyframe", None) is not page or not page.is_tiled or page.planarconfig != 1
            or page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.imagedepth != 1
            or tuple(lv.shape) != (page.imagelength, page.imagewidth, page.samplesperpixel)):
        return None
    reader = DirectLevel(fd, page)
    try:
        probe = next((i for i, c in enumerate(reader._counts) if c > 0 and reader._offsets[i] > 0), None)
        if probe is not None:
            jpeg, reader._jpeg = reader._jpeg, None
            ref = reader._tile(probe)
            data = reader._bytes(probe)
            if jpeg is not None and _same_pixels(data, jpeg, ref):
                reader._jpeg = jpeg
            if page.compression == 7 and page.photometric == 6:  # YCbCr JPEG
                reader.chroma = jpeg_chroma(data)
    except Exception:  # an unsupported codec, or a damaged first tile: tiffslide reports it as today
        return None
    return reader


def jpeg_chroma(data: bytes) -> str | None:
    """The chroma subsampling (``"444"``, ``"422"``, ``"420"``) of a 3-component JPEG stream, read from
    its frame header (SOF): luma sampling factors 1x1, 2x1 or 2x2 with both chroma 1x1; None for
    any other layout or a stream without a frame header. The components are taken to be YCbCr
    (the caller knows the colour space: a TIFF's photometric tag)."""
    view = memoryview(data)
    pos = 2 if view[:2] == b"\xff\xd8" else 0  # after SOI
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(view[pos + 2 : pos + 4], "big")
        if marker in _SOF:
            seg = view[pos + 4 : pos + 2 + length]
            if len(seg) < 15 or seg[5] != 3:
                return None
            factors = [(seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(3)]
            return _CHROMA.get(factors[0]) if factors[1] == factors[2] == (1, 1) else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _same_pixels(data: bytes, jpeg: dict, ref: np.ndarray) -> bool:
    """Whether the direct JPEG call decodes ``data`` to ``ref``, tifffile's pixels of it."""
    try:
        fast = imagecodecs.jpeg8_decode(data, out=np.empty(ref.shape, np.uint8), **jpeg)
    except Exception:
        return False
    return fast.shape == ref.shape and np.array_equal(fast, ref)


class DirectLevels:
    """The :class:`DirectLevel` of each level of a tiffslide handle, made on first use; None where
    tiffslide must read. Owns the file descriptor (``close``)."""

    def __init__(self, path: os.PathLike | str, tiffslide_handle) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._handle = tiffslide_handle
        self._levels: dict[int, DirectLevel | None] = {}
        self._lock = threading.Lock()

    def get(self, level: int) -> DirectLevel | None:
        with self._lock:
            if level not in self._levels:
                self._levels[level] = direct_level(self._fd, self._handle, level)
            return self._levels[level]

    def close(self) -> None:
        os.close(self._fd)

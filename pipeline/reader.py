"""Slide readers: one small interface over tiffslide and openslide.

:func:`open_slide` picks the backend: ``"tiffslide"`` (default where it can read the file),
``"openslide"`` (fallback for formats tiffslide does not read, or on request), or ``"auto"``.
Every reader gives level-0 dimensions, level dimensions and downsamples, mpp from the metadata,
objective power, ``read_region`` at a level as an ``(h, w, 3) uint8`` array, and a bounded-memory
thumbnail. Errors name the file and say what is wrong.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

__all__ = [
    "READERS",
    "SlideError",
    "SlideReader",
    "MppInfo",
    "MPP_RANGE",
    "open_slide",
    "resolve_mpp",
    "read_thumbnail",
    "check_dimensions",
    "SlideTimeout",
    "TimeBudget",
    "MAX_SIDE",
    "MAX_CHUNK_PX",
    "MAX_PX_PER_BYTE",
]

READERS = ("auto", "tiffslide", "openslide")
MPP_RANGE = (0.02, 20.0)  # µm/px a microscope scan can plausibly have; 72 dpi TIFF defaults are 352.8
MAX_SIDE = 1 << 20  # px on a side of any level: 105 mm at 0.1 µm/px, longer than a 75 mm glass slide
MAX_CHUNK_PX = 1 << 26  # px in one TIFF tile or strip: a 64 Mpx chunk is already 192 MiB decoded
# px per byte of stored image data. Baseline JPEG spends at least 1 bit per 8x8 block (512 px/byte
# for one channel), deflate at most 1032:1; blank 512-4096 px tiles measured up to 24,000 px/byte
# (WebP), 10,000 (zstd, JPEG 2000). A table of many tiles sharing a few bytes stays far above it.
MAX_PX_PER_BYTE = 1 << 16
ReaderName = Literal["auto", "tiffslide", "openslide"]


class SlideError(RuntimeError):
    """A slide cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class SlideTimeout(SlideError):
    """A slide used up its time budget (``TilingParams.slide_timeout_s``)."""


class TimeBudget:
    """Wall-clock seconds one slide may take, counted from creation; ``seconds=0`` means no limit.

    :meth:`check` is called between region reads: a read stuck inside a decoder is not interrupted
    here (the runner kills that worker process instead, see :mod:`pipeline.runner`).
    """

    def __init__(self, path: str | Path, seconds: float) -> None:
        self.path, self.seconds = path, seconds
        self._deadline = time.monotonic() + seconds if seconds else math.inf

    def check(self, doing: str) -> None:
        """Raise :class:`SlideTimeout` once the budget is spent; ``doing`` says where ("reading tiles (...)")."""
        if time.monotonic() > self._deadline:
            raise SlideTimeout(self.path, timeout_message(self.seconds, doing))


def timeout_message(seconds: float, doing: str) -> str:
    """What a slide over its budget reports (without the file name)."""
    return (f"exceeded the time budget of {seconds:g} s while {doing}; raise --slide-timeout "
            "(tiling.slide_timeout_s in the flows; 0 disables the budget)")


class SlideReader:
    """A slide opened with one backend. Coordinates are level-0 pixels unless said otherwise."""

    backend: str = ""

    def __init__(self, path: Path, handle) -> None:
        self.path = path
        self._h = handle
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.properties: Mapping[str, str] = dict(handle.properties)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str | None:
        return self._prop("vendor")

    @property
    def metadata_mpp(self) -> tuple[float, float] | None:
        """(x, y) µm per level-0 pixel from the slide's metadata, or None."""
        x, y = _positive(self._prop("mpp-x")), _positive(self._prop("mpp-y"))
        if x is None and y is None:
            aperio = _positive(self.properties.get("aperio.MPP"))
            return (aperio, aperio) if aperio else ome_mpp(self.path)
        return (x or y, y or x)  # type: ignore[return-value]

    @property
    def objective_power(self) -> float | None:
        return _positive(self._prop("objective-power")) or _positive(self.properties.get("aperio.AppMag"))

    def level_scale(self, level: int) -> tuple[float, float]:
        """Exact level-0 px per level px along x and y (from the dimensions, not the rounded downsample)."""
        w0, h0 = self.dimensions
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``(h, w, 3) uint8`` RGB of ``size`` (w, h) level px, top-left at level-0 ``location`` (x, y)."""
        raise NotImplementedError

    def read_level(self, level: int, x: int, y: int, w: int, h: int, parts: np.ndarray | None = None) -> np.ndarray:
        """``(h, w, 3) uint8`` RGB of a rectangle given in the level's own pixels.

        ``parts`` ``(n, 4)`` (x, y, w, h) level px, optional: the only pixels the caller will use; a
        reader may leave the rest of the rectangle undefined (:class:`TiffSlideReader` then decodes
        only the source tiles under them). Their pixels are the same either way.
        """
        ds = self.level_downsamples[level]
        # the backends map a level-0 location to level px by dividing by their downsample and
        # truncating: ceil(x * ds) lands back on x exactly, also for non-integer downsamples
        loc = (x if level == 0 else math.ceil(x * ds), y if level == 0 else math.ceil(y * ds))
        return self.read_region(loc, level, (w, h))

    def read_tiles(self, level: int, xs: np.ndarray, ys: np.ndarray, size: int, out: np.ndarray) -> None:
        """Fill ``out`` ``(n, size, size, 3) uint8`` with the squares of ``size`` level px whose
        top-left corners are ``(xs[k], ys[k])`` level px (``(n,)`` int): here one :meth:`read_level`
        of their bounding box (decoding only what they need), cut into the squares."""
        x0, y0 = int(xs.min()), int(ys.min())
        parts = np.stack([xs, ys, np.full_like(xs, size), np.full_like(ys, size)], axis=1)
        region = self.read_level(level, x0, y0, int(xs.max()) + size - x0, int(ys.max()) + size - y0, parts)
        for k, (x, y) in enumerate(zip((xs - x0).tolist(), (ys - y0).tolist())):
            out[k] = region[y : y + size, x : x + size]

    def level_chroma(self, level: int) -> str | None:
        """The chroma subsampling (``"444"``, ``"422"``, ``"420"``) of ``level``'s stored YCbCr JPEG
        tiles, or None where the level is not YCbCr JPEG or this backend cannot tell (here: never)."""
        return None

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prop(self, name: str) -> str | None:
        return self.properties.get(f"{self.backend}.{name}")


class TiffSlideReader(SlideReader):
    """tiffslide's metadata; pixels of the levels :mod:`pipeline._tiff_direct` can read straight from
    the TIFF's tile table (tiled pages: SVS, generic and OME TIFF) come from there, half the CPU or less
    than tiffslide's zarr view for the same pixels; other levels through tiffslide."""

    backend = "tiffslide"

    def __init__(self, path: Path, handle) -> None:
        from ._tiff_direct import DirectLevels

        super().__init__(path, handle)
        self._direct = DirectLevels(path, handle)

    def _direct_level(self, level: int):
        """The level's :class:`~pipeline._tiff_direct.DirectLevel`, or None where tiffslide reads it."""
        return self._direct.get(level) if 0 <= level < self.level_count else None

    def read_region(self, location, level, size):
        direct = self._direct_level(level)
        if direct is None:
            arr = self._h.read_region(location, level, size, as_array=True)
            return np.ascontiguousarray(arr[..., :3])
        # tiffslide's own mapping of a level-0 location to level px (truncation), so both paths agree
        ds = self.level_downsamples[level]
        return direct.read(int(location[0] / ds), int(location[1] / ds), int(size[0]), int(size[1]))

    def read_level(self, level, x, y, w, h, parts=None):
        direct = self._direct_level(level)
        if direct is None:
            return super().read_level(level, x, y, w, h)
        return direct.read(x, y, w, h, parts)  # read_region's level px for these (see SlideReader.read_level)

    def read_tiles(self, level, xs, ys, size, out):
        direct = self._direct_level(level)
        if direct is None:
            return super().read_tiles(level, xs, ys, size, out)
        direct.read_tiles(xs, ys, size, out)  # the same pixels, without a region between

    def level_chroma(self, level):
        direct = self._direct_level(level)
        return direct.chroma if direct is not None else None  # from the frame header of its first tile

    def close(self) -> None:
        self._direct.close()
        super().close()


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def read_region(self, location, level, size):
        rgba = np.asarray(self._h.read_region(location, level, size))
        rgb = rgba[..., :3].copy()
        # openslide returns premultiplied RGBA, transparent (0, 0, 0, 0) outside the scanned area: show it as glass
        rgb[rgba[..., 3] == 0] = 255
        return rgb


def open_slide(path: str | Path, reader: ReaderName = "auto") -> SlideReader:
    """Open ``path`` with ``reader`` ("auto": tiffslide, then openslide). Raises SlideError."""
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    _check_file(path)
    errors: list[str] = []
    order = ("tiffslide", "openslide") if reader == "auto" else (reader,)
    for name in order:
        try:
            slide = _OPENERS[name](path)
        except SlideError:  # a definite diagnosis (e.g. truncated): no other backend will do better
            raise
        except Exception as e:  # backends raise many types for unreadable files
            errors.append(f"{name}: {type(e).__name__}: {e}".strip())
            continue
        try:
            check_dimensions(slide)
        except SlideError:
            slide.close()
            raise
        try:
            # opening is lazy: decode one pixel so a codec the backend lacks shows up here, not mid-slide
            slide.read_level(slide.level_count - 1, 0, 0, 1, 1)
            return slide
        except Exception as e:
            slide.close()
            errors.append(f"{name}: cannot decode pixels ({type(e).__name__}: {e})".strip())
    raise SlideError(path, "not a readable slide (" + "; ".join(errors) + ")")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(path, "file does not exist")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if not os.access(path, os.R_OK):
        raise SlideError(path, "permission denied: the file is not readable")
    if path.stat().st_size == 0:
        raise SlideError(path, "file is empty (0 bytes)")


def _open_tiffslide(path: Path) -> SlideReader:
    import tiffslide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = tiffslide.TiffSlide(path)
    try:
        _check_tiff_layout(path, handle.ts_tifffile)
    except SlideError:
        handle.close()
        raise
    return TiffSlideReader(path, handle)


def _check_tiff_layout(path: Path, tif) -> None:
    """Check every pyramid level's claimed size and tile table against the file, before any pixel is read.

    For each level of the first series: its sides are at most :data:`MAX_SIDE`; its tile (or strip)
    table has the entries its dimensions need; every tile lies inside the file; its chunks are small
    enough to decode (:data:`MAX_CHUNK_PX`); and its pixels fit in its image data at
    :data:`MAX_PX_PER_BYTE`. A header claiming more than the file holds would otherwise make the
    thumbnail alone take hours (about 262,000 region reads for a 1,000,000 px square).
    """
    size = path.stat().st_size
    for series in tif.series[:1]:
        for level, page in enumerate(lv.pages[0] if hasattr(lv, "pages") else lv for lv in series.levels):
            _check_level_layout(path, level, page, size, ndpi=bool(getattr(tif, "is_ndpi", False)))


def _check_level_layout(path: Path, level: int, page, file_size: int, ndpi: bool) -> None:
    """One TIFF page (``tifffile.TiffPage``) of pyramid ``level``; raises SlideError naming what is wrong."""
    w, h = int(page.imagewidth), int(page.imagelength)
    _check_sides(path, level, w, h)
    offsets = np.asarray(getattr(page, "dataoffsets", ()), np.int64)
    counts = np.asarray(getattr(page, "databytecounts", ()), np.int64)
    chunk_shape = tuple(int(c) for c in getattr(page, "chunks", ()))
    kind = "tile" if page.is_tiled else "strip"
    need = math.prod(int(c) for c in page.chunked) if getattr(page, "chunked", None) else len(counts)
    # tifffile maps an NDPI level's single JPEG onto virtual tiles: no table to compare there
    if not ndpi and (len(counts) != need or len(offsets) != need):
        raise SlideError(
            path,
            f"level {level} claims {w:,} x {h:,} px, which needs {need:,} {kind}s of "
            f"{'x'.join(map(str, chunk_shape[:2][::-1]))} px, but its {kind} table has {len(offsets):,} offsets "
            f"and {len(counts):,} byte counts; the header is corrupt (or was edited)",
        )
    ends = offsets + counts if len(offsets) == len(counts) else counts
    if len(ends) and int(ends.max()) > file_size:
        bad = int(np.argmax(ends > file_size))
        raise SlideError(
            path,
            f"truncated: level {level} needs {int(ends.max()):,} bytes but the file has {file_size:,} "
            f"(its {kind} {bad} of {len(ends):,} ends at byte {int(ends[bad]):,}); "
            "the file was cut short or its tile table is corrupt: copy or download it again",
        )
    if ndpi:
        return
    chunk_px = math.prod(chunk_shape[:2]) if len(chunk_shape) >= 2 else w * h
    if chunk_px > MAX_CHUNK_PX:
        raise SlideError(
            path,
            f"level {level} ({w:,} x {h:,} px) is stored in {kind}s of {chunk_px:,} px; at most {MAX_CHUNK_PX:,} "
            f"px per {kind} are read (each would be decoded whole for any region)",
        )
    filled = counts > 0  # a 0-byte tile is a sparse (blank) tile: nothing to decode
    data = int(np.unique(np.stack([offsets[filled], counts[filled]]), axis=1)[1].sum()) if filled.any() else 0
    pixels = min(int(filled.sum()) * chunk_px, w * h)
    if pixels > MAX_PX_PER_BYTE * max(data, 1):
        raise SlideError(
            path,
            f"level {level} claims {w:,} x {h:,} px ({pixels:,} in non-empty {kind}s) but holds only {data:,} "
            f"bytes of image data: {pixels / max(data, 1):,.0f} px per byte, more than any slide compression "
            f"gives (at most {MAX_PX_PER_BYTE:,} are accepted); the header is corrupt (or was edited)",
        )


def _check_sides(path: Path, level: int, w: int, h: int) -> None:
    """A level's claimed size (px) is positive and at most :data:`MAX_SIDE` on a side."""
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise SlideError(
            path,
            f"level {level} claims {w:,} x {h:,} px; a slide level must be 1 to {MAX_SIDE:,} px on a side "
            f"({MAX_SIDE * 0.1 / 1000:.0f} mm at 0.1 µm/px, longer than a glass slide); the header is corrupt",
        )


def check_dimensions(slide: "SlideReader") -> None:
    """The checks possible for any format (also DICOM, MRXS): every level's sides, and levels that
    shrink. Tile tables of non-TIFF formats are left to openslide; the time budget bounds the rest."""
    previous = None
    for level, (w, h) in enumerate(slide.level_dimensions):
        _check_sides(slide.path, level, w, h)
        if previous is not None and (w > previous[0] or h > previous[1]):
            raise SlideError(
                slide.path,
                f"level {level} ({w:,} x {h:,} px) is larger than level {level - 1} ({previous[0]:,} x "
                f"{previous[1]:,} px); pyramid levels must shrink: the header is corrupt",
            )
        previous = (w, h)


def _open_openslide(path: Path) -> SlideReader:
    import openslide

    _check_tiff_file(path)
    return OpenSlideReader(path, openslide.OpenSlide(str(path)))


def _check_tiff_file(path: Path) -> None:
    """:func:`_check_tiff_layout` for a file openslide reads, when it is a TIFF (SVS, NDPI, SCN, BIF...).

    Other formats (MRXS, DICOM, VMS...) have no TIFF tile table: only :func:`check_dimensions` applies.
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # not a TIFF: openslide's own format parser decides
        return
    with tif:
        _check_tiff_layout(path, tif)


_OPENERS = {"tiffslide": _open_tiffslide, "openslide": _open_openslide}


@dataclass(frozen=True)
class MppInfo:
    """µm per level-0 pixel and where that number came from."""

    x: float
    y: float
    source: Literal["metadata", "manifest", "objective-power"]
    warning: str | None = None


def resolve_mpp(slide: SlideReader, override: float | None = None) -> MppInfo:
    """mpp from a manifest override, else the slide's metadata, else its objective power (with a warning).

    Objective power is only a nominal magnification (10 µm / power, i.e. 20x -> 0.5 µm/px): real scanners
    differ by several percent, so the estimate is flagged. With none of these, the slide fails.
    """
    if override is not None:
        return MppInfo(override, override, "manifest")
    mpp = slide.metadata_mpp
    ignored = ""
    if mpp is not None:
        if all(MPP_RANGE[0] <= m <= MPP_RANGE[1] for m in mpp):
            return MppInfo(mpp[0], mpp[1], "metadata")
        ignored = f"metadata mpp {mpp[0]:g} µm/px is not a microscope resolution (a default TIFF dpi?), ignored; "
    power = slide.objective_power
    if power is not None and MPP_RANGE[0] <= 10.0 / power <= MPP_RANGE[1]:
        est = 10.0 / power
        return MppInfo(
            est, est, "objective-power",
            f"{ignored or 'no mpp in the metadata; '}estimated {est:g} µm/px from objective power {power:g}x "
            "(nominal, may be off by several %)",
        )
    raise SlideError(
        slide.path,
        f"no resolution: {ignored or 'the slide has no mpp or objective power in its metadata; '}"
        "supply it in a manifest CSV with an 'mpp' column (µm per level-0 pixel, e.g. 0.25 for 40x)",
    )


def read_thumbnail(slide: SlideReader, scale: float, block: int = 2048,
                   budget: TimeBudget | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """A low-resolution view of the whole slide, read block by block so memory is bounded by ``block``.

    ``scale`` is the wanted level-0 px per thumbnail px. Reads the coarsest level that is not
    coarser than that and averages ``ceil(scale / level downsample)`` level pixels per thumbnail
    pixel along each axis (an area filter), so the view is never finer than asked (its memory is
    bounded by ``scale``) and at most one level pixel per thumbnail pixel coarser.
    Returns ``((h, w, 3) uint8, (sx, sy))`` with ``(sx, sy)`` the exact level-0 px per thumbnail px.
    ``budget`` is checked before every block read.
    """
    level = max(
        (lv for lv in range(slide.level_count) if slide.level_downsamples[lv] <= scale * 1.001),
        default=0,
    )
    lw, lh = slide.level_dimensions[level]
    lsx, lsy = slide.level_scale(level)
    factor = max(1, int(math.ceil(scale / max(lsx, lsy) - 1e-3)))
    out_w, out_h = max(1, lw // factor), max(1, lh // factor)
    step = max(factor, (block // factor) * factor)
    out = np.empty((out_h, out_w, 3), np.uint8)
    n_blocks = math.ceil(out_h * factor / step) * math.ceil(out_w * factor / step)
    for by in range(0, out_h * factor, step):
        for bx in range(0, out_w * factor, step):
            if budget is not None:
                done = (by // step) * math.ceil(out_w * factor / step) + bx // step
                budget.check(f"reading the thumbnail (level {level}, block {done:,} of {n_blocks:,})")
            w, h = min(step, out_w * factor - bx), min(step, out_h * factor - by)
            region = slide.read_region((round(bx * lsx), round(by * lsy)), level, (w, h))
            if factor > 1:
                region = region.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
                region = np.round(region).astype(np.uint8)
            out[by // factor : (by + h) // factor, bx // factor : (bx + w) // factor] = region
    return out, (lsx * factor, lsy * factor)


# µm per unit of the OME ``UnitsLength`` values a pixel size is given in
_OME_UNITS_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3,
                 "pm": 1e-6, "Å": 1e-4}


def ome_mpp(path: str | Path) -> tuple[float, float] | None:
    """(x, y) µm per level-0 pixel from an OME-TIFF's OME-XML (``Pixels`` ``PhysicalSizeX/Y`` of its
    first image, in their ``PhysicalSize*Unit``, µm by default), or None for another file or no size.

    Pyramidal OME-TIFFs (bfconvert, QuPath) keep the pixel size only there: neither tiffslide nor
    openslide reports it as an mpp property.
    """
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata if tif.is_ome else None
        pixels = next(e for e in ET.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels") if xml else None
    except (OSError, ValueError, ET.ParseError, StopIteration, tifffile.TiffFileError):
        return None
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = _positive(pixels.get(f"PhysicalSize{axis}"))
        scale = _OME_UNITS_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        sizes.append(value * scale if value is not None and scale is not None else None)
    x, y = sizes
    return (x or y, y or x) if (x or y) else None


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None

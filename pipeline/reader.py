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
]

READERS = ("auto", "tiffslide", "openslide")
MPP_RANGE = (0.02, 20.0)  # µm/px a microscope scan can plausibly have; 72 dpi TIFF defaults are 352.8
ReaderName = Literal["auto", "tiffslide", "openslide"]


class SlideError(RuntimeError):
    """A slide cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


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
            return (aperio, aperio) if aperio else None
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

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3) uint8`` RGB of a rectangle given in the level's own pixels."""
        ds = self.level_downsamples[level]
        # the backends map a level-0 location to level px by dividing by their downsample and
        # truncating: ceil(x * ds) lands back on x exactly, also for non-integer downsamples
        loc = (x if level == 0 else math.ceil(x * ds), y if level == 0 else math.ceil(y * ds))
        return self.read_region(loc, level, (w, h))

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prop(self, name: str) -> str | None:
        return self.properties.get(f"{self.backend}.{name}")


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def read_region(self, location, level, size):
        arr = self._h.read_region(location, level, size, as_array=True)
        return np.ascontiguousarray(arr[..., :3])


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
        _check_not_truncated(path, handle.ts_tifffile)
    except SlideError:
        handle.close()
        raise
    return TiffSlideReader(path, handle)


def _check_not_truncated(path: Path, tif) -> None:
    """A TIFF whose image data points past the end of the file was cut short (an interrupted copy)."""
    size = path.stat().st_size
    for series in tif.series[:1]:
        for level, page in enumerate(lv.pages[0] if hasattr(lv, "pages") else lv for lv in series.levels):
            offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
            end = max((o + c for o, c in zip(offsets, counts, strict=False)), default=0)
            if end > size:
                raise SlideError(
                    path,
                    f"truncated: level {level} needs {end:,} bytes but the file has {size:,}; "
                    "copy or download it again",
                )


def _open_openslide(path: Path) -> SlideReader:
    import openslide

    return OpenSlideReader(path, openslide.OpenSlide(str(path)))


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


def read_thumbnail(slide: SlideReader, scale: float, block: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """A low-resolution view of the whole slide, read block by block so memory is bounded by ``block``.

    ``scale`` is the wanted level-0 px per thumbnail px. Reads the coarsest level that is not
    coarser than that and averages ``ceil(scale / level downsample)`` level pixels per thumbnail
    pixel along each axis (an area filter), so the view is never finer than asked (its memory is
    bounded by ``scale``) and at most one level pixel per thumbnail pixel coarser.
    Returns ``((h, w, 3) uint8, (sx, sy))`` with ``(sx, sy)`` the exact level-0 px per thumbnail px.
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
    for by in range(0, out_h * factor, step):
        for bx in range(0, out_w * factor, step):
            w, h = min(step, out_w * factor - bx), min(step, out_h * factor - by)
            region = slide.read_region((round(bx * lsx), round(by * lsy)), level, (w, h))
            if factor > 1:
                region = region.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
                region = np.round(region).astype(np.uint8)
            out[by // factor : (by + h) // factor, bx // factor : (bx + w) // factor] = region
    return out, (lsx * factor, lsy * factor)


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None

"""Reading the tiles of a grid from a slide: the hot path.

Tiles are read in blocks: the kept tiles of a block of neighbouring grid cells (at most ``block_px``
level px on a side) are read together, so every JPEG tile of the slide is decoded about once
instead of up to four times by unaligned per-tile reads.

When the chosen level's resolution equals the target (the tile's far edge off by at most half a
pixel) the tiles are plain crops, read with :meth:`~pipeline.reader.SlideReader.read_tiles` (on the
direct TIFF path each decoded source tile is copied straight into the tiles it meets). Otherwise each tile is resampled from its exact, sub-pixel footprint with a
Lanczos filter (antialiased when downsampling), so the tile covers exactly ``tile_size * target_mpp``
µm whatever the scan resolution. Downsampling by f >= 2 first averages whole f x f pixel blocks of
the block region (an area filter, PIL's ``reduce``), then applies Lanczos for the remaining
fraction: about half the cost of a full Lanczos at 2x. Where nothing remains (a 0.25 µm/px scan
read for 0.5 µm/px tiles: f = 2 exactly, tiles on the block grid) the averaged pixels are the tile.

:func:`source_chroma` tells the tiler when the tiles are crops on the source JPEG's coding-unit grid,
so that ``"auto"`` chroma subsampling (:class:`pipeline.codecs.TileCompression`) can store them at
the source's own subsampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from .reader import SlideError, SlideReader, TimeBudget

__all__ = ["ReadPlan", "plan_reads", "iter_tile_blocks", "source_chroma"]

_RESAMPLE_MARGIN = 3  # px around a resampled tile for the Lanczos support
_MCU = {"444": (8, 8), "422": (16, 8), "420": (16, 16)}  # (w, h) px of a JPEG minimum coded unit


@dataclass(frozen=True)
class ReadPlan:
    """How to read tiles at ``level``: tile footprint in level px and the order of tiles by block.

    ``order`` permutes the input tiles into block order; ``blocks`` are ``(start, stop)`` ranges of it.
    """

    level: int
    level_scale: tuple[float, float]  # level-0 px per level px (x, y)
    footprint: tuple[float, float]  # tile side in level px (x, y)
    tile_size: int
    resample: bool
    order: np.ndarray
    blocks: list[tuple[int, int]]


def plan_reads(
    coords: np.ndarray,
    footprint0: tuple[float, float],
    level: int,
    level_scale: tuple[float, float],
    tile_size: int,
    block_px: int = 2048,
) -> ReadPlan:
    """Group tiles (level-0 ``coords`` (N, 2), level-0 ``footprint0``) into blocks read at ``level``."""
    fw, fh = footprint0[0] / level_scale[0], footprint0[1] / level_scale[1]
    # a crop is exact enough when its far edge is off by at most half a level pixel
    resample = abs(fw - tile_size) > 0.5 or abs(fh - tile_size) > 0.5
    cells = max(1, int(block_px // max(fw, fh)))
    if len(coords) == 0:
        return ReadPlan(level, level_scale, (fw, fh), tile_size, resample, np.zeros(0, np.int64), [])
    col = np.floor(coords[:, 0] / footprint0[0] + 0.5).astype(np.int64) // cells
    row = np.floor(coords[:, 1] / footprint0[1] + 0.5).astype(np.int64) // cells
    order = np.lexsort((coords[:, 0], coords[:, 1], col, row))
    key = row[order] * (col.max() + 1) + col[order]
    cuts = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(order)]])
    return ReadPlan(level, level_scale, (fw, fh), tile_size, resample, order, list(zip(starts.tolist(), stops.tolist())))


def iter_tile_blocks(slide: SlideReader, coords: np.ndarray, plan: ReadPlan,
                     budget: TimeBudget | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, tiles)`` block by block, in ``plan.order``.

    ``indices`` (n,) int64 index into ``coords``; ``tiles`` is ``(n, T, T, 3) uint8``.
    Memory: one block's tiles (and, resampling, its region) at a time. ``budget`` is checked before every block read.
    """
    lsx, lsy = plan.level_scale
    fw, fh = plan.footprint
    T = plan.tile_size
    lw, lh = slide.level_dimensions[plan.level]
    # resampling: whole f x f blocks are averaged once per block region (an exact area filter), then
    # Lanczos takes each tile's sub-pixel box from the reduced image, with a margin for its support
    f = max(1, int(min(fw, fh) // T))
    exact = abs(fw / f - T) < 1e-6 and abs(fh / f - T) < 1e-6  # e.g. 0.25 -> 0.5 µm/px: f = 2, no remainder
    # no filter support needed when averaging is all there is: a margin would decode a whole extra
    # row and column of the slide's JPEG tiles for a few pixels
    margin = 0 if exact else _RESAMPLE_MARGIN * f
    for start, stop in plan.blocks:
        if budget is not None:
            budget.check(f"reading tiles (level {plan.level}, {start:,} of {len(plan.order):,} read)")
        idx = plan.order[start:stop]
        lx = coords[idx, 0] / lsx
        ly = coords[idx, 1] / lsy
        out = np.empty((len(idx), T, T, 3), np.uint8)
        if not plan.resample:
            ix, iy = _crop_origins(lx, ly, lw, lh, T)
            _read_tiles(slide, plan.level, ix, iy, T, out)
        else:
            x0 = max(0, int(math.floor(lx.min())) - margin)
            y0 = max(0, int(math.floor(ly.min())) - margin)
            x1 = min(lw, int(math.ceil(lx.max() + fw)) + margin)
            y1 = min(lh, int(math.ceil(ly.max() + fh)) + margin)
            parts = _resample_parts(lx, ly, x0, y0, fw, fh, f, T, exact)
            region = Image.fromarray(_read(slide, plan.level, x0, y0, x1 - x0, y1 - y0, parts))
            if f > 1:
                region = region.reduce(f)
            rw, rh = region.size
            pixels = np.asarray(region)
            for k, (x, y) in enumerate(zip(lx - x0, ly - y0)):
                bx, by = x / f, y / f
                if exact and abs(bx - round(bx)) < 1e-6 and abs(by - round(by)) < 1e-6:
                    out[k] = pixels[round(by) : round(by) + T, round(bx) : round(bx) + T]  # the average is the tile
                    continue
                box = (bx, by, min(bx + fw / f, rw), min(by + fh / f, rh))
                out[k] = np.asarray(region.resize((T, T), Image.Resampling.LANCZOS, box=tuple(map(float, box))))
        yield idx, out


def source_chroma(slide: SlideReader, coords: np.ndarray, plan: ReadPlan) -> str | None:
    """The chroma subsampling (``"420"``, ``"422"``, ``"444"``) of the source JPEG tiles that the
    tiles of ``plan`` (level-0 ``coords`` (N, 2)) are cut from, when every tile is a plain crop whose
    corners lie on the source's grid of JPEG coding units (16 level px for 4:2:0) and ``tile_size``
    is a whole number of them: tiles stored at that subsampling then keep all the colour resolution
    the source has, on the same 8 x 8 blocks. None when the tiles are resampled (a 0.25 µm/px scan
    read for 0.5 µm/px tiles: its chroma is at the tiles' full resolution), lie off that grid, or
    the level is not YCbCr JPEG (or its backend cannot tell)."""
    if plan.resample or len(coords) == 0:
        return None
    chroma = slide.level_chroma(plan.level)
    if chroma not in _MCU:
        return None
    mw, mh = _MCU[chroma]
    lw, lh = slide.level_dimensions[plan.level]
    T = plan.tile_size
    ix, iy = _crop_origins(coords[:, 0] / plan.level_scale[0], coords[:, 1] / plan.level_scale[1], lw, lh, T)
    if T % mw or T % mh or np.any(ix % mw) or np.any(iy % mh):
        return None
    return chroma


def _crop_origins(lx: np.ndarray, ly: np.ndarray, lw: int, lh: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Level px of the top-left corners of ``T`` px crops at level px ``(lx, ly)``, kept inside the
    ``lw x lh`` level."""
    return (np.minimum(np.round(lx).astype(np.int64), lw - T), np.minimum(np.round(ly).astype(np.int64), lh - T))


def _resample_parts(lx: np.ndarray, ly: np.ndarray, x0: int, y0: int, fw: float, fh: float, f: int, T: int,
                    exact: bool) -> np.ndarray:
    """``(n, 4)`` int64 (x, y, w, h) level px each resampled tile's pixels come from: its footprint, and
    around it the Lanczos support (3 px of the reduced image per unit of scale) plus one reduced pixel
    for the f x f averaging grid; none where the average alone is the tile (see iter_tile_blocks)."""
    scale = max(1.0, fw / f / T, fh / f / T)
    pad = np.full(len(lx), (math.ceil(3 * scale) + 2) * f, np.int64)
    if exact:
        bx, by = (lx - x0) / f, (ly - y0) / f
        aligned = (np.abs(bx - np.round(bx)) < 1e-6) & (np.abs(by - np.round(by)) < 1e-6)
        pad[aligned] = 0
    px, py = np.floor(lx).astype(np.int64) - pad, np.floor(ly).astype(np.int64) - pad
    return np.stack([px, py, math.ceil(fw) + 1 + 2 * pad, math.ceil(fh) + 1 + 2 * pad], axis=1)


def _read(slide: SlideReader, level: int, x: int, y: int, w: int, h: int,
          parts: np.ndarray | None = None) -> np.ndarray:
    """``read_level`` (only ``parts`` needed, see there) with an error that says where the slide could
    not be decoded."""
    try:
        return slide.read_level(level, x, y, w, h, parts)
    except Exception as e:  # decoders raise many types; the slide, not the run, has failed
        raise _decode_error(slide, level, x, y, w, h, e) from e


def _read_tiles(slide: SlideReader, level: int, xs: np.ndarray, ys: np.ndarray, size: int, out: np.ndarray) -> None:
    """``read_tiles`` (squares of ``size`` level px at ``(xs, ys)`` into ``out``) with an error that says
    where the slide could not be decoded."""
    try:
        slide.read_tiles(level, xs, ys, size, out)
    except Exception as e:  # decoders raise many types; the slide, not the run, has failed
        x0, y0 = int(xs.min()), int(ys.min())
        raise _decode_error(slide, level, x0, y0, int(xs.max()) + size - x0, int(ys.max()) + size - y0, e) from e


def _decode_error(slide: SlideReader, level: int, x: int, y: int, w: int, h: int, e: Exception) -> SlideError:
    """The slide failed to decode the rectangle ``(x, y, w, h)`` level px of ``level``."""
    return SlideError(
        slide.path,
        f"cannot decode level {level} at ({x}, {y}) size {w}x{h} ({type(e).__name__}: {e}); "
        "the file may be truncated or corrupt",
    )

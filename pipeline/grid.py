"""The tile grid, in physical units.

A tile is ``tile_size`` px at ``target_mpp`` µm/px, so it covers ``tile_um = tile_size * target_mpp`` µm
of the slide whatever the scan resolution. On level 0 its footprint is
``tile_size * target_mpp / mpp0`` px along each axis, a real number: a 0.2465 µm/px scan at
0.5 µm/px and 256 px gives 519.27 level-0 px, not 512 or 520.

Tile ``(i, j)`` starts at ``round(i * footprint_x), round(j * footprint_y)`` level-0 px: positions come
from the index, never from adding a rounded step, so the error is under one pixel everywhere on the
slide (no drift). Only tiles lying wholly inside the slide are on the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TileGrid", "tile_grid", "pick_level"]


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of tiles over level 0.

    ``coords`` is ``(N, 2) int64`` level-0 (x, y) of every grid tile's top-left corner, row-major.
    ``footprint`` is the tile side in level-0 px (x, y), as real numbers.
    """

    coords: np.ndarray
    footprint: tuple[float, float]
    shape: tuple[int, int]  # (rows, cols)
    tile_size: int
    target_mpp: float

    @property
    def tile_um(self) -> float:
        return self.tile_size * self.target_mpp


def tile_grid(
    dimensions: tuple[int, int], mpp0: tuple[float, float], target_mpp: float, tile_size: int
) -> TileGrid:
    """Grid of ``tile_size`` px tiles at ``target_mpp`` µm/px over a slide of level-0 ``dimensions`` (w, h).

    ``mpp0`` is the level-0 resolution (x, y) in µm/px. A slide smaller than one tile gives an empty grid.
    """
    if target_mpp <= 0 or tile_size <= 0:
        raise ValueError("target_mpp and tile_size must be positive")
    w, h = dimensions
    fx, fy = tile_size * target_mpp / mpp0[0], tile_size * target_mpp / mpp0[1]
    # a tile must fit: its rounded start plus its footprint may not pass the slide's edge
    cols = max(0, int(math.floor((w - 0.5) / fx + 1e-9)))
    rows = max(0, int(math.floor((h - 0.5) / fy + 1e-9)))
    cols = _fit(cols, fx, w)
    rows = _fit(rows, fy, h)
    xs = np.round(np.arange(cols) * fx).astype(np.int64)
    ys = np.round(np.arange(rows) * fy).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return TileGrid(coords=coords, footprint=(fx, fy), shape=(rows, cols), tile_size=tile_size, target_mpp=target_mpp)


def _fit(n: int, step: float, extent: int) -> int:
    while n > 0 and round((n - 1) * step) + step > extent + 1e-6:
        n -= 1
    while round(n * step) + step <= extent + 1e-6:
        n += 1
    return n


def pick_level(level_mpps: list[float], target_mpp: float, rtol: float = 1e-3) -> int:
    """The coarsest level whose resolution is at least as fine as the target (mpp <= target).

    ``rtol`` absorbs the rounding of level dimensions (a 0.25 µm/px slide's level 1 is 0.50002 µm/px).
    Falls back to level 0 when even level 0 is coarser than the target (the tiles are then upsampled).
    """
    ok = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + rtol)]
    return max(ok, key=lambda i: level_mpps[i]) if ok else 0

import numpy as np
import pytest

from pipeline.grid import pick_level, tile_grid


@pytest.mark.parametrize("mpp0", [0.25, 0.2465, 0.265, 0.5, 0.499, 1.0])
def test_footprint_is_physical_and_positions_do_not_drift(mpp0):
    w, h = 100_000, 80_000
    g = tile_grid((w, h), (mpp0, mpp0), target_mpp=0.5, tile_size=256)
    fx = 256 * 0.5 / mpp0
    assert g.footprint == pytest.approx((fx, fx))
    assert g.tile_um == 128.0
    rows, cols = g.shape
    xs = g.coords[:cols, 0]
    ys = g.coords[::cols, 1]
    # every start within half a pixel of its exact position, so no error accumulates across the slide
    assert np.abs(xs - np.arange(cols) * fx).max() <= 0.5
    assert np.abs(ys - np.arange(rows) * fx).max() <= 0.5
    # the grid is as large as fits: the last tile is inside, one more would not be
    assert xs[-1] + fx <= w + 1e-6 and round(cols * fx) + fx > w
    assert ys[-1] + fx <= h + 1e-6 and round(rows * fx) + fx > h


def test_trident_style_rounding_is_not_used():
    # a 0.265 µm/px scan: 256 px at 0.5 µm/px covers 483.02 level-0 px, not 512 (20x nominal)
    g = tile_grid((10_000, 10_000), (0.265, 0.265), 0.5, 256)
    assert g.footprint[0] == pytest.approx(483.0189, abs=1e-3)
    assert np.diff(g.coords[: g.shape[1], 0]).min() in (483, 484)


def test_anisotropic_pixels():
    g = tile_grid((5000, 5000), (0.25, 0.5), 0.5, 100)
    assert g.footprint == pytest.approx((200.0, 100.0))
    assert g.shape == (50, 25)


def test_slide_smaller_than_a_tile_gives_an_empty_grid():
    g = tile_grid((200, 150), (0.5, 0.5), 0.5, 256)
    assert g.coords.shape == (0, 2) and g.shape == (0, 0)


def test_pick_level_takes_the_coarsest_level_not_coarser_than_target():
    assert pick_level([0.25, 0.50002, 1.0, 4.0], 0.5) == 1
    assert pick_level([0.25, 1.0, 4.0], 0.5) == 0
    assert pick_level([0.25, 1.0, 4.0], 1.0) == 1
    assert pick_level([0.6, 2.4], 0.5) == 0  # even level 0 is too coarse: read it and upsample

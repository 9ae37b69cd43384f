"""The direct TIFF read path (pipeline/_tiff_direct.py): the pixels tiffslide's ``read_region`` gives,
for the real Aperio JPEG slide, a JPEG 2000 SVS and a pyramidal OME-TIFF, on aligned and unaligned
regions, regions over the slide's edge and outside it; tiffslide still reads what the path does not
take (stripped TIFF); whole-slide tiling gives the tiles of the tiffslide path."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pipeline import _tiff_direct
from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.reader import SlideError, SlideReader, open_slide
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore
from pipeline.tiler import plan_slide
from pipeline.tiles import _read, iter_tile_blocks
from tests.pipeline.test_formats import MPP, write_ome_pyramid


@pytest.fixture(scope="module")
def cmu_pixels(real_slide) -> np.ndarray:
    return tifffile.imread(real_slide)[:2048, :2048]


def _regions(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in level px: at the origin, unaligned over 4+ source tiles, over the right and
    bottom edges (straddling the last tiles), over the top-left corner, wholly outside, one pixel."""
    return [(0, 0, 256, 256), (200, 130, 300, 250), (w - 150, h - 90, 400, 300), (-20, -7, 100, 60),
            (w + 5, 3, 40, 40), (w - 1, h - 1, 1, 1), (0, 0, w, h)]


def _assert_direct_equals_tiffslide(path) -> int:
    """Every level of ``path`` is read by the direct path and gives tiffslide's pixels; levels checked."""
    with open_slide(path, "tiffslide") as slide:
        for level, (w, h) in enumerate(slide.level_dimensions):
            assert slide._direct.get(level) is not None, f"level {level} fell back to tiffslide"
            ds = slide.level_downsamples[level]
            for x, y, rw, rh in _regions(w, h):
                loc = (int(round(x * ds)), int(round(y * ds)))
                ours = slide.read_region(loc, level, (rw, rh))
                theirs = slide._h.read_region(loc, level, (rw, rh), as_array=True)[..., :3]
                assert ours.shape == (rh, rw, 3) and ours.dtype == np.uint8
                np.testing.assert_array_equal(ours, theirs, err_msg=f"level {level} region {(x, y, rw, rh)}")
        return slide.level_count


def test_real_aperio_jpeg_svs_reads_as_tiffslide(real_slide):
    with tifffile.TiffFile(real_slide) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression == 7 and page.jpegtables is not None  # shared tables
    _assert_direct_equals_tiffslide(real_slide)


def test_jpeg2000_svs_reads_as_tiffslide(cmu_pixels, tmp_path):
    path = tmp_path / "cmu-j2k.svs"
    with tifffile.TiffWriter(path) as tif:
        tif.write(cmu_pixels[:1000, :1300], tile=(256, 256), compression=33003, photometric="rgb", metadata=None,
                  description=f"Aperio Image Library v12.0.15\n1300x1000 (256x256) J2K/KDU Q=70|AppMag = 20|MPP = {MPP}")
    _assert_direct_equals_tiffslide(path)


def test_ome_tiff_pyramid_reads_as_tiffslide(cmu_pixels, tmp_path):
    path = tmp_path / "cmu.ome.tiff"
    write_ome_pyramid(path, cmu_pixels[:1500, :1700], MPP)
    assert _assert_direct_equals_tiffslide(path) == 3


def test_stripped_tiff_falls_back_to_tiffslide(cmu_pixels, tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, cmu_pixels[:600, :700], photometric="rgb", rowsperstrip=64, metadata=None)
    with open_slide(path, "tiffslide") as slide:
        assert slide._direct.get(0) is None
        np.testing.assert_array_equal(slide.read_region((650, 10), 0, (100, 80)),
                                      slide._h.read_region((650, 10), 0, (100, 80), as_array=True)[..., :3])


def _sparse_tiff(path, pixels: np.ndarray):
    """A 512 x 512 px zlib TIFF of ``pixels`` in 256 px tiles whose first tile is stored as 0 bytes."""
    tifffile.imwrite(path, pixels[:512, :512], tile=(256, 256), photometric="rgb", compression="zlib",
                     metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["TileByteCounts"].overwrite((0,) + tuple(tif.pages[0].databytecounts[1:]))
    return path


def test_a_sparse_tile_reads_as_tiffslide(cmu_pixels, tmp_path):
    """A 0-byte tile (a sparse, blank tile) is zeros in both paths."""
    path = _sparse_tiff(tmp_path / "sparse.tif", cmu_pixels)
    with open_slide(path, "tiffslide") as slide:
        assert slide._direct.get(0) is not None
        ours = slide.read_region((100, 100), 0, (300, 300))
        np.testing.assert_array_equal(ours, slide._h.read_region((100, 100), 0, (300, 300), as_array=True)[..., :3])
        assert not ours[:150, :150].any() and ours[200:].any()


def test_a_corrupt_tile_fails_the_slide_with_its_name(real_slide, tmp_path):
    path = tmp_path / "bad.svs"
    data = bytearray(real_slide.read_bytes())
    with tifffile.TiffFile(real_slide) as tif:
        offset, count = tif.pages[0].dataoffsets[9], tif.pages[0].databytecounts[9]
    data[offset:offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    with open_slide(path, "tiffslide") as slide:
        with pytest.raises(SlideError, match="bad.svs.*cannot decode level 0"):
            _read(slide, 0, 0, 0, slide.dimensions[0], slide.dimensions[1])


def test_parts_decode_only_the_source_tiles_they_meet(real_slide):
    """A block read with ``parts``: their pixels are tiffslide's; source tiles no part meets stay zero."""
    with open_slide(real_slide, "tiffslide") as slide:
        whole = slide._h.read_region((0, 0), 0, (960, 960), as_array=True)[..., :3]
        # 240 px source tiles: the parts meet tiles (row, column) (0-1, 0-1) and (2, 2)
        parts = np.array([[10, 20, 240, 240], [500, 490, 100, 50]])
        ours = slide.read_level(0, 0, 0, 960, 960, parts)
        for x, y, w, h in parts:
            np.testing.assert_array_equal(ours[y:y + h, x:x + w], whole[y:y + h, x:x + w])
        np.testing.assert_array_equal(ours[:480, :480], whole[:480, :480])  # whole tiles are decoded
        np.testing.assert_array_equal(ours[480:720, 480:720], whole[480:720, 480:720])
        assert not ours[:, 720:].any() and not ours[720:].any() and not ours[:480, 480:].any()


def _squares(w: int, h: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (level px) of squares of ``size``: aligned and not, at the right and bottom
    edges (the tiler's last tiles), over the edges and corners, wholly outside, and one twice."""
    pts = [(0, 0), (250, 130), (w - size, h - size), (w - size, 0), (0, h - size), (w - size // 2, 7),
           (9, h - size // 3), (-20, -7), (w + 5, 3), (3, h + 40), (250, 130), (w - size - 1, h - size - 1)]
    xs, ys = np.array(pts, np.int64).T
    return xs, ys


def _assert_read_tiles_is_region_and_cut(path, size: int) -> None:
    """Every level of ``path``: the direct ``read_tiles`` gives the pixels of the region-and-cut read
    (``SlideReader.read_tiles``) and of tiffslide, in an ``out`` full of garbage before."""
    with open_slide(path, "tiffslide") as slide:
        for level, (w, h) in enumerate(slide.level_dimensions):
            assert slide._direct.get(level) is not None
            xs, ys = _squares(w, h, size)
            ours = np.full((len(xs), size, size, 3), 171, np.uint8)
            slide.read_tiles(level, xs, ys, size, ours)
            cut = np.full_like(ours, 29)
            SlideReader.read_tiles(slide, level, xs, ys, size, cut)
            np.testing.assert_array_equal(ours, cut, err_msg=f"level {level}")
            ds = slide.level_downsamples[level]
            for k, (x, y) in enumerate(zip(xs.tolist(), ys.tolist())):
                theirs = slide._h.read_region((round(x * ds), round(y * ds)), level, (size, size), as_array=True)
                np.testing.assert_array_equal(ours[k], theirs[..., :3], err_msg=f"level {level} square {(x, y)}")


@pytest.mark.filterwarnings("ignore:location=.*out-of-bounds")
def test_read_tiles_is_the_region_and_cut_read(real_slide, cmu_pixels, tmp_path):
    """Squares straight from the decoded source tiles: the real SVS (240 px source tiles, squares of
    256 and 100 px), and every level of an OME-TIFF pyramid."""
    for size in (256, 100):
        _assert_read_tiles_is_region_and_cut(real_slide, size)
    path = tmp_path / "cmu.ome.tiff"
    write_ome_pyramid(path, cmu_pixels[:1500, :1700], MPP)
    _assert_read_tiles_is_region_and_cut(path, 224)


def test_read_tiles_leaves_sparse_source_tiles_zero(cmu_pixels, tmp_path):
    """A 0-byte source tile is zeros in every square it meets, as in the region read."""
    path = _sparse_tiff(tmp_path / "sparse.tif", cmu_pixels)
    with open_slide(path, "tiffslide") as slide:
        xs, ys = np.array([0, 100, 200, 300, 256]), np.array([0, 100, 50, 300, 0])
        ours = np.full((5, 256, 256, 3), 171, np.uint8)
        slide.read_tiles(0, xs, ys, 256, ours)
        cut = np.full_like(ours, 29)
        SlideReader.read_tiles(slide, 0, xs, ys, 256, cut)
        np.testing.assert_array_equal(ours, cut)
        assert not ours[0].any() and not ours[1, :156, :156].any() and ours[1, 156:].any()
        np.testing.assert_array_equal(ours[3, :212, :212], cmu_pixels[300:512, 300:512])  # lossless: the source
        assert not ours[3, 212:].any() and not ours[3, :, 212:].any()  # outside the level
        np.testing.assert_array_equal(ours[4], cmu_pixels[:256, 256:512])


def _jpeg_tiff(path, pixels: np.ndarray, tile: int = 256):
    """A tiled JPEG TIFF (YCbCr 4:2:0, as scanners write) of ``pixels``, ``tile`` px source tiles."""
    tifffile.imwrite(path, pixels, tile=(tile, tile), photometric="rgb", compression="jpeg", metadata=None)
    return path


def test_jpeg_tiles_take_the_direct_decode(real_slide, cmu_pixels, tmp_path):
    """Baseline JPEG tiles (the real SVS's, with shared tables; YCbCr ones) are decoded by the direct
    imagecodecs call, not tifffile's wrapper, and give tiffslide's pixels (checked above)."""
    for path in (real_slide, _jpeg_tiff(tmp_path / "ycbcr.tif", cmu_pixels[:700, :900])):
        with open_slide(path, "tiffslide") as slide:
            assert slide._direct.get(0)._jpeg is not None, path
    with open_slide(tmp_path / "ycbcr.tif", "tiffslide") as slide:
        assert slide._direct.get(0)._jpeg["outcolorspace"] == 2  # YCbCr -> RGB, as tifffile asks


@pytest.mark.filterwarnings("ignore:location=.*out-of-bounds")
def test_squares_that_are_source_tiles_are_decoded_in_place(cmu_pixels, tmp_path, monkeypatch):
    """256 px squares on a 256 px JPEG tile grid: each aligned square is decoded straight into its
    slot of ``out``; aligned, unaligned and edge squares all give tiffslide's pixels."""
    path = _jpeg_tiff(tmp_path / "aligned.tif", cmu_pixels[:1000, :1300])
    _assert_read_tiles_is_region_and_cut(path, 256)
    decoded_into = []
    real = _tiff_direct.imagecodecs.jpeg8_decode

    def spy(data, out=None, **kw):
        decoded_into.append(out)
        return real(data, out=out, **kw)

    with open_slide(path, "tiffslide") as slide:
        direct = slide._direct.get(0)
        monkeypatch.setattr(_tiff_direct.imagecodecs, "jpeg8_decode", spy)
        xs, ys = np.array([0, 256, 512, 100]), np.array([0, 0, 256, 40])
        out = np.full((4, 256, 256, 3), 171, np.uint8)
        slide.read_tiles(0, xs, ys, 256, out)
        assert sum(o is not None and o.base is out for o in decoded_into) == 3  # the aligned ones
        monkeypatch.undo()
        for k in range(4):
            theirs = slide._h.read_region((int(xs[k]), int(ys[k])), 0, (256, 256), as_array=True)[..., :3]
            np.testing.assert_array_equal(out[k], theirs)
        assert direct._jpeg is not None


def test_a_direct_decode_that_disagrees_with_tifffile_is_not_used(cmu_pixels, tmp_path, monkeypatch):
    """The first tile is decoded both ways when a level opens: arguments that would give other
    pixels (here a wrong colour space) leave tifffile's decoder in charge."""
    path = _jpeg_tiff(tmp_path / "ycbcr.tif", cmu_pixels[:600, :600])
    real = _tiff_direct._jpeg_args
    monkeypatch.setattr(_tiff_direct, "_jpeg_args", lambda page: {**real(page), "outcolorspace": None,
                                                                   "colorspace": 2})
    with open_slide(path, "tiffslide") as slide:
        direct = slide._direct.get(0)
        assert direct is not None and direct._jpeg is None
        ours = slide.read_region((10, 20), 0, (400, 300))
        np.testing.assert_array_equal(ours, slide._h.read_region((10, 20), 0, (400, 300), as_array=True)[..., :3])


@pytest.mark.parametrize("target_mpp", [MPP, 2 * MPP, 1.0])
def test_whole_slide_tiling_gives_the_tiffslide_tiles(real_slide, tmp_path, monkeypatch, target_mpp):
    """Tiling the real slide (a subprocess, the direct path) stores the tiles the tiffslide path reads:
    crops at the scan's resolution, 2x averages (no Lanczos) and resampled tiles (reduce + Lanczos)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "cmu.svs").symlink_to(real_slide)
    params = TilingParams(target_mpp=target_mpp, tile_size=256, min_tissue=0.1, reader="tiffslide",
                          compression=TileCompression(kind="none"))
    report = tile_cohort(slides, tmp_path / "s.zarr", params)
    assert report.exit_code == 0, report.table()
    store = SlideStore(tmp_path / "s.zarr")
    stored, coords = store.tiles("cmu", "cmu")[:], store.coords("cmu", "cmu")
    assert len(stored) > 10

    monkeypatch.setattr(_tiff_direct, "direct_level", lambda *a: None)  # every level through tiffslide
    with open_slide(real_slide, "tiffslide") as slide:
        assert slide._direct.get(0) is None
        plan = plan_slide(slide, params)
        assert plan.reads.resample == (target_mpp != MPP)
        np.testing.assert_array_equal(plan.grid.coords[plan.keep], coords)
        old = np.empty_like(stored)  # in tissue order; stored in read order (plan.keep)
        for idx, tiles in iter_tile_blocks(slide, plan.grid.coords[plan.tissue_idx], plan.reads):
            old[idx] = tiles
    np.testing.assert_array_equal(stored, old[plan.reads.order])

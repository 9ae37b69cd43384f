""""auto" JPEG chroma subsampling: the source's chroma subsampling is read from its JPEG frame headers,
tiles that are crops on the source's coding-unit grid are stored at it, everything else at 4:4:4;
what auto stores keeps the source's colour (and off the grid 4:2:0 would not); stores tiled at the
old 4:4:4 default are not retiled."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

from pipeline import _tiff_direct
from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.reader import open_slide
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore, StoreWriter
from pipeline.tiler import needs_tiling, plan_slide
from pipeline.tiles import iter_tile_blocks, source_chroma


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF YCbCr of uint8 RGB, float64 (..., 3)."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    return np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                     128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                     128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3,) PSNR in dB per YCbCr channel of RGB ``b`` against ``a`` (n, H, W, 3), capped at 99 dB."""
    mse = ((_ycbcr(a) - _ycbcr(b)) ** 2).reshape(-1, 3).mean(axis=0)
    return np.minimum(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), 99.0)


def _roundtrip(tiles: np.ndarray, sub: str) -> np.ndarray:
    return np.stack([imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(t, level=90, subsampling=sub))
                     for t in tiles])


def test_chroma_is_read_from_the_jpeg_frame_header(real_slide, tmp_path):
    tile = np.ascontiguousarray(tifffile.imread(real_slide)[:64, :64])
    for sub in ("444", "422", "420"):
        assert _tiff_direct.jpeg_chroma(imagecodecs.jpeg8_encode(tile, level=90, subsampling=sub)) == sub
    assert _tiff_direct.jpeg_chroma(imagecodecs.jpeg8_encode(np.ascontiguousarray(tile[..., 1]), level=90)) is None
    assert _tiff_direct.jpeg_chroma(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header
    assert _tiff_direct.jpeg_chroma(b"not a jpeg") is None
    pixels = tifffile.imread(real_slide)[:600, :600]
    ycc420, ycc444 = tmp_path / "420.tif", tmp_path / "444.tif"
    tifffile.imwrite(ycc420, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
    tifffile.imwrite(ycc444, pixels, tile=(256, 256), photometric="ycbcr", subsampling=(1, 1),
                     compression="jpeg", metadata=None)
    for path, want in ((ycc420, "420"), (ycc444, "444"), (real_slide, None)):  # the real SVS is RGB-JPEG
        with open_slide(path, "tiffslide") as slide:
            assert slide.level_chroma(0) == want, path
    with open_slide(ycc420, "openslide") as slide:
        assert slide.level_chroma(0) is None  # this backend cannot tell


def test_auto_is_the_sources_subsampling_only_for_crops_on_its_grid(make_slide):
    path = make_slide("s.svs", 2048, 1536, mpp=0.5)  # YCbCr 4:2:0 JPEG tiles of 256 px
    with open_slide(path, "tiffslide") as slide:
        assert slide.level_chroma(0) == "420"
        for target, want in ((0.5, "420"), (1.0, None), (0.55, None)):  # crops; 2x average; Lanczos
            p = plan_slide(slide, TilingParams(target_mpp=target))
            assert source_chroma(slide, p.grid.coords[p.tissue_idx], p.reads) == want, target
        p = plan_slide(slide, TilingParams())
        coords = p.grid.coords[p.tissue_idx]
        assert source_chroma(slide, coords + [8, 0], p.reads) is None  # on the 8 px blocks, off the 16 px units
        assert source_chroma(slide, coords + [16, 32], p.reads) == "420"
    with open_slide(path, "openslide") as slide:
        p = plan_slide(slide, TilingParams())
        assert source_chroma(slide, p.grid.coords[p.tissue_idx], p.reads) is None
    auto = TileCompression()
    assert auto.name == "jpeg:90:auto" and TileCompression.from_name("jpeg") == auto
    assert auto.for_source("420").subsampling == "420" and auto.for_source(None).subsampling == "444"
    assert TileCompression.from_name("jpeg:90:444").for_source("420").subsampling == "444"  # asked for: kept
    assert auto.codecs_for()["serializer"].subsampling == "444"  # unsettled: full chroma
    with pytest.raises(ValueError, match="subsampling"):
        TileCompression.from_name("jpeg:90:411")


def test_auto_tiles_keep_the_sources_colour_and_off_grid_420_would_not(make_slide, tmp_path):
    """Crops on a 4:2:0 source's 16 px grid stored at 4:2:0 are as close to the source as 4:4:4 ones
    in every YCbCr channel (and smaller); the same tiles 8 px off that grid lose chroma at 4:2:0,
    which is why auto stores those at 4:4:4."""
    src = make_slide("s.svs", 2048, 1536, mpp=0.5)
    report = tile_cohort(src.parent, tmp_path / "s.zarr", TilingParams(reader="tiffslide"))
    assert report.exit_code == 0, report.table()
    store = SlideStore(tmp_path / "s.zarr")
    attrs = store.slide_attrs("s", "s")
    assert attrs["stored_compression"]["subsampling"] == "420"
    assert attrs["compression"]["subsampling"] == "auto"
    arr = store.tiles("s", "s")
    assert arr.array.metadata.codecs[0].codecs[0].subsampling == "420"
    stored = arr[:]
    with open_slide(src, "tiffslide") as slide:
        p = plan_slide(slide, TilingParams())
        source = np.empty_like(stored)
        for idx, block in iter_tile_blocks(slide, p.grid.coords[p.tissue_idx], p.reads):
            source[idx] = block
        source = source[p.reads.order]
        shifted = np.stack([slide.read_region((int(x) + 8, int(y)), 0, (256, 256)) for x, y in
                            p.grid.coords[p.keep][:12]])
    full = _roundtrip(source, "444")
    assert np.all(_psnr(source, stored) >= _psnr(source, full) - 1.0), (_psnr(source, stored), _psnr(source, full))
    assert sum(len(imagecodecs.jpeg8_encode(t, level=90, subsampling="420")) for t in source[:12]) < \
        sum(len(imagecodecs.jpeg8_encode(t, level=90, subsampling="444")) for t in source[:12])
    off_420, off_444 = _psnr(shifted, _roundtrip(shifted, "420")), _psnr(shifted, _roundtrip(shifted, "444"))
    assert np.all(off_420[1:] < off_444[1:] - 3.0), (off_420, off_444)


def test_resampled_tiles_are_stored_at_444_and_the_old_default_is_not_retiled(make_slide, tmp_path):
    src = make_slide("s.svs", 2048, 1536, mpp=0.25)
    store = tmp_path / "s.zarr"
    old = TilingParams(reader="tiffslide", compression=TileCompression.from_name("jpeg:90:444"))
    assert tile_cohort(src.parent, store, old).exit_code == 0
    st = SlideStore(store)
    assert st.tiles("s", "s").array.metadata.codecs[0].codecs[0].subsampling == "444"
    from pipeline.cohort import SlideSpec

    spec = SlideSpec(path=src, patient_id="s", slide_id="s")
    writer = StoreWriter(store)
    assert not needs_tiling(writer, spec, TilingParams(reader="tiffslide"))  # the new default: nothing retiled
    assert [r.status for r in tile_cohort(src.parent, store, TilingParams(reader="tiffslide")).results] == ["skipped"]
    assert needs_tiling(writer, spec, TilingParams(compression=TileCompression.from_name("jpeg:90:420")))
    # a 0.25 µm/px scan read for 0.5 µm/px tiles (2 x 2 averages): its chroma is at the tiles' resolution
    assert tile_cohort(src.parent, store, TilingParams(reader="tiffslide"), force=True).exit_code == 0
    attrs = SlideStore(store).slide_attrs("s", "s")
    assert attrs["resampled"] and attrs["stored_compression"]["subsampling"] == "444"
    assert needs_tiling(writer, spec, TilingParams(compression=TileCompression.from_name("jpeg:90:444")))

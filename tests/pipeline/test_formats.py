"""Slide formats made here from the real CMU H&E region, tiled from a folder, pixels checked against the
file: a pyramidal OME-TIFF (as bfconvert and QuPath write them: resolution in its OME-XML, id without
``.ome``), a JPEG 2000 Aperio SVS (as many TCGA slides are), a flat stripped TIFF without a pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.ids import ids_from_filename
from pipeline.reader import open_slide, ome_mpp, resolve_mpp
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore

MPP = 0.499  # the CMU region's scan resolution


def write_ome_pyramid(path, image: np.ndarray, mpp: float, unit: str = "µm", levels: int = 3) -> None:
    """Level 0 with its pixel size in the OME-XML only, reduced levels as SubIFDs (lossless zlib tiles)."""
    value = mpp * {"µm": 1.0, "nm": 1e3, "mm": 1e-3}[unit]
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tif:
        tif.write(image, subifds=levels - 1, tile=(256, 256), compression="zlib", photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": value, "PhysicalSizeXUnit": unit,
                            "PhysicalSizeY": value, "PhysicalSizeYUnit": unit})
        for level in range(1, levels):
            f = 2 ** level
            reduced = image[: image.shape[0] // f * f, : image.shape[1] // f * f]
            reduced = reduced.reshape(image.shape[0] // f, f, image.shape[1] // f, f, 3).mean(axis=(1, 3))
            tif.write(reduced.astype(np.uint8), subfiletype=1, tile=(256, 256), compression="zlib",
                      photometric="rgb", metadata=None)


@pytest.fixture(scope="module")
def cmu_pixels(real_slide) -> np.ndarray:
    return tifffile.imread(real_slide)[:2048, :2048]


@pytest.mark.parametrize("unit", ["µm", "nm"])
def test_ome_xml_gives_the_resolution(cmu_pixels, tmp_path, unit):
    path = tmp_path / "cmu.ome.tiff"
    write_ome_pyramid(path, cmu_pixels, MPP, unit)
    assert ome_mpp(path) == pytest.approx((MPP, MPP))
    slide = open_slide(path, "tiffslide")
    info = resolve_mpp(slide)
    assert (info.x, info.y, info.source) == (pytest.approx(MPP), pytest.approx(MPP), "metadata")


def test_a_tiff_without_ome_xml_still_has_no_resolution(cmu_pixels, tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, cmu_pixels[:512, :512], tile=(256, 256), photometric="rgb", metadata=None)
    assert ome_mpp(path) is None


def test_ome_tiff_id_drops_the_ome_suffix():
    assert ids_from_filename("/data/case-7.ome.tiff") == ("case-7", "case-7")
    assert ids_from_filename("/data/case-7.OME.tif") == ("case-7", "case-7")
    assert ids_from_filename("/data/case-7.tif") == ("case-7", "case-7")


def test_ome_tiff_folder_tiles_with_exact_pixels(cmu_pixels, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_ome_pyramid(slides / "cmu.ome.tiff", cmu_pixels, MPP)
    attrs = _tile_and_compare(slides, tmp_path, cmu_pixels, "cmu")
    assert attrs["mpp_source"] == "metadata"


def _tile_and_compare(slides, tmp_path, expected: np.ndarray, slide_id: str, reader: str = "auto"):
    """Tile ``slides`` at the scan's own resolution without compression; every stored tile must equal
    the ``expected`` level-0 pixels at its coordinates."""
    params = TilingParams(target_mpp=MPP, tile_size=256, min_tissue=0.3, reader=reader,
                          compression=TileCompression(kind="none"))
    report = tile_cohort(slides, tmp_path / "s.zarr", params)
    assert report.exit_code == 0, report.table()
    store = SlideStore(tmp_path / "s.zarr")
    attrs = store.slide_attrs(slide_id, slide_id)
    assert attrs["mpp0"] == pytest.approx([MPP, MPP], rel=1e-4) and not attrs["resampled"]
    tiles, coords = store.tiles(slide_id, slide_id)[:], store.coords(slide_id, slide_id)
    assert len(tiles) > 10
    for tile, (x, y) in zip(tiles, coords):
        np.testing.assert_array_equal(tile, expected[y:y + 256, x:x + 256])
    return attrs


def test_jpeg2000_aperio_svs_tiles_with_the_files_pixels(cmu_pixels, tmp_path):
    """Many TCGA slides are Aperio SVS with JPEG 2000 tiles (compression 33003)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    path = slides / "cmu-j2k.svs"
    with tifffile.TiffWriter(path) as tif:
        tif.write(cmu_pixels, tile=(256, 256), compression=33003, photometric="rgb", metadata=None,
                  description=f"Aperio Image Library v12.0.15\n2048x2048 (256x256) J2K/KDU Q=70|AppMag = 20|MPP = {MPP}")
        tif.write(cmu_pixels[::8, ::8].copy(), photometric="rgb", metadata=None, description="thumbnail")
    decoded = tifffile.imread(path, key=0)  # the file's own pixels, through the same decoder
    attrs = _tile_and_compare(slides, tmp_path, decoded, "cmu-j2k")
    assert attrs["vendor"] == "aperio"


def test_flat_stripped_tiff_without_a_pyramid(cmu_pixels, tmp_path):
    """A flat, stripped TIFF (no tiles, no pyramid): tiffslide reads it, the resolution tags give mpp."""
    slides = tmp_path / "slides"
    slides.mkdir()
    tifffile.imwrite(slides / "flat.tif", cmu_pixels, photometric="rgb", rowsperstrip=64, metadata=None,
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(slides / "flat.tif") as tif:
        assert not tif.pages[0].is_tiled and len(tif.pages) == 1
    _tile_and_compare(slides, tmp_path, cmu_pixels, "flat")

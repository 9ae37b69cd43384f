"""A pyramidal OME-TIFF (as bfconvert and QuPath write them) tiles with the resolution of its OME-XML
and an id without ``.ome``; made here from the real CMU H&E region, pixels checked against the file."""

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
    params = TilingParams(target_mpp=MPP, tile_size=256, min_tissue=0.3, compression=TileCompression(kind="none"))
    report = tile_cohort(slides, tmp_path / "s.zarr", params)
    assert report.exit_code == 0, report.table()
    store = SlideStore(tmp_path / "s.zarr")
    assert store.patients() == ["cmu"] and store.slides("cmu") == ["cmu"]
    attrs = store.slide_attrs("cmu", "cmu")
    assert attrs["mpp0"] == pytest.approx([MPP, MPP]) and attrs["mpp_source"] == "metadata"
    assert not attrs["resampled"]
    tiles, coords = store.tiles("cmu", "cmu")[:], store.coords("cmu", "cmu")
    assert len(tiles) > 10
    for tile, (x, y) in zip(tiles, coords):  # a crop of level 0, bit for bit
        np.testing.assert_array_equal(tile, cmu_pixels[y:y + 256, x:x + 256])

import shutil

import numpy as np
import pytest

from pipeline.reader import SlideError, open_slide, read_thumbnail, resolve_mpp
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_both_readers_give_the_same_slide(make_slide, reader):
    path = make_slide("s.svs", width=3000, height=2000, mpp=0.25)
    with open_slide(path, reader) as s:
        assert s.backend == reader and s.vendor == "aperio"
        assert s.dimensions == (3000, 2000) and s.level_count >= 2
        assert s.level_downsamples[1] == pytest.approx(4.0, rel=0.01)
        assert resolve_mpp(s).x == pytest.approx(0.25) and resolve_mpp(s).source == "metadata"
        region = s.read_region((512, 256), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(s.read_level(0, 512, 256, 300, 200), region)
        # level coordinates map back exactly: level 1 (x, y) is level-0 (4x, 4y)
        np.testing.assert_array_equal(s.read_level(1, 100, 50, 64, 32), s.read_region((400, 200), 1, (64, 32)))


def test_readers_agree_on_pixels(make_slide):
    path = make_slide("s.svs")
    with open_slide(path, "tiffslide") as a, open_slide(path, "openslide") as b:
        diff = np.abs(a.read_level(0, 100, 100, 512, 512).astype(int) - b.read_level(0, 100, 100, 512, 512).astype(int))
        assert diff.mean() < 1.0


def test_objective_power_fallback_is_flagged_and_recorded(make_slide, tmp_path, capsys):
    path = make_slide("s.svs", mpp=None, objective_power=20)
    with open_slide(path) as s:
        info = resolve_mpp(s)
    assert info.source == "objective-power" and info.x == pytest.approx(0.5) and "objective power 20x" in info.warning
    report = tile_cohort(path, tmp_path / "s.zarr")
    assert report.exit_code == 0 and "objective power" in report.table()
    attrs = SlideStore(tmp_path / "s.zarr").slide_attrs("s", "s")
    assert attrs["mpp_source"] == "objective-power" and "nominal" in attrs["mpp_warning"]


def test_manifest_mpp_overrides_metadata(make_slide):
    path = make_slide("s.svs", mpp=0.5)
    with open_slide(path) as s:
        assert resolve_mpp(s, 0.2465) == resolve_mpp(s, 0.2465)
        assert resolve_mpp(s, 0.2465).source == "manifest" and resolve_mpp(s, 0.2465).x == 0.2465


def test_default_tiff_dpi_is_not_taken_for_a_microscope_resolution(openslide_fixtures):
    with open_slide(openslide_fixtures / "boxes.tiff") as s:  # 72 dpi: 352.8 µm/px
        with pytest.raises(SlideError, match="not a microscope resolution.*'mpp' column"):
            resolve_mpp(s)


def test_dicom_opens_through_the_openslide_fallback(openslide_fixtures, tmp_path):
    with open_slide(openslide_fixtures / "boxes_0.dcm") as s:
        assert s.backend == "openslide" and s.vendor == "dicom"
        assert resolve_mpp(s).x == pytest.approx(0.499)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.svs", "file does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "e.svs", b""), r"empty \(0 bytes\)"),
        (lambda d: _write(d / "t.svs", b"hello"), "not a readable slide"),
    ],
)
def test_unusable_files_name_the_file_and_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SlideError, match=message) as e:
        open_slide(path)
    assert str(path) in str(e.value)


def test_unreadable_file_says_permission_denied(make_slide, monkeypatch):
    path = make_slide("s.svs")
    monkeypatch.setattr("pipeline.reader.os.access", lambda p, mode: False)  # root ignores chmod
    with pytest.raises(SlideError, match="permission denied"):
        open_slide(path)


def test_openslide_fixture_that_fails_to_decode(openslide_fixtures, tmp_path):
    shutil.copy(openslide_fixtures / "unopenable.tiff", tmp_path / "u.tiff")
    with pytest.raises(SlideError, match="tiffslide: cannot decode pixels.*openslide"):
        open_slide(tmp_path / "u.tiff")


def test_unknown_reader_is_a_value_error(make_slide):
    with pytest.raises(ValueError, match="unknown reader"):
        open_slide(make_slide("s.svs"), "bioformats")


def test_thumbnail_is_an_area_average_stitched_from_blocks(make_slide):
    path = make_slide("s.svs", width=3000, height=2000)
    with open_slide(path) as s:
        small_blocks, scale = read_thumbnail(s, 4.0, block=256)
        one_block, scale2 = read_thumbnail(s, 4.0, block=4096)
        assert scale == scale2
        np.testing.assert_array_equal(small_blocks, one_block)
        # level 1 is 4x: read as is
        assert scale == pytest.approx((4.0, 4.0)) and small_blocks.shape == (500, 750, 3)
        coarse, cscale = read_thumbnail(s, 10.0)
        assert cscale[0] >= 10.0 and cscale[0] < 10.0 + 4.0  # never finer than asked, one level px coarser at most
        level0 = s.read_level(0, 0, 0, 3000, 2000).astype(float)
        f = int(round(cscale[0]))
        ref = level0[: coarse.shape[0] * f, : coarse.shape[1] * f].reshape(coarse.shape[0], f, coarse.shape[1], f, 3).mean(axis=(1, 3))
        assert np.abs(ref - coarse).mean() < 6  # level 1 is a JPEG of its own, not bit-equal to level 0


def test_truncated_tiff_is_diagnosed_as_truncated(make_slide, tmp_path):
    data = make_slide("s.svs", width=2048, height=2048).read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"truncated: level 0 needs [\d,]+ bytes but the file has [\d,]+"):
        open_slide(cut)

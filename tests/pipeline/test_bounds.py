"""Bounded work: a slide's claimed layout is checked against its file before any pixel is read, and
each slide has a time budget. Slides here are real TIFF files made by the tests, some with their
header edited in place the way a corrupt copy or a hostile file would have it."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hlss.cli import main
from pipeline.config import TilingParams
from pipeline.reader import MAX_SIDE, SlideError, SlideTimeout, TimeBudget, open_slide, read_thumbnail
from pipeline.store import SlideStore
from store_snapshot import assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[2]
_TIFF_TYPES = {3: "<H", 4: "<I", 16: "<Q"}  # SHORT, LONG, LONG8


def patch_tag(path: Path, page: int, tag: str, values: list[int]) -> None:
    """Overwrite the values of ``tag`` of TIFF ``page`` in place (same count, same type)."""
    with tifffile.TiffFile(path) as tif:
        t = tif.pages[page].tags[tag]
        fmt, pos, count = _TIFF_TYPES[t.dtype], t.valueoffset, t.count
    assert len(values) in (1, count)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(b"".join(struct.pack(fmt, v) for v in (values * count if len(values) == 1 else values)))


def tile_cli(source: Path, store: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``hlss tile`` in a subprocess, bounded by ``timeout`` (a run that never ends fails the test)."""
    return subprocess.run([sys.executable, "-m", "hlss", "tile", str(source), "--store", str(store),
                           "--no-progress", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def slow_slide(path: Path) -> Path:
    """A real 4000 x 4000 px RGB TIFF at 0.5 µm/px stored as one LZMA strip: every region read
    decodes the whole image (about 0.3 s here), so the thumbnail alone takes a few seconds."""
    img = tifffile.imread(ROOT / "tests/data/cmu_small_region.svs")[:2000, :2000]
    tifffile.imwrite(path, np.tile(img, (2, 2, 1)), photometric="rgb", compression="lzma",
                     compressionargs={"level": 0}, rowsperstrip=4000, resolution=(20000, 20000),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


def test_oversized_header_fails_alone_quickly(make_slide, tmp_path):
    """The issue's case: level 0 edited to claim 1,000,000 px square. Today its thumbnail alone is
    262,144 region reads (hours); now it fails in seconds, naming the file, the size and the problem."""
    folder, store = tmp_path / "slides", tmp_path / "s.zarr"
    good = make_slide("good.svs", folder=folder)
    assert tile_cli(folder, store).returncode == 0
    before = snapshot(store)
    huge = folder / "huge.svs"
    shutil.copy(good, huge)
    patch_tag(huge, 0, "ImageWidth", [1_000_000])
    patch_tag(huge, 0, "ImageLength", [1_000_000])
    t0 = time.monotonic()
    proc = tile_cli(folder, store, timeout=60)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "FAILED huge" in ln)
    assert f"{huge}: level 0 claims 1,000,000 x 1,000,000 px, which needs 15,264,649 tiles of 256x256 px" in line
    assert "tile table has 48 offsets" in line and "header is corrupt" in line
    assert_unchanged(before, snapshot(store), allow=("patients/huge/",))
    assert SlideStore(store).slide_attrs("huge", "huge")["status"] == "failed"


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_tile_table_past_end_of_file(make_slide, tmp_path, reader):
    path = make_slide("s.svs", width=2048, height=1536)
    with tifffile.TiffFile(path) as tif:
        offsets = list(tif.pages[0].dataoffsets)
    offsets[5] = path.stat().st_size + 1000
    patch_tag(path, 0, "TileOffsets", offsets)
    with pytest.raises(SlideError, match=r"truncated: level 0 needs [\d,]+ bytes but the file has [\d,]+ "
                                         r"\(its tile 5 of 48 ends at byte [\d,]+\).*tile table is corrupt") as e:
        open_slide(path, reader)
    assert str(path) in str(e.value)


def test_level_side_beyond_any_glass_slide(make_slide, tmp_path):
    path = make_slide("s.svs")
    patch_tag(path, 0, "ImageWidth", [MAX_SIDE + 1])
    with pytest.raises(SlideError, match=rf"level 0 claims {MAX_SIDE + 1:,} x 1,536 px; a slide level must be "
                                         rf"1 to {MAX_SIDE:,} px on a side"):
        open_slide(path)


def test_tile_table_whose_tiles_share_a_few_bytes(tmp_path):
    """A table consistent with the dimensions, every entry pointing at the same 40-byte tile: the
    claimed pixels cannot come from the bytes in the file."""
    path = tmp_path / "shared.tif"
    tifffile.imwrite(path, np.full((4096, 4096, 3), 255, np.uint8), tile=(512, 512), photometric="rgb",
                     compression="zstd", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(path) as s:  # honest blank glass (zstd: a few dozen bytes a tile) passes
        assert s.dimensions == (4096, 4096)
    with tifffile.TiffFile(path) as tif:
        first, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    patch_tag(path, 0, "TileOffsets", [first])
    patch_tag(path, 0, "TileByteCounts", [count])
    with pytest.raises(SlideError, match=r"level 0 claims 4,096 x 4,096 px \(16,777,216 in non-empty tiles\) but "
                                         rf"holds only {count} bytes of image data: [\d,]+ px per byte"):
        open_slide(path)


def test_a_strip_too_large_to_decode(tmp_path):
    path = tmp_path / "strip.tif"  # one 8200 x 8200 strip: 67 Mpx decoded whole for any region
    tifffile.imwrite(path, np.zeros((8200, 8200), np.uint8), compression="zlib", rowsperstrip=8200)
    with pytest.raises(SlideError, match=r"level 0 \(8,200 x 8,200 px\) is stored in strips of 67,240,000 px; "
                                         r"at most 67,108,864 px per strip are read"):
        open_slide(path, "tiffslide")


def test_real_slides_pass_the_layout_checks(real_slide, openslide_fixtures):
    for path, reader in [(real_slide, "tiffslide"), (real_slide, "openslide"),
                         (openslide_fixtures / "small.svs", "auto"), (openslide_fixtures / "boxes.tiff", "auto"),
                         (openslide_fixtures / "boxes_0.dcm", "openslide")]:  # DICOM: the dimension checks only
        with open_slide(path, reader) as s:
            assert s.dimensions[0] > 0


def test_time_budget_stops_the_thumbnail_between_reads(tmp_path):
    path = slow_slide(tmp_path / "slow.tif")
    with open_slide(path) as s:
        budget = TimeBudget(path, 0.5)
        t0 = time.monotonic()
        with pytest.raises(SlideTimeout, match=r"slow.tif: exceeded the time budget of 0.5 s while reading the "
                                               r"thumbnail \(level 0, block [1-3] of 4\); raise --slide-timeout"):
            read_thumbnail(s, 16.0, budget=budget)
        assert time.monotonic() - t0 < 5
    TimeBudget(path, 0).check("never")  # 0: no budget


def test_time_budget_stops_the_tile_reads_between_blocks(make_slide):
    from pipeline.grid import tile_grid
    from pipeline.tiles import iter_tile_blocks, plan_reads

    path = make_slide("s.svs", width=3000, height=2500)
    with open_slide(path) as s:
        g = tile_grid(s.dimensions, (0.5, 0.5), 0.5, 256)
        plan = plan_reads(g.coords, g.footprint, 0, (1.0, 1.0), 256, block_px=1024)
        budget = TimeBudget(path, 0.3)
        blocks = iter_tile_blocks(s, g.coords, plan, budget)
        first, _ = next(blocks)
        time.sleep(0.4)
        with pytest.raises(SlideTimeout, match=rf"exceeded the time budget of 0.3 s while reading tiles \(level 0, "
                                               rf"{len(first)} of {len(g.coords)} read\)"):
            next(blocks)


def test_slow_slide_over_its_budget_fails_alone_and_keeps_the_store(make_slide, tmp_path):
    folder, store = tmp_path / "slides", tmp_path / "s.zarr"
    make_slide("good.svs", folder=folder)
    assert main(["tile", str(folder), "--store", str(store), "--no-progress"]) == 0
    before = snapshot(store)
    slow_slide(folder / "slow.tif")
    proc = tile_cli(folder, store, "--slide-timeout", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "FAILED slow" in ln)
    assert "slow.tif: exceeded the time budget of 1 s while reading the thumbnail" in line
    assert "raise --slide-timeout (tiling.slide_timeout_s in the flows; 0 disables the budget)" in line
    assert_unchanged(before, snapshot(store), allow=("patients/slow/",))
    attrs = SlideStore(store).slide_attrs("slow", "slow")
    assert attrs["status"] == "failed" and "time budget" in attrs["error"]
    assert [p.name for p in (store / "_staging").iterdir() if p.is_dir()] == []


def test_slide_timeout_setting_is_checked():
    assert TilingParams().slide_timeout_s == 1800
    with pytest.raises(ValueError, match="slide timeout -1 s must be a number of seconds >= 0"):
        TilingParams(slide_timeout_s=-1)
    # the budget does not change what is written: no retiling when it is raised
    assert TilingParams(slide_timeout_s=60).params_hash() == TilingParams().params_hash()


def test_cli_refuses_a_negative_slide_timeout(make_slide, tmp_path, capsys):
    slide = make_slide("a.svs")
    assert main(["tile", str(slide), "--store", str(tmp_path / "s.zarr"), "--no-progress",
                 "--slide-timeout", "-5"]) == 2
    assert "argument --slide-timeout: -5 is outside 0-604800 s" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_the_flows_tiling_settings_carry_the_budget(tmp_path):
    from flows.settings import TilingSettings
    from pipeline.cohort import SlideSpec
    from pipeline.store import StoreWriter
    from pipeline.tiler import tile_slide

    params = TilingSettings(slide_timeout_s=1).params()
    path = slow_slide(tmp_path / "slow.tif")
    result = tile_slide(SlideSpec(path=path, patient_id="p", slide_id="slow"), StoreWriter(tmp_path / "s.zarr"), params)
    assert result.status == "failed" and "exceeded the time budget of 1 s while reading the thumbnail" in result.error

"""End to end: slides -> tiles -> store, on synthetic slides and a small real slide."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from PIL import Image

from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.reader import open_slide
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore

LOSSLESS = TilingParams(compression=TileCompression.from_name("lossless"))
CONTRACT_ATTRS = {
    "status", "source", "reader", "mpp0", "mpp_source", "target_mpp", "tile_size", "tile_um", "level",
    "downsample", "tissue_params", "params_hash", "n_tiles", "timings",
}


def read_manifest(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cohort_is_tiled_into_the_contract_layout(demo_cohort, tmp_path):
    report = tile_cohort(demo_cohort, tmp_path / "s.zarr", LOSSLESS, workers=2)
    rows = read_manifest(demo_cohort)
    assert report.exit_code == 0, report.table()
    assert len(report.by_status("complete")) == len(rows)
    store = SlideStore(tmp_path / "s.zarr")
    assert store.patients() == sorted({r["patient_id"] for r in rows})
    for row in rows:
        p, s = row["patient_id"], row["slide_id"]
        assert store.patient_attrs(p)["label"] == row["label"] and store.patient_attrs(p)["split"] == row["split"]
        attrs = store.slide_attrs(p, s)
        assert CONTRACT_ATTRS <= set(attrs), CONTRACT_ATTRS - set(attrs)
        assert attrs["status"] == "complete" and attrs["mpp_source"] == "metadata"
        tiles, coords, tissue = store.tiles(p, s), store.coords(p, s), store.tissue(p, s)
        n = attrs["n_tiles"]
        assert n > 0 and tiles.shape == (n, 256, 256, 3) and tiles.dtype == np.uint8
        assert coords.shape == (n, 2) and coords.dtype == np.int64
        assert tissue.shape == (n,) and tissue.dtype == np.float32 and tissue.min() >= 0.5
        assert tiles.chunks == (1, 256, 256, 3)  # one tile, one read
        w, h = attrs["dimensions"]
        assert (coords >= 0).all() and (coords[:, 0] + 256 <= w).all() and (coords[:, 1] + 256 <= h).all()
        thumb, mask = store.thumbnail(p, s), store.tissue_mask(p, s)
        assert thumb.shape[:2] == mask.shape and mask.dtype == bool
        assert store.group(p, s)["tissue_mask"].attrs["scale"] == pytest.approx([16.0, 16.0])
        # lossless tiles are exactly the slide's pixels at their coordinates (0.5 µm/px: plain crops)
        with open_slide(row["slide_path"] if os.path.isabs(row["slide_path"]) else demo_cohort.parent / row["slide_path"]) as slide:
            for i in (0, n // 2, n - 1):
                x, y = coords[i]
                np.testing.assert_array_equal(tiles[i], slide.read_region((int(x), int(y)), 0, (256, 256)))


def test_rerun_skips_unchanged_and_redoes_changed_slides(make_slide, tmp_path):
    folder = tmp_path / "slides"
    a = make_slide("a.svs", folder=folder, seed=1)
    make_slide("b.svs", folder=folder, seed=2)
    store = tmp_path / "s.zarr"
    first = tile_cohort(folder, store, LOSSLESS)
    assert len(first.by_status("complete")) == 2
    second = tile_cohort(folder, store, LOSSLESS)
    assert [r.status for r in second.results] == ["skipped", "skipped"]
    make_slide("a.svs", folder=folder, seed=99)  # re-scanned: new content under the same name
    third = tile_cohort(folder, store, LOSSLESS)
    assert {r.slide_id: r.status for r in third.results} == {"a": "complete", "b": "skipped"}
    fourth = tile_cohort(folder, store, TilingParams(compression=LOSSLESS.compression, min_tissue=0.25))
    assert [r.status for r in fourth.results] == ["complete", "complete"]
    os.utime(a, (time.time() + 100, time.time() + 100))  # touched, same bytes: nothing to do
    assert [r.status for r in tile_cohort(folder, store, TilingParams(compression=LOSSLESS.compression, min_tissue=0.25)).results] == ["skipped", "skipped"]


def test_non_native_resolution_is_resampled_to_the_exact_footprint(make_slide, tmp_path):
    # 0.265 µm/px: a 256 px tile at 0.5 µm/px covers 483.02 level-0 px (TRIDENT would read 512)
    slide = make_slide("s.svs", width=3000, height=2400, mpp=0.265)
    report = tile_cohort(slide, tmp_path / "s.zarr", LOSSLESS)
    assert report.exit_code == 0, report.table()
    store = SlideStore(tmp_path / "s.zarr")
    attrs = store.slide_attrs("s", "s")
    assert attrs["footprint_px"][0] == pytest.approx(483.0189, abs=1e-3) and attrs["resampled"]
    assert attrs["level"] == 0
    coords, tiles = store.coords("s", "s"), store.tiles("s", "s")
    with open_slide(slide) as r:
        x, y = (int(v) for v in coords[0])
        region = Image.fromarray(r.read_region((x, y), 0, (484, 484)))
    ref = np.asarray(region.resize((256, 256), Image.Resampling.LANCZOS, box=(0, 0, 483.0189, 483.0189))).astype(float)
    err = np.abs(ref - tiles[0].astype(float)).mean()
    assert err < 2.0, err  # same footprint, same filter; differences only at the Lanczos border


def test_lower_pyramid_level_is_used_when_it_matches_the_target(make_slide, tmp_path):
    # 0.125 µm/px with 4x levels: level 1 is 0.5 µm/px, so tiles are crops of level 1
    slide = make_slide("s.svs", width=8192, height=4096, mpp=0.125)
    report = tile_cohort(slide, tmp_path / "s.zarr", LOSSLESS)
    assert report.exit_code == 0, report.table()
    attrs = SlideStore(tmp_path / "s.zarr").slide_attrs("s", "s")
    assert attrs["level"] == 1 and not attrs["resampled"] and attrs["footprint_px"] == [1024.0, 1024.0]


def test_bad_slides_fail_alone_with_specific_errors(make_slide, tmp_path):
    folder = tmp_path / "slides"
    make_slide("good.svs", folder=folder)
    (folder / "notaslide.svs").write_text("this is a text file, not a slide\n")
    (folder / "empty.tiff").write_bytes(b"")
    data = make_slide("truncated.svs", folder=tmp_path / "src", width=2048, height=2048).read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    make_slide("blank.svs", folder=folder, tissue=False)
    make_slide("tiny.svs", folder=folder, width=200, height=150)
    make_slide("nompp.tif", folder=folder, mpp=None, vendor="generic")
    report = tile_cohort(folder, tmp_path / "s.zarr", LOSSLESS)
    by = {r.slide_id: r for r in report.results}
    assert by["good"].status == "complete" and by["good"].n_tiles > 0
    assert report.exit_code == 1
    errors = {k: r.error for k, r in by.items() if r.status == "failed"}
    assert set(errors) == {"notaslide", "empty", "truncated", "blank", "tiny", "nompp"}, report.table()
    assert "not a readable slide" in errors["notaslide"] and "notaslide.svs" in errors["notaslide"]
    assert "empty (0 bytes)" in errors["empty"]
    assert "truncated.svs" in errors["truncated"] and "truncated" in errors["truncated"].split(":", 1)[1]
    assert "no tissue tiles" in errors["blank"]
    assert "smaller than one tile" in errors["tiny"]
    assert "no resolution" in errors["nompp"] and "'mpp' column" in errors["nompp"]
    store = SlideStore(tmp_path / "s.zarr")
    assert store.slides("good", status="complete") == ["good"]
    failed = store.slide_attrs("blank", "blank")
    assert failed["status"] == "failed" and "no tissue" in failed["error"]
    assert store.thumbnail("blank", "blank").ndim == 3  # kept for QC
    assert SlideStore(tmp_path / "s.zarr").summary()["n_failed"] == 6
    # a manifest can supply the missing mpp
    (tmp_path / "m.csv").write_text(f"slide_path,patient_id,mpp\n{folder / 'nompp.tif'},P9,0.5\n")
    fixed = tile_cohort(tmp_path / "m.csv", tmp_path / "s.zarr", LOSSLESS)
    assert fixed.exit_code == 0 and SlideStore(tmp_path / "s.zarr").slide_attrs("P9", "nompp")["mpp_source"] == "manifest"


def test_manifest_problems_and_missing_files_do_not_stop_the_cohort(make_slide, tmp_path):
    good = make_slide("good.svs")
    other = make_slide("other.svs", seed=3)
    (tmp_path / "m.csv").write_text(
        "slide_path,patient_id,slide_id\n"
        f"{good},P1,S1\n"
        f"{tmp_path / 'missing.svs'},P2,S2\n"
        f"{other},../../escape,S3\n"
        f"{other},P4,S1\n"
    )
    report = tile_cohort(tmp_path / "m.csv", tmp_path / "s.zarr", LOSSLESS)
    errors = [r.error for r in report.by_status("failed")]
    assert any("missing.svs: file does not exist" in e for e in errors)
    assert any("not allowed" in e for e in errors)
    assert sum("duplicate slide id 'S1'" in e for e in errors) == 2
    assert not (tmp_path / "escape").exists() and not list(tmp_path.glob("**/escape"))


def test_a_failing_rerun_keeps_the_complete_slide(make_slide, tmp_path):
    slide = make_slide("a.svs")
    store = tmp_path / "s.zarr"
    assert tile_cohort(slide, store, LOSSLESS).exit_code == 0
    n = SlideStore(store).slide_attrs("a", "a")["n_tiles"]
    slide.write_bytes(slide.read_bytes()[:5000])  # the file is damaged afterwards
    report = tile_cohort(slide, store, LOSSLESS)
    assert report.exit_code == 1
    attrs = SlideStore(store).slide_attrs("a", "a")
    assert attrs["status"] == "complete" and attrs["n_tiles"] == n
    assert SlideStore(store).tiles("a", "a").shape[0] == n


def test_real_aperio_slide_with_both_readers(real_slide, tmp_path):
    results = {}
    for reader in ("tiffslide", "openslide"):
        report = tile_cohort(real_slide, tmp_path / f"{reader}.zarr", TilingParams(reader=reader))
        assert report.exit_code == 0, report.table()
        store = SlideStore(tmp_path / f"{reader}.zarr")
        attrs = store.slide_attrs("cmu_small_region", "cmu_small_region")
        assert attrs["reader"] == reader and attrs["vendor"] == "aperio"
        assert attrs["mpp0"][0] == pytest.approx(0.499) and attrs["resampled"]
        results[reader] = (store.coords("cmu_small_region", "cmu_small_region"),
                           store.tiles("cmu_small_region", "cmu_small_region")[:])
    (c1, t1), (c2, t2) = results.values()
    np.testing.assert_array_equal(c1, c2)
    assert 20 < len(c1) < 88  # tissue tiles of an 8 x 11 grid
    assert np.abs(t1.astype(float) - t2.astype(float)).mean() < 3  # same pixels up to JPEG
    # kept tiles hold stained tissue, not glass
    assert (t1.astype(float).mean(axis=(1, 2, 3)) < 215).all()


def test_openslide_fixture_files(openslide_fixtures, tmp_path):
    folder = tmp_path / "fx"
    folder.mkdir()
    for name in ("small.svs", "unopenable.tiff", "boxes.tiff"):
        shutil.copy(openslide_fixtures / name, folder / name)
    report = tile_cohort(folder, tmp_path / "s.zarr", LOSSLESS)
    errors = {r.slide_id: r.error for r in report.results}
    assert all(r.status == "failed" for r in report.results)
    assert "not a readable slide" in errors["unopenable"]
    assert "smaller than one tile" in errors["small"] or "no resolution" in errors["small"]
    assert "no resolution" in errors["boxes"] or "smaller than one tile" in errors["boxes"]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _hlss(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hlss", *args], start_new_session=True, **kw)


def test_kill_9_mid_slide_leaves_nothing_that_looks_complete(make_slide, tmp_path):
    slide = make_slide("big.svs", width=9000, height=9000)
    store = tmp_path / "s.zarr"
    proc = _hlss("tile", str(slide), "--store", str(store), "--no-progress",
                 "--compression", "lossless", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until shards are being written
        if list((store / "_staging").glob("*/tiles/c/*")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("tiling never started writing tiles")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the worker is a grandchild: wait until the kernel has really ended it too
    workers = [json.loads(p.read_text())["attributes"]["owner"]["pid"] for p in (store / "_staging").glob("*/zarr.json")]
    deadline = time.time() + 30
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    # the store opens, and the slide is not there (neither complete nor half-written in place)
    store_obj = SlideStore(store)
    assert store_obj.patients() == [] or store_obj.slides("big", status=None) == []
    zarr.open_group(store, mode="r")
    report = tile_cohort(slide, store, LOSSLESS)
    assert report.exit_code == 0 and report.by_status("complete")
    assert [p.name for p in (store / "_staging").iterdir()] == ["zarr.json"]
    n = SlideStore(store).slide_attrs("big", "big")["n_tiles"]
    assert SlideStore(store).tiles("big", "big")[n - 1].mean() > 0


def test_two_processes_tiling_into_one_store_lose_nothing(make_slide, tmp_path):
    lists = []
    for k in range(2):
        rows = ["slide_path,patient_id,slide_id"]
        for j in range(2):
            path = make_slide(f"s{k}{j}.svs", width=2560, height=2048, seed=10 * k + j)
            rows.append(f"{path},P{j},S{k}{j}")  # the same patients in both lists
        (tmp_path / f"m{k}.csv").write_text("\n".join(rows) + "\n")
        lists.append(tmp_path / f"m{k}.csv")
    store = tmp_path / "s.zarr"
    procs = [_hlss("tile", str(m), "--store", str(store), "--no-progress", stdout=subprocess.PIPE, text=True)
             for m in lists]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s = SlideStore(store)
    assert s.patients() == ["P0", "P1"]
    assert s.slides("P0") == ["S00", "S10"] and s.slides("P1") == ["S01", "S11"]
    for p, sl in [("P0", "S00"), ("P0", "S10"), ("P1", "S01"), ("P1", "S11")]:
        n = s.slide_attrs(p, sl)["n_tiles"]
        assert s.tiles(p, sl).shape[0] == n > 0
        assert s.tiles(p, sl)[n - 1].mean() > 0

"""Units of the hot path (block planning and reading), change detection, parameters, and the
runner's crash isolation."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from PIL import Image

from pipeline.config import TilingParams
from pipeline.grid import tile_grid
from pipeline.reader import open_slide
from pipeline.runner import tile_cohort
from pipeline.source import same_source, source_info
from pipeline.store import SlideStore
from pipeline.tiles import iter_tile_blocks, plan_reads


def test_blocks_cover_every_tile_once_and_stay_small():
    g = tile_grid((20_000, 15_000), (0.5, 0.5), 0.5, 256)
    rng = np.random.default_rng(0)
    coords = g.coords[rng.random(len(g.coords)) < 0.4]
    plan = plan_reads(coords, g.footprint, 0, (1.0, 1.0), 256, block_px=2048)
    assert sorted(plan.order.tolist()) == list(range(len(coords)))
    for start, stop in plan.blocks:
        c = coords[plan.order[start:stop]]
        assert (c.max(axis=0) - c.min(axis=0) + 256 <= 2048).all()
    assert not plan.resample


def test_block_reads_equal_per_tile_reads(make_slide):
    path = make_slide("s.svs", width=3000, height=2500)
    with open_slide(path) as slide:
        g = tile_grid(slide.dimensions, (0.5, 0.5), 0.5, 256)
        coords = g.coords[::3]
        plan = plan_reads(coords, g.footprint, 0, (1.0, 1.0), 256, block_px=1024)
        seen = 0
        for idx, tiles in iter_tile_blocks(slide, coords, plan):
            for i, tile in zip(idx, tiles, strict=True):
                x, y = coords[i]
                np.testing.assert_array_equal(tile, slide.read_region((int(x), int(y)), 0, (256, 256)))
            seen += len(idx)
        assert seen == len(coords)


@pytest.mark.parametrize("mpp, max_diff, mean_diff", [(0.3, 2, 0.5), (0.2465, 40, 3.0)])
def test_resampled_block_reads_equal_per_tile_resampling(make_slide, mpp, max_diff, mean_diff):
    # 0.3 µm/px: a plain Lanczos; 0.2465: 2x block averaging first, then Lanczos: another antialiasing
    # filter than a full Lanczos, so close to it (about 0.5 grey levels on real H&E, 2 on the sharper synthetic)
    path = make_slide("s.svs", width=3000, height=2500, mpp=mpp)
    with open_slide(path) as slide:
        g = tile_grid(slide.dimensions, (mpp, mpp), 0.5, 128)
        fx = g.footprint[0]
        coords = g.coords[1::4]
        plan = plan_reads(coords, g.footprint, 0, (1.0, 1.0), 128)
        assert plan.resample
        for idx, tiles in iter_tile_blocks(slide, coords, plan):
            i = idx[len(idx) // 2]
            x, y = (int(v) for v in coords[i])
            m = 3  # the same margin the block reader keeps for the filter's support
            region = Image.fromarray(slide.read_region((x - m, y - m), 0, (int(fx) + 2 * m + 1,) * 2))
            ref = np.asarray(region.resize((128, 128), Image.Resampling.LANCZOS, box=(m, m, m + fx, m + fx)))
            got = tiles[list(idx).index(i)]
            diff = np.abs(ref.astype(int) - got.astype(int))
            assert diff.max() <= max_diff and diff.mean() < mean_diff  # PIL's fixed-point weights shift with the box offset


def test_fingerprint_follows_content_not_mtime(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(os.urandom(5 << 20))
    a = source_info(f)
    os.utime(f, (1, 1))
    assert same_source(a, source_info(f))
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # the tail is always sampled
    f.write_bytes(bytes(data))
    assert not same_source(a, source_info(f))
    f.write_bytes(bytes(data) + b"x")
    assert not same_source(a, source_info(f))
    assert not same_source(None, source_info(f))


def test_params_hash_tracks_what_changes_the_output():
    base = TilingParams()
    assert base.params_hash() == TilingParams().params_hash()
    assert base.params_hash() != TilingParams(target_mpp=0.25).params_hash()
    assert base.params_hash() != TilingParams(min_tissue=0.3).params_hash()
    assert base.params_hash() != base.params_hash(mpp_override=0.26)
    assert base.params_hash() == TilingParams(reader="openslide", shard_tiles=64).params_hash()


@pytest.mark.parametrize("kwargs", [{"target_mpp": 0}, {"tile_size": 8}, {"min_tissue": 1.5}, {"reader": "x"}])
def test_params_are_validated(kwargs):
    with pytest.raises(ValueError):
        TilingParams(**kwargs)


def test_a_worker_that_crashes_costs_only_its_slide(make_slide, tmp_path, monkeypatch):
    folder = tmp_path / "slides"
    for name in ("a", "b", "crash", "d"):
        make_slide(f"{name}.svs", folder=folder, width=1536, height=1024, seed=ord(name[0]))  # distinct files
    # workers are spawned: a sitecustomize on their path makes the 'crash' slide kill its process,
    # as a segfault in a C decoder would
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        import pipeline.tiler as tiler
        _real = tiler.tile_slide
        def tile_slide(spec, *a, **k):
            if spec.slide_id == "crash":
                os._exit(139)
            return _real(spec, *a, **k)
        tiler.tile_slide = tile_slide
        import pipeline.runner as runner
        runner.tile_slide = tile_slide
    """))
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    report = tile_cohort(folder, tmp_path / "s.zarr", workers=2)
    status = {r.slide_id: r.status for r in report.results}
    assert status == {"a": "complete", "b": "complete", "crash": "failed", "d": "complete"}
    crash = next(r for r in report.results if r.slide_id == "crash")
    assert "worker process crashed" in crash.error and "crash.svs" in crash.error
    attrs = SlideStore(tmp_path / "s.zarr").slide_attrs("crash", "crash")
    assert attrs["status"] == "failed" and "worker process crashed" in attrs["error"]


def test_exact_2x_downsampling_is_an_area_average(make_slide):
    path = make_slide("s.svs", width=3000, height=2500, mpp=0.25)
    with open_slide(path) as slide:
        g = tile_grid(slide.dimensions, (0.25, 0.25), 0.5, 128)
        coords = g.coords[::5]
        plan = plan_reads(coords, g.footprint, 0, (1.0, 1.0), 128)
        assert plan.resample and plan.footprint == (256.0, 256.0)
        for idx, tiles in iter_tile_blocks(slide, coords, plan):
            for i, tile in zip(idx[:3], tiles[:3], strict=True):
                x, y = (int(v) for v in coords[i])
                region = slide.read_region((x, y), 0, (256, 256)).astype(np.float64)
                ref = region.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
                assert np.abs(ref - tile).max() <= 1.0  # PIL rounds the mean

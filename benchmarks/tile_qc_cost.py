"""Cost of the per-tile QC measures (``pipeline.qc.tile_measures``) at tiling time, one thread.

    python benchmarks/tile_qc_cost.py                     # 8192 x 8192 px synthetic slide, 7 repeats
    python benchmarks/tile_qc_cost.py --repeats 9 --size 12000x12000

Tiles one synthetic slide in this process with one thread (``tile_slide`` as a worker with
``--threads 1`` runs it: zarr with one codec thread, one chunk at a time, no read-ahead), alternately
with the QC measures on and with ``tile_measures`` replaced by a no-op that returns zeros, and prints
the median tiles/s of each (the tile phase alone, reads + measures + encoding + writes; the
whole slide, open to commit; and tiles per CPU second of the whole slide, which a busy neighbour
on the machine disturbs less than wall time) and their ratio. Then times ``tile_measures`` alone on batches of
real tiles read from the slide at 224, 256 and 512 px, in ms per tile.

The machine is shared and noisy: rates move by 10-25 % between runs; the ratios, measured within
one run with the two variants alternating, are the figures to read.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline.tiler as tiler  # noqa: E402
from pipeline.codecs import TileCompression  # noqa: E402
from pipeline.cohort import discover_cohort  # noqa: E402
from pipeline.config import TilingParams  # noqa: E402
from pipeline.qc import QC_FIELDS, tile_measures  # noqa: E402
from pipeline.reader import open_slide  # noqa: E402
from pipeline.runner import limit_worker_threads  # noqa: E402
from pipeline.store import SlideStore, StoreWriter  # noqa: E402
from tiling import OUT, make_slide  # noqa: E402


def no_measures(batch: np.ndarray, *args, **kwargs) -> dict[str, np.ndarray]:
    """The baseline: zeros of the right shape, no work."""
    return {k: np.zeros(len(batch), np.float32) for k in QC_FIELDS}


class TimedMeasures:
    """``tile_measures`` that adds up the thread CPU seconds spent in it (the work of the measures
    in place, with the caches as tiling leaves them; not their effect on the rest of the work)."""

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def __call__(self, batch: np.ndarray, *args, **kwargs) -> dict[str, np.ndarray]:
        t = time.thread_time()
        try:
            return tile_measures(batch, *args, **kwargs)
        finally:
            self.cpu_s += time.thread_time() - t


def tile_once(slide: Path, store: Path, params: TilingParams, measures: bool,
              timed: TimedMeasures | None = None) -> tuple[float, float, float, int]:
    """Tile ``slide`` into a fresh ``store``; returns (tile-phase s, whole-slide s, whole-slide CPU s, tiles)."""
    shutil.rmtree(store, ignore_errors=True)
    spec = discover_cohort(slide).slides[0]
    tiler.tile_measures = (timed or tile_measures) if measures else no_measures
    try:
        t, cpu = time.perf_counter(), time.process_time()
        result = tiler.tile_slide(spec, StoreWriter(store), params, overlap=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        tiler.tile_measures = tile_measures
    if result.status != "complete":
        sys.exit(f"tiling failed: {result.error}")
    attrs = SlideStore(store).slide_attrs(spec.patient_id, spec.slide_id)
    return attrs["timings"]["tiles_s"], wall, cpu, result.n_tiles


def tissue_tiles(slide: Path, params: TilingParams, size: int, n: int) -> np.ndarray:
    """``(n, size, size, 3) uint8``: level-0 regions at the first ``n`` tissue tiles of the slide."""
    with open_slide(slide, params.reader) as s:
        plan = tiler.plan_slide(s, params)
        coords = plan.grid.coords[plan.tissue_idx][:n]
        return np.stack([np.asarray(s.read_region((int(x), int(y)), 0, (size, size)))[..., :3] for x, y in coords])


def time_measures(batch: np.ndarray, repeats: int) -> float:
    """Median ms per tile of ``tile_measures`` on ``batch``."""
    tile_measures(batch)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        tile_measures(batch)
        runs.append((time.perf_counter() - t) / len(batch))
    return 1000 * statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, help="a slide to use instead of a synthetic one")
    ap.add_argument("--size", default="8192x8192", help="synthetic slide size WxH in level-0 px")
    ap.add_argument("--mpp", type=float, default=0.5, help="synthetic slide µm/px (0.5: tiles read at level 0)")
    ap.add_argument("--compression", default="jpeg:90")
    ap.add_argument("--repeats", type=int, default=7, help="tiling runs per variant (alternating)")
    ap.add_argument("--micro-tiles", type=int, default=64, help="tiles per batch in the tile_measures timing")
    ap.add_argument("--micro-repeats", type=int, default=15)
    ap.add_argument("--no-tiling", action="store_true", help="only time tile_measures")
    args = ap.parse_args()

    limit_worker_threads(1)
    w, h = (int(v) for v in args.size.lower().split("x"))
    slide = args.slide or make_slide(OUT / f"synthetic_{w}x{h}_{args.mpp}.svs", w, h, args.mpp, False)
    params = TilingParams(compression=TileCompression.from_name(args.compression))
    print(f"slide {slide.name}; tile {params.tile_size} px at {params.target_mpp} µm/px; one thread; "
          f"figures are noisy (shared VM): read the ratios")

    if not args.no_tiling:
        store = OUT / "tile_qc_cost.zarr"
        runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        timed = TimedMeasures()
        n = 0
        tile_once(slide, store, params, True)  # warm page cache and imports
        for r in range(args.repeats):
            for measures in ((True, False) if r % 2 == 0 else (False, True)):
                tiles_s, wall, cpu, n = tile_once(slide, store, params, measures, timed)
                runs[measures].append((tiles_s, wall, cpu))
        shutil.rmtree(store, ignore_errors=True)
        med = {m: [statistics.median(n / run[i] for run in v) for i in range(3)] for m, v in runs.items()}
        print(f"\n{n} tiles, median of {args.repeats} alternating runs per variant")
        print(f"{'':<28}{'tile phase':>12}{'whole slide':>13}{'per CPU-s':>11}")
        for label, m in (("no-op measures (tiles/s)", False), ("QC measures on (tiles/s)", True)):
            print(f"{label:<28}" + "".join(f"{v:>{w}.0f}" for v, w in zip(med[m], (12, 13, 11))))
        print(f"{'ratio on / no-op':<28}"
              + "".join(f"{a / b:>{w}.3f}" for a, b, w in zip(med[True], med[False], (12, 13, 11))))
        in_place = 1000 * timed.cpu_s / (n * args.repeats)
        no_op_cpu = 1000 / med[False][2]
        print(f"CPU in tile_measures while tiling: {in_place:.3f} ms/tile = {100 * in_place / no_op_cpu:.1f} % "
              f"of the no-op run's {no_op_cpu:.2f} CPU ms/tile")
        for m in (False, True):
            rates = ", ".join(f"{n / t:.0f}" for t, _, _ in runs[m])
            print(f"  tile-phase runs, {'on' if m else 'no-op'}: {rates}")

    print(f"\ntile_measures alone, batches of {args.micro_tiles} tissue tiles, median of {args.micro_repeats}:")
    for size in (224, 256, 512):
        batch = tissue_tiles(slide, params, size, args.micro_tiles)
        print(f"  {size} px: {time_measures(batch, args.micro_repeats):.3f} ms/tile")


if __name__ == "__main__":
    main()

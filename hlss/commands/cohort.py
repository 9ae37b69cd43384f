"""``hlss demo-cohort``, ``tile``, ``info`` and ``verify``: making and checking a cohort store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import TilingParams
from pipeline.escape import terminal
from pipeline.reader import READERS

from .. import argtypes as at
from ..exit import OK, UsageError, damaged_exit
from ..options import add_store, open_store

__all__ = ["add_parsers", "demo_cohort", "tile", "info", "verify"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the commands of this group to ``hlss``'s subparsers."""
    d = sub.add_parser("demo-cohort", help="write a small synthetic cohort of pyramidal SVS slides and manifest.csv")
    d.add_argument("dir", type=Path)
    d.add_argument("--patients", type=at.positive_int, default=6)
    d.add_argument("--slides-per-patient", type=at.count_range, default="1-2",
                   help="a count or an inclusive range MIN-MAX (default 1-2)")
    d.add_argument("--classes", type=at.int_in(1, 4), default=2, help="number of classes (1-4), one per patient")
    d.add_argument("--width", type=at.positive_int, default=4096, help="level-0 width in px")
    d.add_argument("--height", type=at.positive_int, default=3072, help="level-0 height in px")
    d.add_argument("--mpp", type=at.positive_float, default=0.5, help="µm per level-0 px")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo_cohort)

    t = sub.add_parser("tile", help="tile a folder of slides or a manifest CSV into a store")
    t.add_argument("source", type=Path, help="folder of slides (searched recursively) or manifest .csv")
    add_store(t, "hlss tile SOURCE STORE",
              help="store folder (created if missing) or URL (s3://bucket/path)")
    t.add_argument("--target-mpp", type=at.float_in(0.01, 100, " µm/px"), default=TilingParams.target_mpp,
                   help="µm per px of the tiles, 0.01-100 (default %(default)s)")
    t.add_argument("--tile-size", type=at.int_in(16, 4096, " px"), default=TilingParams.tile_size,
                   help="tile side in px, 16-4096 (default %(default)s)")
    t.add_argument("--min-tissue", type=at.float_in(0, 1), default=TilingParams.min_tissue,
                   help="minimum tissue fraction of a kept tile, 0-1 (default %(default)s)")
    t.add_argument("--mask-mpp", type=at.float_in(0.5, 64, " µm/px"), default=TilingParams.mask_mpp,
                   help="µm per px of the tissue mask, 0.5-64 (default %(default)s)")
    t.add_argument("--reader", choices=READERS, default=TilingParams.reader)
    t.add_argument("--compression", type=at.compression, default=None,
                   help="jpeg[:QUALITY[:auto|444|422|420]] | lossless[:CODEC LEVEL] | none (default jpeg:90:auto: the "
                        "source's chroma subsampling where tiles are crops on its JPEG grid, else 4:4:4)")
    t.add_argument("--slide-timeout", type=at.float_in(0, 7 * 24 * 3600, " s"), metavar="SECONDS",
                   help="a slide still tiling after this many seconds fails alone and its worker is stopped "
                        "(default 1800; 0: no limit)")
    t.add_argument("--workers", type=at.positive_int, default=1,
                   help="slides tiled in parallel (processes, one core each)")
    t.add_argument("--threads", type=at.positive_int, default=1,
                   help="cores per worker (default 1); 2 tiles a single slide about 1.2x faster")
    t.add_argument("--force", action="store_true", help="retile slides even when unchanged")
    t.add_argument("--drop-derived", action="store_true",
                   help="retile slides that have features or attribute scores, dropping them (they would no "
                        "longer match the tiles); without it such slides are not retiled and are reported")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=tile)

    i = sub.add_parser("info", help="patients, slides, tiles, failures and parameters of a store")
    add_store(i, "hlss info STORE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=info)

    v = sub.add_parser("verify", help="read every chunk of every slide; report damage; --repair retiles damaged slides")
    add_store(v, "hlss verify STORE")
    v.add_argument("--repair", action="store_true",
                   help="retile damaged slides from their source files (when there and unchanged) and name the "
                        "feature sets to re-extract; nothing else is removed")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=verify)


def demo_cohort(args: argparse.Namespace) -> int:
    from pipeline.synthetic import make_demo_cohort

    try:
        manifest = make_demo_cohort(
            args.dir, n_patients=args.patients, slides_per_patient=args.slides_per_patient, n_classes=args.classes,
            width=args.width, height=args.height, mpp=args.mpp, seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"wrote a synthetic cohort to {args.dir} (manifest: {manifest})")
    return OK


def tile(args: argparse.Namespace) -> int:
    from pipeline.codecs import TileCompression
    from pipeline.cohort import ManifestError
    from pipeline.config import TilingParams
    from pipeline.runner import tile_cohort
    from pipeline.store import StoreError

    try:
        params = TilingParams(
            target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue,
            mask_mpp=args.mask_mpp, reader=args.reader,
            slide_timeout_s=TilingParams.slide_timeout_s if args.slide_timeout is None else args.slide_timeout,
            compression=args.compression or TileCompression(),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    bars = Bars(enabled=not args.no_progress)
    try:
        report = tile_cohort(
            args.source, args.store, params, workers=args.workers, threads=args.threads, force=args.force,
            drop_derived=args.drop_derived, on_plan=bars.start, on_slide=bars.slide, on_tiles=bars.tiles,
        )
    except (ManifestError, StoreError, ValueError) as e:
        bars.close()
        raise UsageError(str(e)) from e
    bars.close()
    print(report.table())
    return report.exit_code


class Bars:
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


def info(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    summary = store.summary()
    if args.json:  # json.dumps escapes control characters itself
        print(json.dumps(summary, indent=2, default=str))
        return damaged_exit(summary["n_damaged"], store.path)
    summary["store"] = _printable(summary["store"])
    summary["slides"] = [_printable(row) for row in summary["slides"]]
    print(f"store {terminal(store.path)}  (schema {summary['store']['schema_version']}, "
          f"hlss-pipeline {summary['store']['package_version']}, created {summary['store']['created']})")
    damaged = f", {summary['n_damaged']} damaged" if summary["n_damaged"] else ""
    print(f"{summary['n_patients']} patients, {summary['n_slides']} slides "
          f"({summary['n_complete']} complete, {summary['n_failed']} failed{damaged}), {summary['n_tiles']} tiles")
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
            print(f"  {'DAMAGED' if row['status'] == 'damaged' else 'FAILED'} {row['slide']}: {row['error']}")
    for params in summary["parameters"]:
        print("parameters: " + json.dumps(params, sort_keys=True))
    _print_derived(summary)
    return damaged_exit(summary["n_damaged"], store.path)


def _print_derived(summary: dict) -> None:
    """Feature sets, attribute runs and evaluations, one line each (names are free text: escaped)."""
    for name, f in sorted(summary["features"].items()):
        print(f"features {terminal(name)}: {f['slides']} slides, {f['dim'] or '?'}-d, {terminal(f['model'] or '?')}")
    for name, n in sorted(summary["attribute_runs"].items()):
        print(f"attribute run {terminal(name)}: {n} slides")
    for name, e in sorted(summary["evaluations"].items()):
        levels = ", ".join(f"{level} {e[level]['accuracy']:.1%} (MCA {e[level]['mean_class_accuracy']:.1%}, "
                           f"n={e[level]['n']})" for level in ("tile", "slide", "patient")
                           if isinstance(e.get(level), dict) and e[level].get("accuracy") is not None)
        print(f"evaluation {terminal(name)}: features {terminal(e['feature'] or '?')}, {terminal(e['evaluated'] or '?')}"
              + (f"; {levels}" if levels else ""))
    if not (summary["features"] or summary["attribute_runs"] or summary["evaluations"]):
        print("no features, attribute runs or evaluations yet")


def _printable(row: dict) -> dict:
    """``row`` with its strings escaped for the terminal (ids, labels, errors are free text)."""
    return {k: terminal(v) if isinstance(v, str) else v for k, v in row.items()}


def verify(args: argparse.Namespace) -> int:
    """0 intact (or every damaged slide repaired), 1 damage left, 2 unusable store."""
    from pipeline.store import StoreError
    from pipeline.verify import verify_store

    try:
        report = verify_store(args.store, repair=args.repair)
    except StoreError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return report.exit_code

"""``hlss qc``, ``report``, ``export-mil`` and ``export-geojson``: what a store gives out (pictures, an HTML
report, MIL bags, QuPath objects)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import argtypes as at
from ..exit import OK, SOME_FAILED, UsageError, status_of
from ..options import add_store, open_store

__all__ = ["add_parsers", "qc", "report", "export_mil", "export_geojson"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the commands of this group to ``hlss``'s subparsers."""
    from pipeline.export import FORMATS, LAYOUTS
    from pipeline.report import MAX_PX

    q = sub.add_parser("qc", help="write each slide's QC picture (thumbnail, tissue outline, kept tiles) as PNG")
    add_store(q, "hlss qc STORE --out DIR")
    q.add_argument("--out", type=Path, required=True, help="folder for <patient>/<slide>.png")
    q.add_argument("--status", choices=("complete", "failed"), default=None, help="only slides with this status")
    q.set_defaults(func=qc)

    r = sub.add_parser("report", help="a static HTML cohort report: slides table, QC pictures, training curves, kNN")
    add_store(r, "hlss report STORE --out report.html")
    r.add_argument("--out", type=Path, required=True, help="HTML file to write (e.g. report.html)")
    r.add_argument("--run", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="a training run folder: its loss curve and knn-*.json (repeatable; default: the runs "
                        "the store's kNN evaluations name, when they exist here)")
    r.add_argument("--title", help="report title (default: the store path)")
    r.add_argument("--max-px", type=at.int_in(16, 8192, " px"), default=MAX_PX,
                   help=f"longest side of the pictures, 16-8192 (default {MAX_PX})")
    r.add_argument("--pictures", choices=("embed", "files"), default="embed",
                   help="embed the pictures in the HTML file (default), or write them as PNG files next to it, "
                        "redrawn only when their slide changed (big cohorts, nightly reports)")
    r.set_defaults(func=report)

    x = sub.add_parser("export-mil", help="write stored features as CLAM/TRIDENT MIL bags named by slide file "
                                          "stem, dataset.csv, splits_0.csv and slide/patient embeddings")
    add_store(x, "hlss export-mil STORE --features NAME --out DIR")
    x.add_argument("--features", required=True, metavar="NAME", help="a stored feature name (see `hlss extract`)")
    x.add_argument("--format", choices=FORMATS, default="clam-h5",
                   help="clam layout: clam-h5: h5_files/<stem>.h5 with features and coords; pt: pt_files/<stem>.pt; "
                        "both (default clam-h5)")
    x.add_argument("--layout", choices=LAYOUTS, default="clam",
                   help="clam: h5_files/, pt_files/ (default); trident: TRIDENT's job_dir "
                        "(<mag>x_<T>px_0px_overlap/{patches,features_<encoder>,slide_features_mean-<encoder>}); both")
    x.add_argument("--trident-encoder", metavar="NAME",
                   help="encoder name in TRIDENT's folder names, e.g. uni_v1 (default: TRIDENT's name of a "
                        "registered encoder, else the feature name)")
    x.add_argument("--out", type=Path, required=True, help="output folder (TRIDENT's job_dir with --layout trident)")
    x.set_defaults(func=export_mil)

    g = sub.add_parser("export-geojson", help="write each slide's tissue outlines and kept tiles as GeoJSON in "
                                              "level-0 px (QuPath: File > Import objects)")
    add_store(g, "hlss export-geojson STORE --out DIR")
    g.add_argument("--out", type=Path, required=True, help="folder for <patient>/<slide>.geojson")
    g.add_argument("--no-tiles", action="store_true", help="tissue outlines only")
    g.set_defaults(func=export_geojson)


def qc(args: argparse.Namespace) -> int:
    """0 when every slide had a picture, 1 when some had none, 2 for an unusable store."""
    from pipeline.qc import export_qc

    store = open_store(args.store)
    written = export_qc(store, args.out, status=args.status)
    total = sum(1 for _ in store.records(status=args.status))
    print(f"wrote {len(written)} QC pictures of {total} slides to {args.out}")
    return status_of(len(written) != total)


def report(args: argparse.Namespace) -> int:
    """0 written, 1 written with damaged slides (listed), 2 unusable store, run folder or output file."""
    from pipeline.report import report_cohort

    store = open_store(args.store)
    try:
        out, damaged = report_cohort(store, args.out, args.run, title=args.title, max_px=args.max_px,
                                     pictures=args.pictures)
    except ValueError as e:
        raise UsageError(str(e)) from e
    except OSError as e:
        raise UsageError(f"{args.out}: {e}") from e
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    for error in damaged:
        print(f"  DAMAGED {error}", file=sys.stderr)
    return SOME_FAILED if damaged else OK


def export_mil(args: argparse.Namespace) -> int:
    """0 all exported, 1 some slides skipped, 2 unusable arguments or store."""
    from pipeline.export import ExportError, export_mil as export
    from pipeline.store import StoreError

    try:
        result = export(args.store, args.features, args.format, args.out, layout=args.layout,
                        encoder=args.trident_encoder)
    except (StoreError, ExportError) as e:
        raise UsageError(str(e)) from e
    print(result.table())
    return result.exit_code


def export_geojson(args: argparse.Namespace) -> int:
    """0 every complete slide written, 1 some damaged (listed), 2 unusable store."""
    from pipeline.escape import terminal
    from pipeline.geojson import export_geojson as export
    from pipeline.location import StoreError

    try:
        written, problems = export(args.store, args.out, tiles=not args.no_tiles)
    except StoreError as e:
        raise UsageError(str(e)) from e
    print(f"wrote {len(written)} GeoJSON files to {terminal(str(args.out))}")
    for problem in problems:
        print(f"  DAMAGED {terminal(problem)}", file=sys.stderr)
    return status_of(bool(problems))

"""The ``hlss`` command.

Exit status: 0 success, 1 some slides failed (the rest are written), 2 unusable arguments,
source or store (bad option values are refused before any work), 141 output closed early (e.g. piped
into ``head``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import argtypes as at
from pipeline.escape import terminal

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command whose reader went away (SIGPIPE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlss", description="Whole-slide images to a Zarr cohort store, and HLSS on it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    t = sub.add_parser("tile", help="tile a folder of slides or a manifest CSV into a store")
    t.add_argument("source", type=Path, help="folder of slides (searched recursively) or manifest .csv")
    t.add_argument("--store", required=True, help="store folder (created if missing) or URL (s3://bucket/path)")
    t.add_argument("--target-mpp", type=at.float_in(0.01, 100, " µm/px"), default=0.5,
                   help="µm per px of the tiles, 0.01-100 (default 0.5)")
    t.add_argument("--tile-size", type=at.int_in(16, 4096, " px"), default=256,
                   help="tile side in px, 16-4096 (default 256)")
    t.add_argument("--min-tissue", type=at.float_in(0, 1), default=0.5,
                   help="minimum tissue fraction of a kept tile, 0-1 (default 0.5)")
    t.add_argument("--mask-mpp", type=at.float_in(0.5, 64, " µm/px"), default=8.0,
                   help="µm per px of the tissue mask, 0.5-64 (default 8)")
    t.add_argument("--reader", choices=("auto", "tiffslide", "openslide"), default="auto")
    t.add_argument("--compression", type=at.compression, default=None,
                   help="jpeg[:QUALITY] | lossless[:CODEC LEVEL] | none")
    t.add_argument("--slide-timeout", type=at.float_in(0, 1e9, " s"), metavar="SECONDS",
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

    i = sub.add_parser("info", help="patients, slides, tiles, failures and parameters of a store")
    i.add_argument("store", help="store folder or URL")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    r = sub.add_parser("train", help="HLSS (or HiDisc) pretraining on the store's training patients")
    r.add_argument("--store", required=True, help="store folder or URL")
    r.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, final weights)")
    r.add_argument("--config", type=at.readable_file, help="YAML training config (see hlss_model/config.py)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    r.add_argument("--steps", type=at.positive_int, help="override the config's steps")
    r.add_argument("--method", choices=("hlss", "hidisc"), help="override the config's method")
    r.add_argument("--device", type=at.device, help="override the config's device (auto, cpu, cuda, cuda:N, mps)")
    r.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("extract", help="write per-tile features features/<NAME> (N, D) for every slide")
    e.add_argument("--store", required=True, help="store folder or URL")
    e.add_argument("--checkpoint", type=Path, action="append", default=[], metavar="RUN",
                   help="a training run folder (repeatable)")
    e.add_argument("--encoder", type=at.encoder_spec, action="append", default=[], metavar="timm:NAME[:WEIGHTS]",
                   help="a timm model, optionally with a local weights file (repeatable)")
    e.add_argument("--name", action="append", default=[],
                   help="feature name per encoder, in order (--checkpoint ones first); default from the model")
    e.add_argument("--batch-size", type=at.positive_int, default=128)
    e.add_argument("--device", type=at.device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    e.add_argument("--force", action="store_true", help="recompute finished features")
    e.add_argument("--tile-filter", type=at.tile_filter, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="extract only tiles within these QC limits (min_focus, max_pen, min_brightness, "
                        "max_brightness, min_saturation, max_saturation, min_tissue); other rows are NaN")
    e.add_argument("--no-progress", action="store_true")

    k = sub.add_parser("knn", help="kNN accuracy and MCA at tile, slide and patient level")
    k.add_argument("--store", required=True, help="store folder or URL")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="a stored feature name")
    src.add_argument("--checkpoint", type=Path, metavar="RUN", help="a training run (uses the run's split)")
    src.add_argument("--encoder", type=at.encoder_spec, metavar="timm:NAME[:WEIGHTS]",
                     help="a timm model (e.g. a baseline)")
    k.add_argument("--initial", action="store_true",
                   help="with --checkpoint: the run's encoder before training (its baseline)")
    k.add_argument("--k", type=at.positive_int, default=200)
    k.add_argument("--temperature", type=at.positive_float, default=0.07)
    k.add_argument("--max-tiles-per-slide", type=at.positive_int, help="seeded subsample of larger slides")
    k.add_argument("--device", type=at.device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    k.add_argument("--seed", type=int, default=0, help="seed of the patient split when the manifest has none")
    k.add_argument("--json", type=Path, help="also write the report as JSON here")
    v = sub.add_parser("serve", help="serve the Prefect deployments (tile-and-train/default, extract-features/default, "
                                     "reprocess/nightly) against a Prefect server")
    from flows.serve import add_arguments

    add_arguments(v)
    dp = sub.add_parser("deploy", help="register the same deployments with a Prefect work pool (its workers run them)")
    add_arguments(dp, pool=True)

    w = sub.add_parser("run", help="run the tile-and-train flow here, with Prefect's temporary local server "
                                   "(or PREFECT_API_URL's)")
    w.add_argument("--config", help="YAML flow settings (default $HLSS_FLOW_CONFIG); flags override it")
    w.add_argument("--source", help="folder of slides or manifest .csv")
    w.add_argument("--store", help="store folder or URL (s3://bucket/path)")
    w.add_argument("--run-dir", help="training run folder")
    w.add_argument("--train-config", type=at.as_text(at.readable_file),
                   help="YAML training config (see hlss_model/config.py)")
    w.add_argument("--steps", type=at.positive_int)
    w.add_argument("--method", choices=("hlss", "hidisc"))
    w.add_argument("--device", type=at.device, help="training and extraction device (auto, cpu, cuda, cuda:N, mps)")
    w.add_argument("--resume", action="store_true", help="continue an unfinished run in --run-dir")
    w.add_argument("--encoder", type=at.flow_encoder_spec, action="append", default=[],
                   metavar="timm:NAME[:WEIGHTS]|run:FOLDER",
                   help="also extract features with this encoder (repeatable)")
    w.add_argument("--workers", type=at.positive_int, help="slides tiled at once")
    w.add_argument("--threads", type=at.positive_int, help="cores per tiling worker")
    w.add_argument("--scheduler-address", help="run slides on this Dask cluster (tcp://host:8786)")
    w.add_argument("--force-tiling", action="store_true", help="retile slides even when unchanged")

    from .export import add_parser as add_export_parser
    from .qc import add_parser as add_qc_parser

    from hlss_model.explain import add_parser as add_explain_parser

    from .report import add_parser as add_report_parser
    from .verify import add_parser as add_verify_parser

    add_export_parser(sub)
    add_qc_parser(sub)
    add_explain_parser(sub)
    add_report_parser(sub)
    add_verify_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:  # bad values are refused here, before any work (pipeline/argtypes.py)
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error (or the --help)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not in the interpreter's exit
        return code
    except _UsageError as e:
        print(f"hlss {args.command}: error: {terminal(e, newlines=True)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """The reader of stdout went away (``hlss info S | head -1``): stop quietly. Python's recipe:
    point stdout at devnull so the flush at exit does not raise a second time."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


class _UsageError(Exception):
    pass


def _demo_cohort(args) -> int:
    from .synthetic import make_demo_cohort

    try:
        manifest = make_demo_cohort(
            args.dir, n_patients=args.patients, slides_per_patient=args.slides_per_patient, n_classes=args.classes,
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
            slide_timeout_s=TilingParams.slide_timeout_s if args.slide_timeout is None else args.slide_timeout,
            compression=args.compression or TileCompression(),
        )
    except ValueError as e:
        raise _UsageError(str(e)) from e
    bars = _Bars(enabled=not args.no_progress)
    try:
        report = tile_cohort(
            args.source, args.store, params, workers=args.workers, threads=args.threads, force=args.force,
            drop_derived=args.drop_derived, on_plan=bars.start, on_slide=bars.slide, on_tiles=bars.tiles,
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
    if args.json:  # json.dumps escapes control characters itself
        print(json.dumps(summary, indent=2, default=str))
        return _damaged_exit(summary["n_damaged"], store.path)
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
    return _damaged_exit(summary["n_damaged"], store.path)


def _damaged_exit(n_damaged: int, store) -> int:
    """Exit 1 (with the hint to verify) when ``n_damaged`` slides were listed as damaged, else 0."""
    if not n_damaged:
        return EXIT_OK
    print(f"hlss: {n_damaged} damaged slides (listed above); `hlss verify {store}` checks every chunk, "
          "--repair retiles them", file=sys.stderr)
    return 1


def _printable(row: dict) -> dict:
    """``row`` with its strings escaped for the terminal (ids, labels, errors are free text)."""
    return {k: terminal(v) if isinstance(v, str) else v for k, v in row.items()}


def _train(args) -> int:
    from hlss_model.config import ConfigError, TrainConfig
    from hlss_model.train import train

    from .store import StoreError

    try:
        cfg = TrainConfig.from_yaml(args.config) if args.config else (None if args.resume else TrainConfig())
        overrides = {k: v for k, v in (("steps", args.steps), ("method", args.method), ("device", args.device))
                     if v is not None}
        if overrides:
            saved = args.out / "config.yaml"
            if cfg is None and not saved.is_file():
                raise FileNotFoundError(f"{args.out}: nothing to resume (no config.yaml)")
            # a run with checkpoints refuses a changed config; one without is restarted with it
            cfg = (cfg or TrainConfig.from_yaml(saved)).replace(**overrides)
        result = train(args.store, args.out, cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        raise _UsageError(str(e)) from e
    except StoreError as e:  # e.g. a damaged tile chunk (hlss_model.data.TrainingDataError)
        print(f"hlss train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        if result.restarted:
            print(terminal(result.restarted))
        print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.images_per_s:.1f} images/s; run: {result.out}")
    return EXIT_OK


def _timm_encoder(spec: tuple[str, Path | None], name: str | None = None):
    """An encoder from a parsed ``--encoder`` (:func:`pipeline.argtypes.encoder_spec`)."""
    from .encoders import timm_encoder

    model, weights = spec
    try:
        return timm_encoder(model, weights, name)
    except ValueError as e:
        raise _UsageError(str(e)) from e


def _encoders(args) -> list:
    from hlss_model.runs import run_encoder

    n = len(args.checkpoint) + len(args.encoder)
    if not n:
        raise _UsageError("give --checkpoint RUN or --encoder timm:NAME (each may repeat)")
    if len(args.name) > n:
        raise _UsageError(f"{len(args.name)} --name for {n} encoders")
    names = args.name + [None] * (n - len(args.name))
    out = []
    for run, name in zip(args.checkpoint, names):
        try:
            out.append(run_encoder(run, name))
        except (FileNotFoundError, ValueError) as e:
            raise _UsageError(str(e)) from e
    return out + [_timm_encoder(spec, name) for spec, name in zip(args.encoder, names[len(args.checkpoint):])]


def _extract(args) -> int:
    from .features import extract_features
    from .store import StoreError

    encoders = _encoders(args)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="tiles", unit="tile", file=sys.stderr)
    try:
        report = extract_features(args.store, encoders, batch_size=args.batch_size, device=args.device,
                                  dtype=args.dtype, force=args.force, tile_filter=args.tile_filter,
                                  on_tiles=bar.update if bar is not None else None)
    except (StoreError, ValueError) as e:
        raise _UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.close()
    names = ", ".join(f"{terminal(e.name)} ({e.dim}-d)" for e in encoders)
    print(f"features {names}: {len(report.extracted)} slides extracted, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed; {report.tiles} tiles in {report.seconds:.1f} s "
          f"({report.tiles_per_s:.1f} tiles/s)")
    for p, s, err in report.failed:
        print(f"  FAILED {terminal(p)}/{terminal(s)}: {terminal(err)}")
    return report.exit_code


def _knn(args) -> int:
    from hlss_model.evaluate import knn_from_store

    from .store import StoreError

    encoder, split = None, None
    if args.checkpoint is not None:
        from hlss_model.runs import read_run, run_encoder

        try:
            encoder = run_encoder(args.checkpoint, initial=args.initial)
            split = read_run(args.checkpoint)["split"]
        except (FileNotFoundError, KeyError) as e:
            raise _UsageError(str(e)) from e
    elif args.initial:
        raise _UsageError("--initial needs --checkpoint")
    elif args.encoder is not None:
        encoder = _timm_encoder(args.encoder)
    try:
        report = knn_from_store(args.store, features=args.features, encoder=encoder, split=split, k=args.k,
                                temperature=args.temperature, max_tiles_per_slide=args.max_tiles_per_slide,
                                device=args.device, seed=args.seed)
    except (StoreError, KeyError, ValueError) as e:
        raise _UsageError(str(e)) from e
    print(report.table())
    if args.json is not None:
        args.json.write_text(report.to_json(indent=2))
    return _damaged_exit(len(report.damaged), args.store)


def _qc(args) -> int:
    from .qc import run

    return run(args)


def _explain(args) -> int:
    from hlss_model.explain import run

    return run(args)


def _serve(args) -> int:
    from flows.serve import run_from_args

    return run_from_args(args)


def _run(args) -> int:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.run import run_tile_and_train

    return run_tile_and_train(args)


_COMMANDS = {"demo-cohort": _demo_cohort, "tile": _tile, "info": _info, "train": _train, "extract": _extract,
             "knn": _knn, "serve": _serve, "deploy": _serve, "run": _run,
             "export-mil": lambda args: args.func(args), "qc": lambda args: _qc(args),
             "explain": lambda args: _explain(args), "report": lambda args: args.func(args)}

_COMMANDS["verify"] = lambda args: args.func(args)

if __name__ == "__main__":
    sys.exit(main())

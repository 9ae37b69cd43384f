"""``hlss train``, ``extract``, ``knn`` and ``explain``: the model side (torch is imported only when they run)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from hlss_model.settings import EVALUATION, EXTRACTION
from pipeline.escape import terminal

from .. import argtypes as at
from ..exit import OK, SOME_FAILED, UsageError, damaged_exit, status_of
from ..options import add_store

if TYPE_CHECKING:
    from hlss_model.settings import EncoderSpec

__all__ = ["add_parsers", "train", "extract", "knn", "explain"]

_ENCODER = "NAME[:WEIGHTS]|timm:NAME[?OPTS][:WEIGHTS]|hf-hub:ORG/NAME|FILE.yaml"


def _add_weights_options(p: argparse.ArgumentParser) -> None:
    """Where ``--encoder``'s weights come from: a file, a checkpoints map, or random on purpose."""
    p.add_argument("--weights", type=at.weights_file, metavar="FILE",
                   help="weights file of the --encoder (one encoder; else NAME:FILE each)")
    p.add_argument("--checkpoints", type=at.checkpoints_file, metavar="YAML",
                   help="YAML map of registered encoder names to local weights files (like TRIDENT's "
                        "local_ckpts.json); before the hub")
    p.add_argument("--random-init", action="store_true",
                   help="encoders given no weights start from random weights (a baseline); without it, "
                        "an encoder with no weights is an error")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the commands of this group to ``hlss``'s subparsers."""
    r = sub.add_parser("train", help="HLSS (or HiDisc) pretraining on the store's training patients")
    add_store(r, "hlss train STORE --out RUN")
    r.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, final weights)")
    r.add_argument("--config", type=at.readable_file, help="YAML training config (see hlss_model/config.py)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    r.add_argument("--steps", type=at.positive_int, help="override the config's steps")
    r.add_argument("--method", choices=("hlss", "hidisc"), help="override the config's method")
    r.add_argument("--device", type=at.device, help="override the config's device (auto, cpu, cuda, cuda:N, mps)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=train)

    e = sub.add_parser("extract", help="write per-tile features features/<NAME> (N, D) for every slide")
    add_store(e, "hlss extract STORE --checkpoint RUN | --encoder timm:NAME")
    e.add_argument("--checkpoint", type=Path, action="append", default=[], metavar="RUN",
                   help="a training run folder (repeatable)")
    e.add_argument("--encoder", type=at.encoder_spec, action="append", default=[], metavar=_ENCODER,
                   help="a registered encoder (`hlss encoders`), a timm model, a timm model on the hub or an "
                        "encoder YAML file, optionally with a local weights file (repeatable)")
    _add_weights_options(e)
    e.add_argument("--name", action="append", default=[],
                   help="feature name per encoder, in order (--checkpoint ones first); default from the model")
    e.add_argument("--batch-size", type=at.positive_int, default=EXTRACTION.batch_size)
    e.add_argument("--device", type=at.device, default=EXTRACTION.device, help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--devices", type=at.devices, metavar="DEVICE,DEVICE...|all",
                   help="one worker process per device (e.g. cuda:0,cuda:1; all: every CUDA device), "
                        "slides split between them by tile count; instead of --device")
    e.add_argument("--dtype", choices=("float32", "float16"), default=EXTRACTION.dtype)
    e.add_argument("--force", action="store_true", help="recompute finished features")
    e.add_argument("--tile-filter", type=at.tile_filter, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="extract only tiles within these QC limits (min_focus, max_pen, min_brightness, "
                        "max_brightness, min_saturation, max_saturation, min_tissue); other rows are NaN")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=extract)

    k = sub.add_parser("knn", help="kNN accuracy and MCA at tile, slide and patient level")
    add_store(k, "hlss knn STORE --features NAME | --checkpoint RUN | --encoder timm:NAME")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="a stored feature name")
    src.add_argument("--checkpoint", type=Path, metavar="RUN", help="a training run (uses the run's split)")
    src.add_argument("--encoder", type=at.encoder_spec, metavar=_ENCODER,
                     help="a registered encoder (`hlss encoders`), a timm model (e.g. a baseline), a timm model "
                          "on the hub or an encoder YAML file")
    _add_weights_options(k)
    k.add_argument("--initial", action="store_true",
                   help="with --checkpoint: the run's encoder before training (its baseline)")
    k.add_argument("--k", type=at.positive_int, default=EVALUATION.k)
    k.add_argument("--temperature", type=at.positive_float, default=EVALUATION.temperature)
    k.add_argument("--max-tiles-per-slide", type=at.positive_int, help="seeded subsample of larger slides")
    k.add_argument("--device", type=at.device, default=EXTRACTION.device, help="auto, cpu, cuda, cuda:N or mps")
    k.add_argument("--seed", type=int, default=EVALUATION.seed, help="seed of the patient split when the manifest has none")
    k.add_argument("--json", type=Path, help="also write the report as JSON here")
    k.set_defaults(func=knn)

    x = sub.add_parser("explain", help="per-tile similarity to the language attributes of an HLSS run: "
                                       "heatmaps and top attributes per slide and patient")
    add_store(x, "hlss explain STORE --checkpoint RUN --slide SLIDE")
    x.add_argument("--checkpoint", required=True, type=Path, help="HLSS training run folder")
    x.add_argument("--slide", required=True, help="slide id")
    x.add_argument("--attribute", action="append", default=[], metavar="[LEVEL:]NAME",
                   help="draw a heatmap of this attribute (repeatable; default: the top one of each level)")
    x.add_argument("--out", type=Path, default=Path("explain"), help="folder for <slide>_<level>_<attribute>.png")
    x.add_argument("--top", type=at.positive_int, default=3, help="attributes listed per level (default 3)")
    x.add_argument("--device", type=at.device, default=EXTRACTION.device, help="auto, cpu, cuda, cuda:N or mps")
    x.add_argument("--batch-size", type=at.positive_int, default=EXTRACTION.batch_size)
    x.add_argument("--force", action="store_true", help="recompute stored scores (replacing another run's "
                                                        "scores stored under the same name)")
    x.add_argument("--name", help="store the scores as attributes/NAME (default: the run folder's name)")
    x.set_defaults(func=explain)


def train(args: argparse.Namespace) -> int:
    from hlss_model.config import ConfigError, TrainConfig
    from hlss_model.train import train as run_training
    from pipeline.store import StoreError
    from pipeline.run_folder import RunFolder

    try:
        cfg = TrainConfig.from_yaml(args.config) if args.config else (None if args.resume else TrainConfig())
        if any(v is not None for v in (args.steps, args.method, args.device)):
            saved = RunFolder(args.out).config
            if cfg is None and not saved.is_file():
                raise FileNotFoundError(f"{args.out}: nothing to resume (no config.yaml)")
            # a run with checkpoints refuses a changed config; one without is restarted with it
            cfg = (cfg or TrainConfig.from_yaml(saved)).with_overrides(steps=args.steps, method=args.method,
                                                                       device=args.device)
        result = run_training(args.store, args.out, cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    except StoreError as e:  # e.g. a damaged tile chunk (hlss_model.data.TrainingDataError)
        print(f"hlss train: error: {e}", file=sys.stderr)
        return SOME_FAILED
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        if result.restarted:
            print(terminal(result.restarted))
        print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.images_per_s:.1f} images/s; run: {result.out}")
    return OK


def _with_weights(spec: "EncoderSpec", args: argparse.Namespace, name: str | None = None) -> "EncoderSpec":
    """A parsed ``--encoder`` (:func:`hlss.argtypes.encoder_spec`) with ``--weights``, ``--checkpoints`` and
    ``--random-init``, checked; no weights and no ``--random-init`` is a usage error."""
    weights = spec.weights or (str(args.weights) if args.weights else None)
    try:
        return dataclasses.replace(spec, name=name, weights=weights, random_init=args.random_init,
                                   checkpoints=str(args.checkpoints) if args.checkpoints else None).checked()
    except ValueError as e:
        raise UsageError(str(e)) from e


def _encoder_specs(args: argparse.Namespace) -> list["EncoderSpec"]:
    """The ``--checkpoint`` then ``--encoder`` encoders, named by ``--name`` in order, as checked specs:
    ``--encoder`` ones with ``--weights``, ``--checkpoints`` and ``--random-init`` (no weights and no
    ``--random-init`` is a usage error)."""
    from hlss_model.settings import EncoderSpec

    n = len(args.checkpoint) + len(args.encoder)
    if not n:
        raise UsageError("give --checkpoint RUN or --encoder timm:NAME (each may repeat)")
    if len(args.name) > n:
        raise UsageError(f"{len(args.name)} --name for {n} encoders")
    if args.weights and len(args.encoder) != 1:
        raise UsageError(f"--weights is for one --encoder ({len(args.encoder)} given); give NAME:FILE for each")
    names = args.name + [None] * (n - len(args.name))
    return ([EncoderSpec("run", str(run), name=name) for run, name in zip(args.checkpoint, names)]
            + [_with_weights(spec, args, name) for spec, name in zip(args.encoder, names[len(args.checkpoint):])])


def _encoders(args: argparse.Namespace) -> list:
    out = []
    for spec in _encoder_specs(args):
        try:
            out.append(spec.build())
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
    return out


def _spec_resolutions(args: argparse.Namespace) -> list[SimpleNamespace]:
    """``name`` and training ``mpp`` of the registered encoders asked for, without building them (with
    ``--devices`` each worker builds its own)."""
    from hlss_model.encoder_zoo import zoo_entry

    return [SimpleNamespace(name=spec.name or spec.ref, mpp=zoo_entry(spec.ref).mpp)
            for spec in _encoder_specs(args) if spec.kind == "zoo"]


def extract(args: argparse.Namespace) -> int:
    from hlss_model.encoder_zoo import resolution_warnings
    from hlss_model.extract import extract_features
    from pipeline.store import StoreError

    if args.devices and args.device != EXTRACTION.device:
        raise UsageError("give --device or --devices, not both")
    encoders = None if args.devices else _encoders(args)
    try:  # the resolution each encoder was trained at, against the store's
        for line in resolution_warnings(args.store, encoders if encoders is not None else _spec_resolutions(args)):
            print(terminal(line))
    except StoreError as e:
        raise UsageError(str(e)) from e
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="tiles", unit="tile", file=sys.stderr)
    options = dict(batch_size=args.batch_size, dtype=args.dtype, force=args.force, tile_filter=args.tile_filter,
                   on_tiles=bar.update if bar is not None else None)
    try:
        if encoders is None:
            from hlss_model.multi_device import extract_on_devices

            report = extract_on_devices(args.store, _encoder_specs(args), args.devices, **options)
        else:
            report = extract_features(args.store, encoders, device=args.device, **options)
    except (StoreError, ValueError) as e:
        raise UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.close()
    built = [(e.name, e.dim) for e in encoders] if encoders is not None else report.encoders
    names = ", ".join(f"{terminal(name)} ({dim}-d)" for name, dim in built)
    print(f"features {names}: {len(report.extracted)} slides extracted, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed; {report.tiles} tiles in {report.seconds:.1f} s "
          f"({report.tiles_per_s:.1f} tiles/s)")
    for run in getattr(report, "devices", []):
        print(f"  {run.device}: {len(run.share)} slides ({run.planned_tiles} tiles), {run.report.tiles} tiles "
              f"extracted in {run.report.seconds:.1f} s ({run.tiles_per_s:.1f} tiles/s)"
              + (f"; STOPPED: {terminal(run.error)}" if run.error else ""))
    for p, s, err in report.failed:
        print(f"  FAILED {terminal(p)}/{terminal(s)}: {terminal(err)}")
    return report.exit_code


def knn(args: argparse.Namespace) -> int:
    from hlss_model.evaluate import knn_from_store
    from pipeline.store import StoreError

    encoder, split = None, None
    if args.checkpoint is not None:
        from hlss_model.runs import read_run, run_encoder

        try:
            encoder = run_encoder(args.checkpoint, initial=args.initial)
            split = read_run(args.checkpoint)["split"]
        except (FileNotFoundError, KeyError) as e:
            raise UsageError(str(e)) from e
    elif args.initial:
        raise UsageError("--initial needs --checkpoint")
    elif args.encoder is not None:
        try:
            encoder = _with_weights(args.encoder, args).build()
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
    try:
        report = knn_from_store(args.store, features=args.features, encoder=encoder, split=split, k=args.k,
                                temperature=args.temperature, max_tiles_per_slide=args.max_tiles_per_slide,
                                device=args.device, seed=args.seed)
    except (StoreError, KeyError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(report.table())
    if args.json is not None:
        args.json.write_text(report.to_json(indent=2))
    return damaged_exit(len(report.damaged), args.store)


def explain(args: argparse.Namespace) -> int:
    """0 on success, 1 when a slide is damaged, 2 for a bad request (unknown slide, non-HLSS run, unusable store)."""
    from hlss_model.explain import ExplainError, explain_and_draw
    from pipeline.ids import InvalidIdError
    from pipeline.location import StoreError
    from pipeline.store import StoreDamageError

    try:
        done = explain_and_draw(args.store, args.checkpoint, args.slide, args.out, attributes=args.attribute,
                                top=args.top, name=args.name, batch_size=args.batch_size, device=args.device,
                                force=args.force)
    except StoreDamageError as e:
        print(f"hlss explain: error: {e}; `hlss verify --repair` retiles the slide", file=sys.stderr)
        return SOME_FAILED
    except (ExplainError, StoreError, InvalidIdError, FileNotFoundError, KeyError) as e:
        raise UsageError(str(e).strip("'\"")) from e
    except ValueError as e:  # e.g. CUDA asked for but absent
        raise UsageError(str(e)) from e
    state = "reused stored scores" if done.slide.reused else "computed"
    _print_top(done.run, f"slide {args.slide} (patient {done.patient}, {len(done.slide.scores)} tiles, {state}):",
               done.top)
    _print_top(done.run, f"patient {done.patient} ({len(done.maps)} slide(s), "
                         f"{sum(len(m.scores) for m in done.maps)} tiles):", done.patient_top)
    for path in done.written:
        print(f"wrote {path}")
    for e in done.damaged:
        print(f"  DAMAGED (left out of the patient's attributes) {e}", file=sys.stderr)
    return status_of(bool(done.damaged))


def _print_top(run, header: str, top: dict[str, list[tuple[str, float]]]) -> None:
    """``header``, then one line per listed attribute: level, rank, name, mean score, its first sentence."""
    print(terminal(header))
    for level, items in top.items():
        for rank, (name, score) in enumerate(items, 1):
            sentence = (run.sentences.get((level, name)) or ("",))[0]
            print(terminal(f"  {level:<8} {rank}. {name:<28} {score:+.4f}" + (f"  {sentence}" if sentence else "")))

"""``hlss run``: the ``tile-and-train`` flow in this process, with defaults from the flow settings."""

from __future__ import annotations

import argparse
import sys

from pipeline.escape import terminal

from .settings import FlowConfigError, load_defaults
from .summary import summary_markdown

__all__ = ["run_tile_and_train"]


def _parameters(args: argparse.Namespace) -> dict:
    d = load_defaults(args.config)
    flat = {"source": args.source, "store": args.store, "run_dir": args.run_dir, "workers": args.workers,
            "threads": args.threads, "scheduler_address": args.scheduler_address}
    d = d.model_copy(update={k: v for k, v in flat.items() if v is not None})
    training = {"config": args.train_config, "steps": args.steps, "method": args.method, "device": args.device,
                "resume": args.resume or None}
    d.training = d.training.model_copy(update={k: v for k, v in training.items() if v is not None})
    if args.device:
        d.extraction = d.extraction.model_copy(update={"device": args.device})
    if args.encoder:
        d.extraction = d.extraction.model_copy(update={"encoders": d.extraction.encoders + args.encoder})
    params = d.flow_parameters("tile-and-train")
    missing = [k for k in ("source", "store", "run_dir") if not params.get(k)]
    if missing:
        raise FlowConfigError(f"set {', '.join('--' + k.replace('_', '-') for k in missing)} "
                              "(or in the flow config / HLSS_* variables)")
    return {**params, "force_tiling": args.force_tiling}


def run_tile_and_train(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 done but some slides or features failed, 2 unusable settings or flow failure."""
    from .serve import PrefectAPIError, check_api

    try:
        params = _parameters(args)
        check_api(require_server=False)
    except (FlowConfigError, PrefectAPIError) as e:
        print(f"hlss run: error: {terminal(e, newlines=True)}", file=sys.stderr)
        return 2
    from prefect.exceptions import ParameterTypeError

    from .tile_and_train import tile_and_train

    try:
        state = tile_and_train(**params, return_state=True)
    except ParameterTypeError as e:
        print(f"hlss run: error: {terminal(e, newlines=True)}", file=sys.stderr)
        return 2
    outcome = state.result(raise_on_failure=False)
    if not state.is_completed():
        print(f"hlss run: error: tile-and-train {state.name.lower()}: {terminal(outcome, newlines=True)}",
              file=sys.stderr)
        return 2
    print(summary_markdown(outcome))
    failed = outcome["slides"]["failed"] or outcome.get("extraction", {}).get("failed")
    return 1 if failed else 0

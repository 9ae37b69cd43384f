"""``hlss serve``, ``deploy`` and ``run``: the Prefect flows (:mod:`flows`)."""

from __future__ import annotations

import argparse
import os

from .. import argtypes as at
from ..exit import OK, UsageError, status_of
from ..options import add_store

__all__ = ["add_parsers", "serve", "run"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the commands of this group to ``hlss``'s subparsers."""
    v = sub.add_parser("serve", help="serve the Prefect deployments (tile-and-train/default, extract-features/default, "
                                     "reprocess/nightly) against a Prefect server")
    _add_deployment_arguments(v)
    v.set_defaults(func=serve)
    dp = sub.add_parser("deploy", help="register the same deployments with a Prefect work pool (its workers run them)")
    _add_deployment_arguments(dp, pool=True)
    dp.set_defaults(func=serve)

    w = sub.add_parser("run", help="run the tile-and-train flow here, with Prefect's temporary local server "
                                   "(or PREFECT_API_URL's)")
    w.add_argument("--config", help="YAML flow settings (default $HLSS_FLOW_CONFIG); flags override it")
    w.add_argument("--source", help="folder of slides or manifest .csv")
    add_store(w, None, help="store folder or URL (s3://bucket/path); default from the flow settings")
    w.add_argument("--run-dir", help="training run folder (default: beside the store, /data/cohort.zarr -> /data/cohort-run)")
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
    w.set_defaults(func=run)


def _add_deployment_arguments(p: argparse.ArgumentParser, pool: bool = False) -> None:
    if pool:
        p.add_argument("--pool", required=True, help="the Prefect work pool whose workers run the flows")
    p.add_argument("--config", type=at.as_text(at.readable_file),
                   help="YAML flow settings (default $HLSS_FLOW_CONFIG); see flows/settings.py")
    p.add_argument("--cron", type=at.cron,
                   help="cron schedule of reprocess/nightly (default from the config, else 0 2 * * *)")
    p.add_argument("--no-schedule", action="store_true", help="serve reprocess/nightly without its schedule")
    if not pool:
        p.add_argument("--limit", type=at.positive_int,
                       help="flow runs executed at once by this process (default: no limit)")
        p.add_argument("--report-host", help="address the report server binds to (default from the config, "
                                             "else 127.0.0.1: this machine only)")
        p.add_argument("--report-port", type=at.int_in(0, 65535), help="report server port (default from the config, else "
                                                           "4280; 0: any free port)")
        p.add_argument("--no-report-server", action="store_true",
                       help="do not serve the cohort reports (the UI's report links are then file:// URIs)")


def _quiet_telemetry() -> None:
    """No usage reports from Prefect (its temporary server's attempt to send them prints an error
    offline); a user's own setting wins."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def serve(args: argparse.Namespace) -> int:
    """``hlss serve`` (or ``hlss deploy`` when ``args`` has a pool): 0 stopped cleanly or deployed, 2 unusable
    settings or no Prefect server."""
    from flows.serve import PrefectAPIError, deploy_to_pool, serve as serve_deployments
    from flows.settings import FlowConfigError, load_defaults

    _quiet_telemetry()
    pool = getattr(args, "pool", None)
    try:
        defaults = load_defaults(args.config)
        if args.cron:
            defaults = defaults.model_copy(update={"reprocess_cron": args.cron})
        if not pool:
            reports = {"report_host": args.report_host, "report_port": args.report_port}
            defaults = defaults.model_copy(update={k: v for k, v in reports.items() if v is not None})
            if args.no_report_server:
                defaults = defaults.model_copy(update={"report_port": None})
        if pool:
            deploy_to_pool(defaults, pool, schedule=not args.no_schedule)
            print(f"deployed tile-and-train/default, extract-features/default and reprocess/nightly to work pool "
                  f"{pool!r}; start a worker with `prefect worker start --pool {pool}`")
        else:
            serve_deployments(defaults, limit=args.limit, schedule=not args.no_schedule)
    except (FlowConfigError, PrefectAPIError) as e:
        raise UsageError(str(e)) from e
    return OK


def run(args: argparse.Namespace) -> int:
    """0 done, 1 done but some slides or features failed, 2 unusable settings or flow failure."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    _quiet_telemetry()
    from flows.executor import check_scheduler
    from flows.run import FlowRunError, run_tile_and_train, tile_and_train_parameters
    from flows.serve import PrefectAPIError
    from flows.settings import FlowConfigError
    from flows.summary import summary_markdown

    try:
        params = tile_and_train_parameters(
            args.config, source=args.source, store=args.store, run_dir=args.run_dir, workers=args.workers,
            threads=args.threads, scheduler_address=args.scheduler_address, train_config=args.train_config,
            steps=args.steps, method=args.method, device=args.device, resume=args.resume, encoders=args.encoder,
            force_tiling=args.force_tiling)
        if params.get("scheduler_address"):  # before Prefect starts: one line, not a failed flow run
            check_scheduler(params["scheduler_address"])
        outcome = run_tile_and_train(params)
    except (FlowConfigError, PrefectAPIError, FlowRunError, ConnectionError) as e:
        raise UsageError(str(e)) from e
    print(summary_markdown(outcome))
    return status_of(bool(outcome["slides"]["failed"] or outcome.get("extraction", {}).get("failed")))

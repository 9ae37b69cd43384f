"""Serve the deployments ``tile-and-train/default``, ``extract-features/default`` and ``reprocess/nightly``.

Run against a Prefect server (``prefect server start``; ``PREFECT_API_URL`` pointing at it)::

    hlss serve --config hlss-flows.yaml
    prefect deployment run tile-and-train/default --watch
    prefect deployment run tile-and-train/default --param workers=4 --params '{"training": {"resume": true}}'

Defaults come from the config file and ``HLSS_*`` variables (see :mod:`flows.settings`), so a
configured machine needs no parameters; ``--param``/``--params`` override them per run.
"""

from __future__ import annotations

from .settings import FlowConfigError, FlowDefaults

__all__ = ["PrefectAPIError", "build_deployments", "check_api", "serve", "deploy_to_pool"]


class PrefectAPIError(RuntimeError):
    """No usable Prefect API; the message says what to start or set."""


def check_api(require_server: bool) -> str | None:
    """The API URL in use, after checking it answers; None for Prefect's temporary local server.

    ``require_server``: fail when no ``PREFECT_API_URL`` is configured (serving needs a server that
    outlives this process, or nobody could trigger the deployments).
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        if require_server:
            raise PrefectAPIError("no Prefect server configured: start one with `prefect server start` and set "
                                  "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")
        return None
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise PrefectAPIError(f"Prefect API at {url} is unreachable ({type(problem).__name__}: {problem}); "
                              "start it with `prefect server start`, or fix PREFECT_API_URL")
    return url


def build_deployments(defaults: FlowDefaults, schedule: bool = True) -> list:
    """The three deployments with ``defaults`` as their parameters (``reprocess/nightly`` on its cron)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from .extract import extract_features_flow
    from .reprocess import reprocess
    from .tile_and_train import tile_and_train

    try:
        nightly = [Cron(defaults.reprocess_cron, timezone=defaults.timezone)] if schedule else []
    except ValueError as e:
        raise FlowConfigError(f"reprocess_cron {defaults.reprocess_cron!r}: {e}") from e
    # module entrypoints (flows.reprocess.reprocess): runs import the installed package, whatever the
    # working directory, and objects they send to worker processes unpickle there by the same names
    common = {"tags": ["hlss"], "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        tile_and_train.to_deployment(name="default", parameters=defaults.flow_parameters("tile-and-train"),
                                     description="Tile new or changed slides, train HLSS, extract, kNN.", **common),
        extract_features_flow.to_deployment(name="default", parameters=defaults.flow_parameters("extract-features"),
                                            description="Feature bags for MIL with a chosen encoder.", **common),
        reprocess.to_deployment(name="nightly", parameters=defaults.flow_parameters("reprocess"), schedules=nightly,
                                description="Tile and extract only new or changed slides.", **common),
    ]


def serve(defaults: FlowDefaults, limit: int | None = None, schedule: bool = True) -> None:
    """Register the deployments with the configured Prefect server and run their flow runs until stopped,
    with the report server (:mod:`flows.report_server`) beside them unless ``report_port`` is None."""
    import logging
    import os

    from prefect import serve as prefect_serve

    from .report_server import REPORT_URL_ENV, ReportServer

    check_api(require_server=True)
    deployments = build_deployments(defaults, schedule)
    if defaults.report_port is None:
        prefect_serve(*deployments, limit=limit)
        return
    try:
        server = ReportServer(defaults.report_host, defaults.report_port)
    except OSError as e:
        raise FlowConfigError(str(e)) from None
    with server:
        # the flow runs this process starts inherit it and link their reports there
        os.environ[REPORT_URL_ENV] = defaults.report_url or server.url
        logging.getLogger(__name__).warning("cohort reports served at %s/report/<run folder>/report.html",
                                            server.url)
        prefect_serve(*deployments, limit=limit)


def deploy_to_pool(defaults: FlowDefaults, pool: str, schedule: bool = True) -> None:
    """Register the deployments with work pool ``pool`` (its workers run them; no ``hlss serve`` needed).

    The entrypoints are module paths, so a ``process`` pool's workers need the package installed
    and nothing else: no image, no code storage.
    """
    from prefect import deploy

    check_api(require_server=True)
    try:
        deploy(*build_deployments(defaults, schedule), work_pool_name=pool, build=False, push=False,
               print_next_steps_message=False, ignore_warnings=True)
    except ValueError as e:  # e.g. no such work pool
        raise PrefectAPIError(f"{e} (`prefect work-pool create {pool} --type process`)") from e

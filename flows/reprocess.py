"""``reprocess``: the nightly pass. Tile and extract only slides that are new or changed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from .artifacts import publish
from .executor import SlideExecutor
from .settings import ExtractionSettings, Threads, TilingSettings, Workers, check_paths
from .steps import extract_step, rederived, register_executor, release_executor, run_state, tile_phase
from .summary import run_summary, slide_rows
from .work import EncoderSpec

__all__ = ["reprocess"]


@flow(name="reprocess", log_prints=False)
def reprocess(
    source: str,
    store: str,
    run_dir: str | None = None,
    tiling: TilingSettings = TilingSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    workers: Workers = 1,
    threads: Threads = 1,
    scheduler_address: str | None = None,
) -> dict[str, Any]:
    """Scan ``source``; tile slides that are new, whose file changed (size or content fingerprint;
    a new mtime makes the fingerprint decide) or whose tiling parameters changed, or that failed
    before; then extract features for slides that lack them with the finished run in ``run_dir``
    and ``extraction.encoders``. Idempotent: a second run with nothing changed does nothing.
    Attaches the slide table and this run's QC pictures, and with ``run_dir`` rewrites its report.html.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    check_paths(source, store)
    params = tiling.params()
    encoders = extraction.encoder_specs()
    if run_dir:
        if run_state(run_dir)["finished"]:
            encoders.insert(0, EncoderSpec("run", run_dir, name=extraction.name))
        else:
            logger.warning("run_dir %s has no finished training run; its features are not extracted",
                           Path(run_dir).expanduser())
    results, reasons, dropped, report = [], {}, {}, None
    step, failure = "tiling", None
    try:  # whatever fails, the slides tiled so far get their summary, table and QC pictures
        with SlideExecutor(workers, scheduler_address) as executor:
            key = register_executor(executor)
            try:
                results, reasons, dropped = tile_phase(source, store, params, threads, executor, key)
                step = "feature extraction"
                report = extract_step(store, encoders, extraction, executor, key) if encoders else None
            finally:
                release_executor(key)
    except Exception as e:
        failure = e
    summary = run_summary("reprocess", store, slide_rows(results, reasons), time.perf_counter() - t0,
                          extraction=report, dropped=rederived(store, dropped) if dropped else None,
                          failed=None if failure is None else (step, f"{type(failure).__name__}: {failure}"))
    publish("reprocess", source, store, summary, Path(run_dir).expanduser() / "report.html" if run_dir else None)
    if failure is not None:
        raise failure
    return summary

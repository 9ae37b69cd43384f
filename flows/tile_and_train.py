"""``tile-and-train``: cohort -> tiles -> HLSS training -> features -> kNN -> report and artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from .artifacts import publish
from .executor import SlideExecutor
from .preflight import check_before_work
from .settings import (EvaluationSettings, ExtractionSettings, Threads, TilingSettings, TrainingSettings, Workers,
                       check_paths, default_run_dir)
from .steps import (extract_step, knn_step, register_executor, release_executor, rederived, run_state, tile_phase,
                    train_step, training_curve)
from .summary import run_summary, slide_rows
from .work import EncoderSpec

__all__ = ["tile_and_train"]


@flow(name="tile-and-train", log_prints=False)
def tile_and_train(
    source: str,
    store: str,
    run_dir: str | None = None,
    tiling: TilingSettings = TilingSettings(),
    training: TrainingSettings = TrainingSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    evaluation: EvaluationSettings = EvaluationSettings(),
    workers: Workers = 1,
    threads: Threads = 1,
    scheduler_address: str | None = None,
    force_tiling: bool = False,
) -> dict[str, Any]:
    """Tile every new or changed slide of ``source`` into ``store``, train HLSS into ``run_dir``
    (a finished run is reused; ``training.resume`` continues one), extract features with the
    trained encoder, evaluate them by kNN, write the cohort report ``run_dir/report.html`` and attach
    the summary, the slide table, this run's QC pictures and a link to the report to the run.
    Without ``run_dir`` the run goes beside the store (:func:`flows.settings.default_run_dir`).
    Settings that cannot work (too few training patients for the batch, a missing device) fail
    before tiling (:func:`flows.preflight.check_before_work`).

    ``workers`` slides are tiled at once (processes of ``threads`` cores each), on the Dask cluster
    at ``scheduler_address`` when given. A failed slide is recorded and reported; the others go on.
    """
    t0 = time.perf_counter()
    if run_dir is None:
        run_dir = default_run_dir(store)
        get_run_logger().info("run_dir not set: training in %s, beside the store", run_dir)
    check_paths(source, store, run_dir)
    params = tiling.params()
    encoders = [EncoderSpec("run", run_dir, name=extraction.name)] + \
        extraction.encoder_specs()
    check_before_work(source, store, run_dir, training, extraction,
                      reused=run_state(run_dir)["finished"] and not training.resume)
    results, reasons, dropped = [], {}, {}
    trained = extracted = knn = None
    step, failure = "tiling", None
    try:  # whatever fails, the slides tiled so far get their summary, table and QC pictures
        with SlideExecutor(workers, scheduler_address) as executor:
            key = register_executor(executor)
            try:
                results, reasons, dropped = tile_phase(source, store, params, threads, executor, key, force_tiling)
                step = "training"
                trained = train_step(store, run_dir, training)
                step = "feature extraction"
                extracted = extract_step(store, encoders, extraction, executor, key)
            finally:
                release_executor(key)
        step = "kNN evaluation"
        knn = knn_step(store, extraction.name, run_dir, evaluation)
    except Exception as e:
        failure = e
    summary = run_summary("tile-and-train", store, slide_rows(results, reasons), time.perf_counter() - t0,
                          training=trained, extraction=extracted, knn=knn, curve=training_curve(run_dir),
                          dropped=rederived(store, dropped) if dropped else None,
                          failed=None if failure is None else (step, f"{type(failure).__name__}: {failure}"))
    publish("tile-and-train", source, store, summary, Path(run_dir).expanduser() / "report.html")
    if failure is not None:
        raise failure
    get_run_logger().info("done: %(complete)d slides tiled, %(skipped)d unchanged, %(failed)d failed",
                          summary["slides"])
    return summary

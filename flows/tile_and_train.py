"""``tile-and-train``: cohort -> tiles -> HLSS training -> features -> kNN -> report and artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.escape import markdown

from .artifacts import attach_cohort_artifacts
from .executor import SlideExecutor
from .settings import (EvaluationSettings, ExtractionSettings, Threads, TilingSettings, TrainingSettings, Workers,
                       check_paths)
from .steps import (extract_step, knn_step, register_executor, release_executor, rederived, tile_phase, train_step,
                    training_curve)
from .summary import run_summary, slide_rows, summary_markdown
from .work import EncoderSpec

__all__ = ["tile_and_train"]


@flow(name="tile-and-train", log_prints=False)
def tile_and_train(
    source: str,
    store: str,
    run_dir: str,
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

    ``workers`` slides are tiled at once (processes of ``threads`` cores each), on the Dask cluster
    at ``scheduler_address`` when given. A failed slide is recorded and reported; the others go on.
    """
    t0 = time.perf_counter()
    check_paths(source, store, run_dir)
    params = tiling.params()
    encoders = [EncoderSpec("run", run_dir, name=extraction.name)] + \
        extraction.encoder_specs()
    with SlideExecutor(workers, scheduler_address) as executor:
        key = register_executor(executor)
        try:
            results, reasons, dropped = tile_phase(source, store, params, threads, executor, key, force_tiling)
            trained = train_step(store, run_dir, training)
            extracted = extract_step(store, encoders, extraction, executor, key)
        finally:
            release_executor(key)
    knn = knn_step(store, extraction.name, run_dir, evaluation)
    summary = run_summary("tile-and-train", store, slide_rows(results, reasons), time.perf_counter() - t0,
                          training=trained, extraction=extracted, knn=knn, curve=training_curve(run_dir),
                          dropped=rederived(store, dropped))
    report = attach_cohort_artifacts("tile-and-train", store, summary, Path(run_dir).expanduser() / "report.html")
    summary["report"] = str(report) if report else None
    create_markdown_artifact(summary_markdown(summary), key="tile-and-train-summary",
                             description=f"tile-and-train of {markdown(source)} into {markdown(store)}")
    get_run_logger().info("done: %(complete)d slides tiled, %(skipped)d unchanged, %(failed)d failed",
                          summary["slides"])
    return summary

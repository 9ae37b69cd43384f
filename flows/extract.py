"""``extract-features``: per-slide feature bags for MIL, with a trained run or a timm model."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from pipeline.escape import markdown

from .executor import SlideExecutor
from .settings import ExtractionSettings, FlowConfigError, Workers, check_paths
from .steps import extract_step, register_executor, release_executor
from .summary import run_summary, summary_markdown
from .work import EncoderSpec

__all__ = ["extract_features_flow"]


@flow(name="extract-features", log_prints=False)
def extract_features_flow(
    store: str,
    run_dir: str | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    workers: Workers = 1,
    scheduler_address: str | None = None,
) -> dict[str, Any]:
    """Write ``features/<name>`` for every complete slide of ``store`` with the encoder of ``run_dir``
    (named ``extraction.name``) and each of ``extraction.encoders`` (timm models, named after the model).

    Slides already extracted with the same weights fingerprint are skipped. Locally the work runs
    as one task holding the device; on a Dask cluster it is split over up to ``workers`` workers.
    """
    t0 = time.perf_counter()
    check_paths(store=store)
    encoders = ([EncoderSpec("run", run_dir, name=extraction.name)] if run_dir else []) + \
        extraction.encoder_specs()
    if not encoders:
        raise FlowConfigError("extract-features: give run_dir (a training run) or extraction.encoders (timm:NAME)")
    with SlideExecutor(workers, scheduler_address) as executor:
        key = register_executor(executor)
        try:
            report = extract_step(store, encoders, extraction, executor, key)
        finally:
            release_executor(key)
    summary = run_summary("extract-features", store, [], time.perf_counter() - t0, extraction=report)
    create_markdown_artifact(summary_markdown(summary), key="extract-features-summary",
                             description=f"feature extraction in {markdown(store)}")
    return summary

"""A cohort, end to end: discover slides, skip the ones already done, tile the rest in parallel.

Each slide runs in a worker process (``workers`` of them, spawned), so a slide that crashes its
reader (a segfault in a C decoder on a corrupt file) costs that slide only: the pool is rebuilt and
the slides it was holding are retried once, then reported as failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cohort import Cohort, SlideSpec, discover_cohort
from .config import TilingParams
from .escape import terminal
from .location import scrub
from .store import StoreWriter
from .tiler import SlideResult, needs_tiling, record_failure, tile_slide

__all__ = ["TilingReport", "tile_cohort", "limit_worker_threads"]


@dataclass
class TilingReport:
    store: str
    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0

    def by_status(self, status: str) -> list[SlideResult]:
        return [r for r in self.results if r.status == status]

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.results if r.status == "complete")

    @property
    def exit_code(self) -> int:
        """0 when every slide is complete or skipped, 1 when some failed."""
        return 1 if self.by_status("failed") else 0

    def table(self) -> str:
        """A plain-text summary: counts, then one line per failed slide with its reason."""
        done, skipped, failed = (self.by_status(s) for s in ("complete", "skipped", "failed"))
        rate = self.n_tiles / self.seconds if self.seconds else 0.0
        lines = [
            f"{'status':<10}{'slides':>8}{'tiles':>10}",
            f"{'complete':<10}{len(done):>8}{self.n_tiles:>10}",
            f"{'skipped':<10}{len(skipped):>8}{'':>10}",
            f"{'failed':<10}{len(failed):>8}{'':>10}",
            f"{self.seconds:.1f} s, {rate:.0f} tiles/s; store: {terminal(self.store)}",
        ]
        for r in done:
            if r.warning:
                lines.append(f"  warning {terminal(r.slide_id)}: {terminal(r.warning)}")
        for r in failed:
            lines.append(f"  FAILED {terminal(r.slide_id or '?')} (patient {terminal(r.patient_id or '?')}): "
                         f"{terminal(r.error)}")
        return "\n".join(lines)


_progress_queue: "mp.Queue | None" = None
_threads = 1


def limit_worker_threads(threads: int) -> None:
    """Make this (worker) process use about ``threads`` cores for tiling."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import zarr

    # zarr runs codecs (JPEG/Blosc, and tiffslide's JPEG decoding) in a thread pool beside its
    # event-loop thread; with several chunks in flight the two overlap, so one "single-threaded"
    # worker kept 1.15-1.2 cores busy. One chunk at a time keeps it to one.
    zarr.config.set({"threading.max_workers": threads, "async.concurrency": 1 if threads == 1 else 10})


def _init_worker(q: "mp.Queue", threads: int) -> None:
    global _progress_queue, _threads
    _progress_queue, _threads = q, threads
    limit_worker_threads(threads)


def _run_one(spec: SlideSpec, store: str, params: TilingParams) -> SlideResult:
    writer = StoreWriter(store)
    q = _progress_queue
    return tile_slide(spec, writer, params, progress=(lambda n: q.put(n)) if q is not None else None,
                      overlap=_threads > 1)


def tile_cohort(
    source: str | Path,
    store: str | Path,
    params: TilingParams | None = None,
    *,
    workers: int = 1,
    threads: int | None = None,
    force: bool = False,
    on_slide: Callable[[SlideResult], None] | None = None,
    on_tiles: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> TilingReport:
    """Tile every new or changed slide of ``source`` (folder or manifest) into ``store``.

    Raises ManifestError / StoreError for an unusable source or store (nothing is tiled then);
    any problem with a single slide is in the report instead. Each worker uses ``threads`` cores
    (default 1), so ``workers * threads`` should not exceed the cores at hand. With more than one
    thread, zarr encodes several chunks at once and a thread reads the next tiles while the current
    shard is written: about 1.2x faster for a single slide on local disk (benchmarks/README.md). ``on_plan(n)`` is called once with
    the number of slides to tile, ``on_slide`` per tiled slide, ``on_tiles``
    per written batch.
    """
    t0 = time.perf_counter()
    params = params or TilingParams()
    if workers < 1:
        raise ValueError("workers must be at least 1")
    threads = threads or 1
    if threads < 1:
        raise ValueError("threads must be at least 1")
    cohort: Cohort = discover_cohort(source)
    writer = StoreWriter(store)
    writer.clean_staging()
    report = TilingReport(store=str(writer.path))
    for problem in cohort.problems:
        report.results.append(
            SlideResult(problem.patient_id, problem.slide_id, problem.source, "failed", error=f"{problem.source}: {problem.error}")
        )
    todo: list[SlideSpec] = []
    for spec, needed in zip(cohort.slides, _needs_tiling_all(writer, cohort.slides, params, force)):
        if needed:
            todo.append(spec)
        else:
            report.results.append(SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "skipped"))
    if on_plan:
        on_plan(len(todo))
    if todo:
        report.results.extend(_run_pool(todo, str(writer.path), params, workers, threads, on_slide, on_tiles))
    report.seconds = time.perf_counter() - t0
    return report


def _needs_tiling_all(writer: StoreWriter, specs: list[SlideSpec], params: TilingParams, force: bool) -> list[bool]:
    """:func:`needs_tiling` of every slide, in order; on an object store 16 at a time (one GET each)."""
    if force:
        return [True] * len(specs)
    if not writer.is_remote or len(specs) < 2:
        return [needs_tiling(writer, spec, params) for spec in specs]
    with ThreadPoolExecutor(16, thread_name_prefix="needs-tiling") as pool:
        return list(pool.map(lambda spec: needs_tiling(writer, spec, params), specs))


def _run_pool(todo, store, params, workers, threads, on_slide, on_tiles) -> list[SlideResult]:
    """Run slides in ``workers`` spawned processes; slides caught in a crashed pool are retried alone."""
    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    results: list[SlideResult] = []

    def finish(result: SlideResult) -> None:
        results.append(result)
        if on_slide:
            on_slide(result)

    def run(specs: list[SlideSpec], n_workers: int) -> list[SlideSpec]:
        """Run ``specs``; return those whose worker pool broke under them."""
        broken: list[SlideSpec] = []
        with ProcessPoolExecutor(
            max_workers=n_workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_q, threads)
        ) as pool:
            futures: dict[Future, SlideSpec] = {pool.submit(_run_one, s, store, params): s for s in specs}
            while futures:
                done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_q, on_tiles)
                for fut in done:
                    spec = futures.pop(fut)
                    try:
                        finish(fut.result())
                    except BrokenProcessPool:
                        broken.append(spec)
                    except Exception as e:  # pool-side errors (e.g. pickling): this slide only
                        finish(SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "failed",
                                           error=scrub(f"{spec.path}: {type(e).__name__}: {e}")))
        _drain(progress_q, on_tiles)
        return broken

    for spec in run(todo, min(workers, len(todo))):
        if run([spec], 1):
            error = f"{spec.path}: the worker process crashed while reading this slide; the file is probably corrupt"
            finish(record_failure(StoreWriter(store), spec, params, error))
    return results


def _drain(q, on_tiles) -> None:
    while True:
        try:
            n = q.get_nowait()
        except queue.Empty:
            return
        if on_tiles:
            on_tiles(n)

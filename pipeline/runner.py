"""A cohort, end to end: discover slides, skip the ones already done, tile the rest in parallel.

Each slide runs in a worker process (``workers`` of them, spawned), so a slide that crashes its
reader (a segfault in a C decoder on a corrupt file) costs that slide only: the pool is rebuilt and
the slides it was holding are retried once, then reported as failed. A slide past its time budget
(``TilingParams.slide_timeout_s``) stops itself between reads; one stuck inside a read has its worker
killed, and only that slide fails.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cohort import Cohort, SlideSpec, discover_cohort
from .config import TilingParams
from .location import scrub
from .reader import timeout_message
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
            f"{self.seconds:.1f} s, {rate:.0f} tiles/s; store: {self.store}",
        ]
        for r in done:
            if r.warning:
                lines.append(f"  warning {r.slide_id}: {r.warning}")
        for r in failed:
            lines.append(f"  FAILED {r.slide_id or '?'} (patient {r.patient_id or '?'}): {r.error}")
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


def _run_one(key: int, spec: SlideSpec, store: str, params: TilingParams) -> SlideResult:
    """Tile ``spec`` in a worker; the progress queue gets ``("start", key, pid)``, then ``("tiles", key, n)``."""
    writer = StoreWriter(store)
    q = _progress_queue
    if q is not None:
        q.put(("start", key, os.getpid()))
    return tile_slide(spec, writer, params, progress=(lambda n: q.put(("tiles", key, n))) if q is not None else None,
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
    """Run slides in ``workers`` spawned processes; slides caught in a crashed pool are retried alone.

    A slide still running :func:`kill_after` seconds after its worker started it has its worker killed
    (a read stuck in a decoder cannot be stopped from inside) and fails alone; the other slides of that
    pool were not at fault and run again, as many at once as before.
    """
    ctx = mp.get_context("spawn")
    results: list[SlideResult] = []
    keys = {id(spec): key for key, spec in enumerate(todo)}
    broke = False

    def finish(result: SlideResult) -> None:
        results.append(result)
        if on_slide:
            on_slide(result)

    def run(specs: list[SlideSpec], n_workers: int) -> tuple[list[SlideSpec], bool]:
        """Run ``specs``; return those whose worker pool broke under them, and whether a timeout broke it."""
        nonlocal broke
        broken: list[SlideSpec] = []
        watch = _Watch(params.slide_timeout_s)
        # a queue per pool: a worker killed while writing to it may leave its lock held
        progress_q = ctx.Queue()
        with ProcessPoolExecutor(
            max_workers=n_workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_q, threads)
        ) as pool:
            futures: dict[Future, SlideSpec] = {
                pool.submit(_run_one, keys[id(s)], s, store, params): s for s in specs}
            while futures:
                done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_q, on_tiles, watch)
                watch.kill_overdue()
                for fut in done:
                    spec = futures.pop(fut)
                    watch.finished(keys[id(spec)])
                    try:
                        finish(fut.result())
                    except BrokenProcessPool:
                        if keys[id(spec)] in watch.killed:
                            error = f"{spec.path}: {watch.killed[keys[id(spec)]]}"
                            finish(record_failure(StoreWriter(store), spec, params, error))
                        else:
                            broken.append(spec)
                    except Exception as e:  # pool-side errors (e.g. pickling): this slide only
                        finish(SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "failed",
                                           error=scrub(f"{spec.path}: {type(e).__name__}: {e}")))
        _drain(progress_q, on_tiles, watch)
        broke = broke or bool(broken or watch.killed)
        return broken, bool(watch.killed)

    pending, timed_out = run(todo, min(workers, len(todo)))
    while timed_out and pending:  # killed by us: the others did nothing wrong
        pending, timed_out = run(pending, min(workers, len(pending)))
    for spec in pending:
        again, _ = run([spec], 1)
        if again:
            error = f"{spec.path}: the worker process crashed while reading this slide; the file is probably corrupt"
            finish(record_failure(StoreWriter(store), spec, params, error))
    if broke:  # a killed or crashed worker leaves its staged slide behind
        StoreWriter(store).clean_staging()
    return results


def kill_after(budget_s: float) -> float:
    """Seconds after a slide's start at which its worker is killed: the budget plus a grace period
    (10 %, 2-60 s) for the worker to stop by itself between reads and record why; inf without a budget."""
    return budget_s + min(60.0, max(2.0, 0.1 * budget_s)) if budget_s else math.inf


class _Watch:
    """Which worker process runs which slide since when, from the workers' progress messages."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.limit_s = kill_after(budget_s)
        self.running: dict[int, tuple[int, float, int | None]] = {}  # key -> (pid, start, tiles written or None)
        self.killed: dict[int, str] = {}  # key -> why
        self._finished: set[int] = set()

    def finished(self, key: int) -> None:
        """The slide's result is in: its worker may go on to another slide."""
        self._finished.add(key)
        self.running.pop(key, None)

    def note(self, kind: str, key: int, value: int) -> None:
        if key in self._finished:
            return
        if kind == "start":
            self.running[key] = (value, time.monotonic(), None)
        elif key in self.running:
            pid, start, tiles = self.running[key]
            self.running[key] = (pid, start, (tiles or 0) + value)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for key, (pid, start, tiles) in list(self.running.items()):
            if key in self.killed or now - start <= self.limit_s:
                continue
            doing = "reading the slide before its tiles" if tiles is None else f"reading tiles ({tiles:,} written)"
            self.killed[key] = (f"{timeout_message(self.budget_s, doing)}; it did not stop by itself (a read "
                                "stuck in the decoder?), so its worker process was killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished meanwhile
                pass


def _drain(q, on_tiles, watch: _Watch) -> None:
    while True:
        try:
            kind, key, n = q.get_nowait()
        except queue.Empty:
            return
        watch.note(kind, key, n)
        if kind == "tiles" and on_tiles and n:
            on_tiles(n)

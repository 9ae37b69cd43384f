"""A cohort, end to end: discover slides, skip the ones already done, tile the rest in parallel.

Each slide runs in a worker process (``workers`` of them, spawned), so a slide that crashes its
reader (a segfault in a C decoder on a corrupt file) costs that slide only: the pool is rebuilt and
the slides it was holding are retried alone (:data:`WORKER_RETRIES` times), then reported as failed.
A slide past its time budget (``TilingParams.slide_timeout_s``) stops itself between reads; one stuck
inside a read has its worker killed, and only that slide fails.

The flows (:mod:`flows.steps`) plan with :func:`plan_cohort`, run :func:`tile_one` per slide in their
own executor, retry a dead worker :data:`WORKER_RETRIES` times and record a slide that still fails with
:func:`slide_failed`, as here.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cohort import Cohort, SlideSpec, discover_cohort
from .config import TilingParams
from .escape import terminal
from .location import scrub
from .reader import timeout_message
from .store import StoreError, StoreWriter, moved_doc
from .source import source_info
from .tiler import SlideResult, change_reason, record_failure, tile_slide

__all__ = ["TilingReport", "tile_cohort", "limit_worker_threads", "CohortPlan", "SlideUpdate", "plan_cohort",
           "apply_updates", "dropped_by", "tile_one", "slide_failed", "WORKER_RETRIES"]

# a slide whose worker process died (crashed or was killed, not stopped for its time budget) is run
# again, alone, this many times before it is recorded as failed
WORKER_RETRIES = 1


@dataclass
class TilingReport:
    store: str
    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0
    updates: list["SlideUpdate"] = field(default_factory=list)  # moved / relabelled slides
    dropped: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # derived sets retiling dropped

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
        """A plain-text summary: counts, then one line per moved or relabelled slide, per derived set
        dropped by a retile, and per failed slide with its reason."""
        done, skipped, failed = (self.by_status(s) for s in ("complete", "skipped", "failed"))
        rate = self.n_tiles / self.seconds if self.seconds else 0.0
        lines = [
            f"{'status':<10}{'slides':>8}{'tiles':>10}",
            f"{'complete':<10}{len(done):>8}{self.n_tiles:>10}",
            f"{'skipped':<10}{len(skipped):>8}{'':>10}",
            f"{'failed':<10}{len(failed):>8}{'':>10}",
            f"{self.seconds:.1f} s, {rate:.0f} tiles/s; store: {terminal(self.store)}",
        ]
        lines += [f"  updated {u.line()}" for u in self.updates]
        lines += [f"  dropped {p}/{s}: {', '.join(sets)} (retiled; re-extract them)"
                  for (p, s), sets in self.dropped.items()]
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
    _preload()


def _preload() -> None:
    """Import what tiling a slide imports on first use (tiffslide and tifffile, PIL's drawing for the
    QC picture): once per worker process, at its start, not inside its first slide (about 35 ms of CPU)."""
    import importlib

    for name in ("tiffslide", "pipeline._tiff_direct", "PIL.ImageDraw", "PIL.ImageFont"):
        importlib.import_module(name)


def tile_one(spec: SlideSpec, store: str, params: TilingParams, threads: int = 1,
             progress: Callable[[int], None] | None = None) -> SlideResult:
    """Tile one slide into ``store`` using ``threads`` cores, in the (worker) process calling it: the
    per-slide work of :func:`tile_cohort` and of the flows (see :func:`pipeline.tiler.tile_slide`)."""
    limit_worker_threads(threads)
    return tile_slide(spec, StoreWriter(store), params, progress=progress, overlap=threads > 1)


def slide_failed(store: str, spec: SlideSpec, params: TilingParams, error: str | BaseException) -> SlideResult:
    """The failed result of a slide whose work ended outside :func:`tile_one` (its worker died or was
    killed, or the pool or task failed with ``error``), recorded in ``store`` unless a complete
    version is there (see :func:`pipeline.tiler.record_failure`)."""
    if isinstance(error, BaseException):
        error = f"{spec.path}: {type(error).__name__}: {error}"
    return record_failure(StoreWriter(store), spec, params, error)


def _run_one(key: int, spec: SlideSpec, store: str, params: TilingParams) -> SlideResult:
    """Tile ``spec`` in a worker; the progress queue gets ``("start", key, pid)``, then ``("tiles", key, n)``."""
    q = _progress_queue
    if q is not None:
        q.put(("start", key, os.getpid()))
    return tile_one(spec, store, params, _threads, (lambda n: q.put(("tiles", key, n))) if q is not None else None)


def tile_cohort(
    source: str | Path,
    store: str | Path,
    params: TilingParams | None = None,
    *,
    workers: int = 1,
    threads: int | None = None,
    force: bool = False,
    drop_derived: bool = False,
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

    Before tiling, the store follows the cohort (:func:`plan_cohort`): changed labels and splits are
    written and slides whose patient changed are moved, without retiling when their pixels did not
    change. A slide to retile that has features or attribute scores is retiled, dropping them,
    only with ``drop_derived`` (else it is reported failed, naming them); ``report.dropped`` lists them.
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
    plan = plan_cohort(cohort, writer, params, force=force, drop_derived=drop_derived)
    report.results.extend(plan.results)
    todo, failed = apply_updates(writer, plan)
    report.results.extend(failed)
    report.updates = plan.updates
    if on_plan:
        on_plan(len(todo))
    if todo:
        report.results.extend(_run_pool(todo, str(writer.path), params, workers, threads, on_slide, on_tiles))
    report.dropped = dropped_by(plan, report.results)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class SlideUpdate:
    """What a rerun changes in the store for one slide besides (or instead of) retiling it."""

    spec: SlideSpec
    moved_from: str | None = None  # the patient it was stored under
    changes: list[str] = field(default_factory=list)  # e.g. "label 'a' -> 'b'"
    retiled: bool = False  # moved, then retiled (its pixels or parameters changed too)
    leftover: bool = False  # removes what an interrupted move left under ``moved_from``

    @property
    def patient_id(self) -> str:
        return self.spec.patient_id

    @property
    def slide_id(self) -> str:
        return self.spec.slide_id

    def what(self) -> str:
        """What changed, e.g. ``moved from patient P1; label 'a' -> 'b'``."""
        if self.leftover:
            return f"removed what an interrupted move left under patient {self.moved_from}"
        moved = [f"moved from patient {self.moved_from}" + (", then retiled" if self.retiled else "")
                 ] if self.moved_from else []
        return "; ".join(moved + self.changes)

    def line(self) -> str:
        return f"{self.patient_id}/{self.slide_id}: {self.what()}"


@dataclass
class CohortPlan:
    """What a run does with each slide of a cohort (see :func:`plan_cohort`)."""

    todo: list[tuple[SlideSpec, str]] = field(default_factory=list)  # (slide to tile, why)
    results: list[SlideResult] = field(default_factory=list)  # skipped slides and refused rows
    updates: list[SlideUpdate] = field(default_factory=list)  # moves and relabels, applied before tiling
    dropped: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (patient, slide) -> derived sets


def plan_cohort(cohort: Cohort, writer: StoreWriter, params: TilingParams, *, force: bool = False,
                drop_derived: bool = False) -> CohortPlan:
    """Decide, slide by slide, what a run does; reads the store and each slide's fingerprint, writes nothing.

    * A slide whose pixels (size and fingerprint) and tiling parameters are unchanged is not
      retiled; if its label or split changed, or it is stored under another patient, it is updated
      (:class:`SlideUpdate`; moved with its features). A label or split left empty is not a change.
    * A slide to retile whose ``features/`` or ``attributes/`` arrays exist is refused unless
      ``drop_derived`` (retiling makes them invalid); the sets dropped are in ``dropped``.
    * The same source file (size and fingerprint) under two slide ids or patients, in the cohort or
      between the cohort and a complete stored slide, is refused, naming both: it would put one
      slide in training and in the held-out set. So is a slide id the store holds under two patients.
    """
    plan = CohortPlan(results=[SlideResult(p.patient_id, p.slide_id, p.source, "failed", error=f"{p.source}: {p.error}")
                               for p in cohort.problems])
    index = writer.slide_index()
    sources = _source_infos(cohort.slides)
    refused = _same_source(cohort.slides, sources, index)
    clashes = _case_clashes(index)
    for spec in cohort.slides:
        error = refused.get(spec) or clashes(spec) or _plan_slide(
            plan, writer, spec, index.get(spec.slide_id, []), sources[spec], params, force, drop_derived)
        if error:
            plan.results.append(SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "failed",
                                            error=scrub(f"{spec.row or spec.path}: {error}")))
    return plan


def _plan_slide(plan: CohortPlan, writer: StoreWriter, spec: SlideSpec, stored: list[tuple[str, dict]],
                src: dict | OSError, params: TilingParams, force: bool, drop_derived: bool) -> str | None:
    """Add ``spec`` to ``plan``; or return why it is refused."""
    here = [a for p, a in stored if p == spec.patient_id]
    away = [(p, a) for p, a in stored if p != spec.patient_id]
    if here and away and all(a.get("status") == "moving" and a.get("moving_to") == spec.patient_id for _, a in away):
        # a move to this patient was killed: after the copy, what is left is removed; else it is moved again
        if here[0].get("status") == "complete":
            plan.updates += [SlideUpdate(spec, p, leftover=True) for p, _ in away]
            away = []
        else:
            here = []
    if away and (here or len(away) > 1):
        places = ", ".join(f"patients/{p}/slides/{spec.slide_id}" for p, _ in stored)
        return (f"slide {spec.slide_id!r} is stored under more than one patient ({places}); the manifest says "
                f"patient {spec.patient_id!r}. One slide under two patients leaks between training and the "
                "held-out set: delete the wrong copy from the store, then rerun")
    moved_from, attrs = (away[0][0], away[0][1]) if away else (None, here[0] if here else None)
    attrs = ((moved_doc(attrs) or {}).get("attributes") or attrs) if attrs is not None else None
    reason = "forced" if force else ("new" if attrs is None else
                                     change_reason(writer, spec, params, attrs=attrs, src=src))
    if reason is None:
        changes = _label_changes(spec, attrs)
        if moved_from or changes:
            plan.updates.append(SlideUpdate(spec, moved_from, changes))
        plan.results.append(SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "skipped"))
        return None
    derived = writer.derived_sets(moved_from or spec.patient_id, spec.slide_id) if attrs is not None else []
    if derived and not drop_derived:
        return (f"needs retiling ({reason}), which would make {', '.join(derived)} invalid (their tiles_version "
                "would no longer match); not retiled. Retile and drop them with hlss tile --drop-derived")
    if derived:
        plan.dropped[(spec.patient_id, spec.slide_id)] = derived
    if moved_from:
        plan.updates.append(SlideUpdate(spec, moved_from, retiled=True))
    plan.todo.append((spec, reason))
    return None


def _case_clashes(index: dict[str, list[tuple[str, dict]]]) -> Callable[[SlideSpec], str | None]:
    """A check of a slide against the store: why its slide or patient id is refused because the store
    holds one that differs only by case (on a case-insensitive file system the commit would replace it)."""
    slides = {s.lower(): (entries[0][0], s) for s, entries in index.items()}
    patients = {p.lower(): p for entries in index.values() for p, _ in entries}

    def check(spec: SlideSpec) -> str | None:
        p, s = slides.get(spec.slide_id.lower(), (None, spec.slide_id))
        if s != spec.slide_id:
            return (f"slide id {spec.slide_id!r} differs only by case from the stored patients/{p}/slides/{s} "
                    "(one folder on macOS/Windows file systems); use the stored spelling")
        p = patients.get(spec.patient_id.lower(), spec.patient_id)
        if p != spec.patient_id:
            return (f"patient id {spec.patient_id!r} differs only by case from the stored patients/{p} "
                    "(one folder on macOS/Windows file systems); use the stored spelling")
        return None

    return check


def dropped_by(plan: CohortPlan, results: list[SlideResult]) -> dict[tuple[str, str], list[str]]:
    """The derived sets of ``plan.dropped`` whose slide was retiled (a failed retile keeps the old version)."""
    done = {(r.patient_id, r.slide_id) for r in results if r.status == "complete"}
    return {k: v for k, v in plan.dropped.items() if k in done}


def _label_changes(spec: SlideSpec, attrs: dict) -> list[str]:
    """``"label 'a' -> 'b'"`` for each of label and split given for ``spec`` and different in the store."""
    return [f"{k} {attrs.get(k)!r} -> {getattr(spec, k)!r}" for k in ("label", "split")
            if getattr(spec, k) is not None and attrs.get(k) != getattr(spec, k)]


def _source_infos(specs: list[SlideSpec]) -> dict[SlideSpec, dict | OSError]:
    """:func:`~pipeline.source.source_info` of every slide (or the OSError it raised), 8 files at a time."""
    def info(spec: SlideSpec) -> dict | OSError:
        try:
            return source_info(spec.path)
        except OSError as e:
            return e

    with ThreadPoolExecutor(8, thread_name_prefix="fingerprint") as pool:
        return dict(zip(specs, pool.map(info, specs)))


def _same_source(specs: list[SlideSpec], sources: dict[SlideSpec, dict | OSError],
                 index: dict[str, list[tuple[str, dict]]]) -> dict[SlideSpec, str]:
    """``{slide: why refused}`` for slides whose file (size and fingerprint) is another row's, or a
    complete stored slide's under another slide id."""
    def key(src: dict) -> tuple:
        return src.get("bytes"), src.get("fingerprint")

    rows: dict[tuple, list[SlideSpec]] = defaultdict(list)
    for spec in specs:
        if isinstance(sources[spec], dict):
            rows[key(sources[spec])].append(spec)
    stored: dict[tuple, list[str]] = defaultdict(list)
    for slide_id, entries in index.items():
        for p, a in entries:
            if a.get("status") == "complete" and (a.get("source") or {}).get("fingerprint"):
                stored[key(a["source"])].append((p, slide_id))
    leak = "one slide under two ids or patients leaks between training and the held-out set"
    out = {}
    for k, same in rows.items():
        for spec in same:
            others = [f"{o.patient_id}/{o.slide_id} ({o.row or o.path})" for o in same if o is not spec]
            elsewhere = [f"patients/{p}/slides/{s}" for p, s in stored.get(k, []) if s != spec.slide_id]
            if others:
                out[spec] = f"the same slide file (size and fingerprint) as {', '.join(others)}: {leak}; keep one row"
            elif elsewhere:
                out[spec] = (f"the store already holds this slide file (same size and fingerprint) as "
                             f"{', '.join(elsewhere)}: {leak}; use that slide id, or delete it from the store")
    return out


def apply_updates(writer: StoreWriter, plan: CohortPlan) -> tuple[list[SlideSpec], list[SlideResult]]:
    """Carry out ``plan.updates`` (moves, relabels, leftovers of interrupted moves); the slides left to
    tile, and a failed result for each slide whose update failed (it is not tiled then)."""
    blocked: set[SlideSpec] = set()
    failed: list[SlideResult] = []
    for u in plan.updates:
        try:
            if u.leftover:
                writer.remove_move_leftover(u.moved_from, u.slide_id)
            elif u.moved_from:
                writer.move_slide(u.moved_from, u.patient_id, u.slide_id, u.spec.patient_attrs())
            if u.changes:
                writer.update_labels(u.patient_id, u.slide_id, u.spec.patient_attrs())
        except (OSError, StoreError) as e:
            failed.append(SlideResult(u.patient_id, u.slide_id, str(u.spec.path), "failed",
                                      error=scrub(f"{u.line()}: not done: {e}")))
            blocked.add(u.spec)
    return [s for s, _ in plan.todo if s not in blocked], failed


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
                            finish(slide_failed(store, spec, params, f"{spec.path}: {watch.killed[keys[id(spec)]]}"))
                        else:
                            broken.append(spec)
                    except Exception as e:  # pool-side errors (e.g. pickling): this slide only
                        finish(slide_failed(store, spec, params, e))
        _drain(progress_q, on_tiles, watch)
        broke = broke or bool(broken or watch.killed)
        return broken, bool(watch.killed)

    pending, timed_out = run(todo, min(workers, len(todo)))
    while timed_out and pending:  # killed by us: the others did nothing wrong
        pending, timed_out = run(pending, min(workers, len(pending)))
    for spec in pending:
        if all(run([spec], 1)[0] for _ in range(WORKER_RETRIES)):  # stops at the first try that ends
            error = f"{spec.path}: the worker process crashed while reading this slide; the file is probably corrupt"
            finish(slide_failed(store, spec, params, error))
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

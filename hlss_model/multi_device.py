"""Feature extraction on several devices of one machine: one worker process per device, slides split between them.

Each worker builds its own encoders from their :class:`~hlss_model.settings.EncoderSpec` (models
never cross a process boundary) and runs :func:`~hlss_model.extract.extract_features` on its share
of the slides, all on the same store. A slide's features are staged under the worker's own
``_staging/<host>-<pid>-<hex>`` token and committed whole by the worker that computed them, so two
workers never write the same node. Staging left by dead writers is removed once, here, before the
workers start: a worker cleaning it could take another live worker's version set aside mid-commit
for a dead writer's (see ``clean_staging`` in :func:`~hlss_model.extract.extract_features`).

Slides are split largest first, each to the share with the fewest tiles so far (greedy LPT), so the
shares take about the same time on identical devices. Every worker builds its encoders before any
starts extracting; an encoder that cannot be built stops them all (ValueError, nothing written).
A worker that dies later (killed, out of host memory) loses only the slides it had not finished:
they are reported failed, naming the device, and the next run extracts them (finished slides are
skipped). A CUDA out-of-memory error inside a batch fails that slide only, like any slide error.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, Iterable

from pipeline.qc import TileFilter
from pipeline.store import SlideStore, StoreWriter

from .extract import ExtractReport, check_encoder_names, extract_features, resolve_device
from .settings import EXTRACTION, EncoderSpec

__all__ = ["extract_on_devices", "expand_devices", "split_slides", "DeviceRun", "DevicesReport"]

log = logging.getLogger(__name__)


@dataclass
class DeviceRun:
    """One worker's part: its device, its share (slides and their tiles) and what it did."""

    device: str
    share: list[tuple[str, str]]
    planned_tiles: int
    report: ExtractReport = field(default_factory=ExtractReport)
    error: str | None = None  # why the worker stopped early, if it did
    pid: int | None = None  # the worker's process id

    @property
    def tiles_per_s(self) -> float:
        """Tiles per second of this worker's extraction (its own clock, model build excluded)."""
        return self.report.tiles_per_s


@dataclass
class DevicesReport(ExtractReport):
    """The merged report of all workers (``seconds``: wall time of the whole run) and each worker's part."""

    devices: list[DeviceRun] = field(default_factory=list)
    encoders: list[tuple[str, int]] = field(default_factory=list)  # (feature name, dimension)


def expand_devices(devices: Iterable[str]) -> list[str]:
    """Device names to give one worker each: ``all`` is every visible CUDA device, ``auto`` one
    device as :func:`resolve_device` picks it; a CUDA device that is not there is a ValueError."""
    import torch

    out: list[str] = []
    for name in devices:
        if name == "all":
            if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
                raise ValueError("devices 'all' asked for but no CUDA device is visible")
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            continue
        device = resolve_device(name)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices are visible")
        out.append(str(device))
    if not out:
        raise ValueError("give at least one device")
    return out


def split_slides(sizes: dict[tuple[str, str], int], n: int) -> list[list[tuple[str, str]]]:
    """``n`` shares of the slides, balanced by tile count: largest first, each to the lightest share.

    ``sizes``: tiles per ``(patient, slide)``. Deterministic (ties go by slide key, then share index);
    each share lists its slides in the order of ``sizes``.
    """
    loads, owner = [0] * n, {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(n), key=lambda j: (loads[j], j))
        owner[key] = i
        loads[i] += sizes[key]
    return [[key for key in sizes if owner[key] == i] for i in range(n)]


def _worker(conn: Connection, store: str, specs: list[EncoderSpec], device: str,
            share: list[tuple[str, str]], options: dict, threads: int | None) -> None:
    """One device's process: build the encoders, say so, wait for ``go``, extract ``share``,
    sending each slide's status, each batch's tile count and the final report to the parent."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        encoders = [spec.build() for spec in specs]
    except Exception as e:  # reported by the parent, which stops every worker
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", [(e.name, e.dim) for e in encoders]))
    if conn.recv() != "go":
        return
    try:
        report = extract_features(store, encoders, device=device, slides=share, clean_staging=False,
                                  on_slide=lambda p, s, status: conn.send(("slide", p, s, status)),
                                  on_tiles=lambda n: conn.send(("tiles", n)), **options)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("done", report))


@dataclass
class _Worker:
    run: DeviceRun
    process: mp.process.BaseProcess
    conn: Connection
    started: float = 0.0
    done: bool = False
    open: bool = True
    seen: set = field(default_factory=set)  # slides whose status came

    def receive(self) -> tuple | None:
        """The next message, or None once the worker's end is closed (it exited or died)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.open = False
            return None


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _start(store: str, specs: list[EncoderSpec], devices: list[str], shares: list[list[tuple[str, str]]],
           sizes: dict[tuple[str, str], int], options: dict) -> list[_Worker]:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    cpus = sum(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // cpus) if cpus else None  # CPU workers share the cores
    workers = []
    for device, share in zip(devices, shares):
        if not share:
            continue
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, name=f"hlss-extract-{device}", daemon=True,
                           args=(theirs, store, specs, device, share, options,
                                 threads if device == "cpu" else None))
        proc.start()
        theirs.close()  # so the parent sees EOF when the worker ends
        run = DeviceRun(device, share, sum(sizes[k] for k in share), pid=proc.pid)
        workers.append(_Worker(run, proc, mine))
    return workers


def _await_ready(workers: list[_Worker]) -> list[tuple[str, int]]:
    """Every worker's encoders, once all are built; ValueError (naming the device) if one is not."""
    encoders: list[tuple[str, int]] | None = None
    for w in workers:
        msg = w.receive()
        if msg is None or msg[0] != "ready":
            if msg is None:
                w.process.join(5)
            why = msg[1] if msg else f"its process ended ({_exit_text(w.process.exitcode)})"
            raise ValueError(f"encoders could not be built for {w.run.device}: {why}")
        encoders = [tuple(e) for e in msg[1]]
    assert encoders is not None
    check_encoder_names([name for name, _ in encoders])
    return encoders


def _follow(workers: list[_Worker], on_slide: Callable | None, on_tiles: Callable | None) -> None:
    """Relay every worker's messages until all have ended."""
    by_conn = {w.conn: w for w in workers}
    while any(w.open for w in workers):
        for conn in wait([w.conn for w in workers if w.open]):
            w = by_conn[conn]
            msg = w.receive()
            if msg is None:
                continue
            kind = msg[0]
            if kind == "slide":
                _, p, s, status = msg
                w.seen.add((p, s))
                getattr(w.run.report, status).append((p, s) if status != "failed" else
                                                     (p, s, "failed (the error was lost with its worker)"))
                if on_slide:
                    on_slide(p, s, status)
            elif kind == "tiles":
                w.run.report.tiles += msg[1]
                if on_tiles:
                    on_tiles(msg[1])
            elif kind == "done":
                w.run.report, w.done = msg[1], True
            elif kind == "error":
                w.run.error = msg[1]


def _close(w: _Worker, on_slide: Callable | None) -> None:
    """Join a worker; if it died, fail the slides of its share it had not finished, saying why."""
    w.process.join()
    if w.done:
        return
    w.run.report.seconds = time.perf_counter() - w.started
    why = w.run.error or _exit_text(w.process.exitcode)
    w.run.error = why
    log.error("extraction worker on %s stopped (%s); its unfinished slides fail", w.run.device, why)
    for p, s in w.run.share:
        if (p, s) not in w.seen:
            w.run.report.failed.append((p, s, f"the worker on {w.run.device} stopped before finishing this "
                                              f"slide ({why}); rerun to extract it"))
            if on_slide:
                on_slide(p, s, "failed")


def extract_on_devices(store: str | Path, encoders: list[EncoderSpec], devices: list[str],
                       batch_size: int = EXTRACTION.batch_size, dtype: str = EXTRACTION.dtype,
                       force: bool = False, amp: bool | None = None,
                       slides: Iterable[tuple[str, str]] | None = None, tile_filter: TileFilter | None = None,
                       on_slide: Callable[[str, str, str], None] | None = None,
                       on_tiles: Callable[[int], None] | None = None) -> DevicesReport:
    """:func:`extract_features` of ``slides`` (default: every complete slide) with one process per device.

    Args:
        encoders: specs each worker builds its encoders from.
        devices: one worker each (:func:`expand_devices`: ``all``, ``cuda:N``, ``cpu``; a name may
            repeat, e.g. two CPU workers, each then given its share of the cores).
        batch_size, dtype, force, amp, tile_filter: as :func:`extract_features`, for every worker.
        on_slide, on_tiles: as :func:`extract_features`, called in this process as workers report.

    Returns the merged report (``seconds``: wall time including the workers' start) with each
    worker's :class:`DeviceRun`. Raises ValueError, with nothing written, when a device is not
    there or an encoder cannot be built. Workers are spawned (CUDA cannot be forked), so a script
    calling this needs the ``if __name__ == "__main__":`` guard.
    """
    t0, store = time.perf_counter(), str(store)
    devices = expand_devices(devices)
    for spec in encoders:
        spec.checked()
    reader = SlideStore(store)
    wanted = None if slides is None else set(map(tuple, slides))
    sizes = {(r.patient_id, r.slide_id): r.n_tiles for r in reader.records(status="complete")
             if wanted is None or (r.patient_id, r.slide_id) in wanted}
    shares = split_slides(sizes, len(devices))
    StoreWriter(store).clean_staging()  # once, before any worker writes (see the module's docstring)
    options = dict(batch_size=batch_size, dtype=dtype, force=force, amp=amp, tile_filter=tile_filter)
    workers = _start(store, encoders, devices, shares, sizes, options)
    try:
        names = _await_ready(workers) if workers else []
        for w in workers:
            w.started = time.perf_counter()
            w.conn.send("go")
        _follow(workers, on_slide, on_tiles)
        for w in workers:
            _close(w, on_slide)
    finally:
        for w in workers:
            if w.process.is_alive():  # stopped early (a build failed, or an interrupt): nothing to keep
                w.process.terminate()
                w.process.join(10)
    runs = [w.run for w in workers]
    merged = ExtractReport.merged((r.report for r in runs), seconds=time.perf_counter() - t0)
    return DevicesReport(merged.extracted, merged.skipped, merged.failed, merged.tiles, merged.seconds,
                         devices=runs, encoders=names)

"""Where per-slide work runs: a pool of local worker processes, or an existing Dask cluster.

Prefect tasks stay in the flow's process (thread pool) and hand the heavy work to a
:class:`SlideExecutor`, i.e. Dask *inside* tasks rather than Prefect's ``DaskTaskRunner``. Tasks
then talk to the flow's own Prefect API only, so Dask workers need no Prefect server of their own
(with a temporary local API, ``DaskTaskRunner`` makes every worker start one), and a killed worker
surfaces in the task that was waiting for it, where Prefect's retries take over.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
from urllib.parse import urlsplit
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

__all__ = ["SlideExecutor", "WorkerLost", "check_scheduler"]

log = logging.getLogger(__name__)


def check_scheduler(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast, with one line, when nothing listens at a Dask scheduler's ``tcp://`` or ``tls://``
    host and port (``distributed.Client`` would wait its whole timeout, then raise from deep inside).

    Other schemes (``inproc://``, ``ucx://``) are left to Dask. Raises ConnectionError naming the address.
    """
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError as e:  # a port that is not a number
        raise ConnectionError(f"Dask scheduler {address}: not an address of the form tcp://host:port ({e})") from None
    if not host:
        raise ConnectionError(f"Dask scheduler {address}: not an address of the form tcp://host:port")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConnectionError(f"Dask scheduler {address}: cannot connect to {host}:{port} ({why}); start one with "
                              f"`dask scheduler` (and `dask worker {address}`), or leave the scheduler "
                              f"address unset to run on this machine") from None


class WorkerLost(RuntimeError):
    """The process running a piece of work died (killed, out of memory, or a crash in native code)."""


class SlideExecutor:
    """Runs picklable functions in worker processes and blocks for their results.

    ``scheduler_address`` (``tcp://host:8786``): submit to that Dask cluster; otherwise a local pool
    of ``workers`` spawned processes. :attr:`slots` is how many pieces of work run at once.
    Safe to call :meth:`run` from several threads.
    """

    def __init__(self, workers: int = 1, scheduler_address: str | None = None, connect_timeout_s: float = 30) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.scheduler_address = scheduler_address
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._client = None
        if scheduler_address:
            from distributed import Client

            check_scheduler(scheduler_address)
            try:
                self._client = Client(scheduler_address, timeout=connect_timeout_s, set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ConnectionError(f"Dask scheduler {scheduler_address}: cannot connect ({e})") from e

    @property
    def slots(self) -> int:
        """Pieces of work that can run at once: ``workers`` locally; the cluster's threads, up to ``workers``, on Dask."""
        if self._client is None:
            return self.workers
        threads = sum(self._client.nthreads().values())
        return max(1, min(self.workers, threads)) if threads else self.workers

    def worker_resources(self) -> set[str]:
        """Names of the resources (e.g. ``GPU``) that the cluster's workers declare (empty locally)."""
        if self._client is None:
            return set()
        info = self._client.scheduler_info(n_workers=-1)["workers"].values()
        return {name for w in info for name in (w.get("resources") or {})}

    def run(self, fn: Callable[..., Any], *args: Any, resources: dict[str, float] | None = None) -> Any:
        """``fn(*args)`` in a worker process; raises :class:`WorkerLost` if that process dies."""
        if self._client is not None:
            return self._run_dask(fn, args, resources)
        pool = self._local_pool()
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            with self._lock:
                if self._pool is pool:  # the first thread to notice replaces the pool for everyone
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerLost(f"a worker process died while running {_name(fn)} (killed or crashed)") from e

    def _run_dask(self, fn, args, resources) -> Any:
        from distributed import KilledWorker

        future = self._client.submit(fn, *args, pure=False, resources=resources)
        try:
            return future.result()
        except KilledWorker as e:
            raise WorkerLost(f"Dask workers died running {_name(fn)} ({e})") from e

    def _local_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> "SlideExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))

"""The flows against a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on
loopback, one of them lost (SIGKILL to its whole process group: nanny and worker, as when a node
dies) while it writes a slide."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cohort import discover_cohort
from pipeline.config import TilingParams
from pipeline.runner import tile_one
from pipeline.layout import STAGING
from pipeline.store import SlideStore, StoreWriter
from pipeline.synthetic import make_demo_cohort
from pipeline.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
TILING = {"tile_size": 128}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A ``dask`` command in its own session (so its process group is the node to kill), importing this
    checkout, with ``env`` added to its environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    with open(log, "wb") as out:
        return subprocess.Popen([str(DASK), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End a process group started by :func:`_start` (already gone is fine)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _writer_pids(store: Path) -> list[int]:
    """Pids of the processes with a slide being written under ``_staging`` (``<host>-<pid>-<hex>``)."""
    staging = store / STAGING
    pids = []
    for child in staging.iterdir() if staging.is_dir() else []:
        parts = child.name.split("-")
        if child.is_dir() and len(parts) >= 3 and parts[-2].isdigit():
            pids.append(int(parts[-2]))
    return pids


def _kill_a_writing_node(store: Path, nodes: list[subprocess.Popen], killed: list[int], stop: threading.Event) -> None:
    """Once a slide is committed, SIGKILL the process group of the first node seen writing the next one."""
    groups = {proc.pid for proc in nodes}  # each node's session leader: pgid == pid
    while not stop.is_set():
        if any(store.glob("patients/*/slides/*/zarr.json")):
            for pid in _writer_pids(store):
                try:
                    group = os.getpgid(pid)
                except ProcessLookupError:
                    continue
                if group in groups:
                    os.killpg(group, signal.SIGKILL)
                    killed.append(pid)
                    return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("allowed_failures", [3, 0], ids=["dask-reschedules", "task-retries"])
def test_a_lost_dask_worker_node_has_its_slide_redone(harness, tmp_path, allowed_failures):
    """Two ``dask worker`` nodes (nanny + worker each) tile four slides; one node is SIGKILLed while it
    writes a slide. The flow finishes, every slide is in the store once, complete, with the same tiles
    as a local run, the store verifies clean, and only the dead writer's staging group is left (the
    next run's clean-up removes it). With Dask's default ``allowed-failures`` (3) the scheduler
    reschedules the slide; with 0 it gives up at once (KilledWorker) and the tile-slide task's retry
    submits it again."""
    from distributed import Client

    from flows.reprocess import reprocess

    make_demo_cohort(tmp_path, n_patients=4, slides_per_patient=(1, 1), n_classes=1, width=4096, height=3072, seed=3)
    slides, store = tmp_path / "slides", tmp_path / "store"
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                       tmp_path / "scheduler.log",
                       {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(allowed_failures)})
    nodes: list[subprocess.Popen] = []
    try:
        for i in range(2):  # with a nanny (the default): the nanny would restart a worker killed alone
            nodes.append(_start(["worker", address, "--nworkers", "1", "--nthreads", "1", "--name", f"node{i}",
                                 "--local-directory", str(tmp_path / f"node{i}"), "--no-dashboard",
                                 "--death-timeout", "60"], tmp_path / f"node{i}.log"))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        killed: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_kill_a_writing_node, args=(store, nodes, killed, stop), daemon=True)
        watcher.start()
        try:
            out = reprocess(source=str(slides), store=str(store), tiling=TILING, workers=2, scheduler_address=address)
        finally:
            stop.set()
            watcher.join()
        assert killed, "no worker node was seen writing a slide after the first commit"
        assert [proc.poll() for proc in nodes].count(None) == 1  # one node gone for good, one still up
    finally:
        for proc in [*nodes, scheduler]:
            _stop(proc)

    gave_up = "workers died while trying to run it" in (tmp_path / "scheduler.log").read_text()
    assert gave_up == (allowed_failures == 0)  # which layer redid the slide: the task's retry, or Dask
    specs = discover_cohort(slides).slides
    ids = sorted((s.patient_id, s.slide_id) for s in specs)
    assert out["slides"]["complete"] == 4 and out["slides"]["failed"] == 0
    assert sorted((r["patient"], r["slide"]) for r in out["slide_rows"]) == ids
    assert {r["status"] for r in out["slide_rows"]} == {"complete"}
    reader = SlideStore(store)
    records = list(reader.records(status=None))
    assert sorted((r.patient_id, r.slide_id) for r in records) == ids  # each slide once
    assert {r.status for r in records} == {"complete"}
    assert verify_store(reader).exit_code == 0

    local = tmp_path / "local"  # the same slides tiled in this process: the reference
    for spec in specs:
        assert tile_one(spec, str(local), TilingParams(**TILING)).status == "complete"
    ref = SlideStore(local)
    for p, s in ids:
        assert np.array_equal(reader.coords(p, s), ref.coords(p, s)), (p, s)
        assert np.array_equal(reader.tiles(p, s)[:], ref.tiles(p, s)[:]), (p, s)

    assert _writer_pids(store) == killed  # the only leftover: the half slide of the killed writer
    StoreWriter(store).clean_staging()
    assert _writer_pids(store) == []

"""Extraction on several devices (one worker process each, here two CPU workers), bf16 autocast, and
the staging race that made workers cleaning ``_staging`` unsafe beside each other."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from hlss.cli import main
from hlss_model.extract import extract_features
from hlss_model.multi_device import extract_on_devices, split_slides
from hlss_model.settings import EncoderSpec
from pipeline.ids import sanitize_id
from pipeline.store import SlideStore, StoreWriter, tiles_version
from store_snapshot import assert_unchanged, snapshot

SPEC = EncoderSpec("timm", "resnet10t", name="r10", random_init=True)  # random init, seed 0: the same weights in every process
BATCH = 16


def _copy(train_store: Path, tmp_path: Path, name: str = "store.zarr") -> Path:
    """A private copy of the session-shared store (12 slides, 365 tiles of 64 px)."""
    return Path(shutil.copytree(train_store, tmp_path / name))


def _slides(store: Path) -> list[tuple[str, str]]:
    return [(r.patient_id, r.slide_id) for r in SlideStore(store).records(status="complete")]


def _sizes(store: Path) -> dict[tuple[str, str], int]:
    return {(r.patient_id, r.slide_id): r.n_tiles for r in SlideStore(store).records(status="complete")}


def _staged(store: Path) -> list[str]:
    staging = store / "_staging"
    return sorted(p.name for p in staging.iterdir() if p.is_dir()) if staging.exists() else []


def test_split_slides_is_balanced_and_complete():
    sizes = {("P", f"S{i}"): n for i, n in enumerate([90, 10, 40, 40, 30, 30, 20, 5, 5, 1])}
    shares = split_slides(sizes, 3)
    assert sorted(k for share in shares for k in share) == sorted(sizes)  # every slide once
    loads = [sum(sizes[k] for k in share) for share in shares]
    assert max(loads) - min(loads) <= 10 and sum(loads) == 271  # largest first: 90 | 91 | 90
    assert shares == split_slides(dict(sizes), 3)  # deterministic
    assert all(share == [k for k in sizes if k in share] for share in shares)  # store order within a share
    assert split_slides(sizes, 1) == [list(sizes)]
    assert split_slides({("P", "S0"): 3}, 2) == [[("P", "S0")], []]


def test_two_workers_give_the_features_of_one_process(train_store, tmp_path):
    """``cpu,cpu``: two real worker processes, each its own share, the same features as one process."""
    one, two = _copy(train_store, tmp_path, "one.zarr"), _copy(train_store, tmp_path, "two.zarr")
    single = extract_features(one, [SPEC.build()], batch_size=BATCH, device="cpu")
    dead = f"{sanitize_id(socket.gethostname())}-999999999-0123456789ab"  # a writer of this host, gone
    (two / "_staging" / dead).mkdir(parents=True)
    report = extract_on_devices(two, [SPEC], ["cpu", "cpu"], batch_size=BATCH)

    slides, sizes = _slides(two), _sizes(two)
    assert report.exit_code == 0 and not report.failed and not report.skipped
    assert sorted(report.extracted) == sorted(slides) and len(report.extracted) == len(slides)  # each once
    assert report.tiles == single.tiles == sum(sizes.values())
    assert report.encoders == [("r10", 512)]
    a, b = report.devices
    assert (a.device, b.device) == ("cpu", "cpu") and len({a.pid, b.pid, psutil.Process().pid}) == 3
    assert [a.share, b.share] == split_slides(sizes, 2)
    assert abs(a.planned_tiles - b.planned_tiles) <= max(sizes.values())  # balanced by tile count
    for run in (a, b):
        assert sorted(run.report.extracted) == sorted(run.share) and run.report.tiles == run.planned_tiles
        assert run.error is None and run.tiles_per_s > 0
    r1, r2 = SlideStore(one), SlideStore(two)
    for p, s in slides:
        f1, f2 = r1.features(p, s, "r10"), r2.features(p, s, "r10")
        np.testing.assert_allclose(f2[:], f1[:], rtol=1e-4, atol=1e-5)
        assert f2.attrs["weights_fingerprint"] == f1.attrs["weights_fingerprint"]
        assert f2.attrs["tiles_version"] == tiles_version(r2.slide_attrs(p, s))
        assert f2.attrs["precision"] == "fp32"
    assert _staged(two) == []  # the dead writer's staging was removed (once, before the workers started)


def test_a_killed_worker_loses_only_its_unfinished_slides(train_store, tmp_path):
    """One of two workers is killed (SIGKILL) after the first slide is committed: the other's slides are
    all committed, the killed one's unfinished slides are reported failed saying why, the store
    verifies, and a rerun extracts exactly those slides."""
    store = _copy(train_store, tmp_path)
    before = snapshot(store)
    killed: list[int] = []
    started = time.time()

    def kill_one(p: str, s: str, status: str) -> None:
        if status == "extracted" and not killed:
            workers = [c for c in psutil.Process().children() if c.create_time() >= started - 1
                       and "spawn_main" in " ".join(c.cmdline())]  # this run's two workers
            assert len(workers) == 2
            victim = min(workers, key=lambda c: c.pid)
            victim.kill()
            killed.append(victim.pid)

    report = extract_on_devices(store, [SPEC], ["cpu", "cpu"], batch_size=BATCH, on_slide=kill_one)

    dead = next(r for r in report.devices if r.pid == killed[0])
    alive = next(r for r in report.devices if r.pid != killed[0])
    assert report.exit_code == 1 and dead.error == "killed by SIGKILL" and alive.error is None
    assert sorted(alive.report.extracted) == sorted(alive.share)
    failed = {(p, s): err for p, s, err in report.failed}
    assert failed and set(failed) <= set(dead.share)
    assert set(failed) | set(report.extracted) == set(_slides(store)) and not set(failed) & set(report.extracted)
    for err in failed.values():
        assert err == ("the worker on cpu stopped before finishing this slide (killed by SIGKILL); "
                       "rerun to extract it")
    reader = SlideStore(store)
    for p, s in report.extracted:  # committed whole and readable
        assert reader.features(p, s, "r10").shape == (reader.slide_attrs(p, s)["n_tiles"], 512)
    for p, s in failed:
        assert "r10" not in reader.feature_names(p, s)
    assert_unchanged(before, snapshot(store),
                     allow=tuple(f"patients/{p}/slides/{s}/features" for p, s in report.extracted))
    assert main(["verify", str(store)]) == 0

    rerun = extract_features(store, [SPEC.build()], batch_size=BATCH, device="cpu")
    assert sorted(rerun.extracted) == sorted(failed) and len(rerun.skipped) == len(report.extracted)
    assert _staged(store) == []  # the killed worker's staging went with the rerun's clean-up


def test_an_encoder_that_cannot_be_built_stops_every_worker_before_any_write(train_store, tmp_path):
    store = _copy(train_store, tmp_path)
    before = snapshot(store)
    with pytest.raises(ValueError, match=r"encoders could not be built for cpu: ValueError: timm model "
                                         r"'no_such_model'"):
        extract_on_devices(store, [EncoderSpec("timm", "no_such_model", random_init=True)], ["cpu", "cpu"])
    assert_unchanged(before, snapshot(store))
    assert _staged(store) == []


@pytest.mark.parametrize("clean", [False, True])
def test_a_worker_starting_beside_a_committing_one(train_store, tmp_path, monkeypatch, clean):
    """Another writer (a thread here) has set a slide's old features aside and is about to move the new
    ones in when a second extraction starts. Cleaning staging then takes the set-aside version for a
    dead writer's and puts it back, so the first writer's commit fails: workers beside others must
    start with ``clean_staging=False`` (what :func:`extract_on_devices` gives them)."""
    store = _copy(train_store, tmp_path)
    (p, s), *rest = _slides(store)
    enc = SPEC.build()
    extract_features(store, [enc], batch_size=BATCH, device="cpu", slides=[(p, s)])  # the version to replace
    reader, writer = SlideStore(store), StoreWriter(store)
    n = reader.slide_attrs(p, s)["n_tiles"]
    staged = writer.stage_features(n, 512)
    staged[:] = 7.0
    set_aside, resume, errors = threading.Event(), threading.Event(), []
    real = StoreWriter._set_aside

    def pausing(self, target, name):
        old = real(self, target, name)
        if threading.current_thread().name == "committer":
            set_aside.set()
            resume.wait(60)
        return old

    def commit() -> None:
        try:
            writer.commit_features(staged, p, s, "r10", enc.attrs(), tiles_version(reader.slide_attrs(p, s)))
        except Exception as e:
            errors.append(e)

    monkeypatch.setattr(StoreWriter, "_set_aside", pausing)
    committer = threading.Thread(target=commit, name="committer")
    committer.start()
    assert set_aside.wait(60)
    other = extract_features(store, [enc], batch_size=BATCH, device="cpu", slides=rest, clean_staging=clean)
    resume.set()
    committer.join(60)
    assert sorted(other.extracted) == sorted(rest)
    if clean:  # the race: the committing writer's new version could not move in
        assert len(errors) == 1 and isinstance(errors[0], OSError)
    else:
        assert errors == [] and np.all(reader.features(p, s, "r10")[:] == 7.0)


def test_bf16_autocast_on_cpu_is_close_to_fp32_and_stored_as_asked(train_store, tmp_path):
    store = _copy(train_store, tmp_path)
    slides = _slides(store)[:2]
    enc = SPEC.build()
    extract_features(store, [enc], batch_size=BATCH, device="cpu", slides=slides, amp=False)
    bf16 = SPEC.build()
    bf16.name = "r10_bf16"
    extract_features(store, [bf16], batch_size=BATCH, device="cpu", slides=slides, amp=True, dtype="float16")
    reader = SlideStore(store)
    for p, s in slides:
        ref, low = reader.features(p, s, "r10"), reader.features(p, s, "r10_bf16")
        assert (ref.dtype, low.dtype) == (np.float32, np.float16)
        assert (ref.attrs["precision"], low.attrs["precision"]) == ("fp32", "bf16")
        a, b = ref[:], low[:].astype(np.float32)
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).max())
        assert not np.array_equal(a, b)  # really computed in lower precision

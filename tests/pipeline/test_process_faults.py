"""Process faults while tiling: a worker that stops responding, a full disk, a run killed mid-slide.

Every case runs the real ``hlss tile`` in a subprocess on real slide files, and checks what the user
sees (exit code, message) and that nothing else in the store changed."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import SlideStore
from store_snapshot import assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "hlss"]


def start_tiling(folder: Path, store: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "tile", str(folder), "--store", str(store), "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **popen)


def tile(folder: Path, store: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    proc = start_tiling(folder, store, *args, **popen)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def staged_worker(store: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Wait until a worker has staged a slide (its pid is in the staging folder's name); return that pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before any slide was staged"
        for child in (store / "_staging").glob("*-*-*"):
            if child.is_dir() and (child / "zarr.json").exists():
                return int(child.name.rsplit("-", 2)[1])
        time.sleep(0.01)
    raise AssertionError("no slide was staged")


def staging_leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "_staging").iterdir() if p.is_dir())


@pytest.mark.slow
def test_stuck_worker_is_killed_after_its_budget_and_the_rest_goes_on(make_slide, tmp_path):
    """A worker that stops responding mid-slide (SIGSTOP: as stuck as a read inside a C decoder) is
    killed after the budget plus its grace; that slide fails alone, the other slide is tiled."""
    folder, store = tmp_path / "slides", tmp_path / "s.zarr"
    make_slide("z.svs", folder=folder, seed=3, width=1024, height=1024)
    assert tile(folder, store).returncode == 0
    before = snapshot(store)
    make_slide("a.svs", folder=folder, seed=1)
    make_slide("b.svs", folder=folder, seed=2)
    proc = start_tiling(folder, store, "--slide-timeout", "3")
    pid = staged_worker(store, proc)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert time.monotonic() - t0 < 30  # killed at 3 s + 2 s of grace after its start, then b is tiled
    failed = [ln for ln in out.splitlines() if "FAILED" in ln]
    assert len(failed) == 1, out
    stuck = failed[0].split()[1]
    other = ({"a", "b"} - {stuck}).pop()
    assert (f"{folder / stuck}.svs: exceeded the time budget of 3 s while" in failed[0]
            and "it did not stop by itself" in failed[0] and "its worker process was killed" in failed[0]), out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert_unchanged(before, snapshot(store), allow=("patients/a/", "patients/b/"))
    s = SlideStore(store)
    assert s.slide_attrs(stuck, stuck)["status"] == "failed"
    assert s.slide_attrs(other, other)["status"] == "complete"
    assert staging_leftovers(store) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("how", ["file-size-limit", "full-tmpfs"])
def test_disk_full_fails_the_slide_keeps_the_previous_version_and_the_rerun_completes(make_slide, tmp_path, how,
                                                                                    request):
    folder = tmp_path / "slides"
    store = (request.getfixturevalue("small_tmpfs") if how == "full-tmpfs" else tmp_path) / "s.zarr"
    make_slide("a.svs", folder=folder, seed=1)
    assert tile(folder, store).returncode == 0
    old = SlideStore(store).slide_attrs("a", "a")
    before = snapshot(store)
    make_slide("a.svs", folder=folder, seed=5)  # changed: to be retiled over its previous version
    if how == "full-tmpfs":
        filler = _fill(store.parent, leave=48_000)
        proc = tile(folder, store)
    else:
        proc = tile(folder, store, preexec_fn=_limit_file_size(64_000))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "FAILED a" in ln)
    assert f"{folder / 'a.svs'}: writing failed:" in line
    assert "(EFBIG)" in line if how == "file-size-limit" else "(ENOSPC)" in line
    assert "the disk is full or a quota or file size limit was hit; nothing of this slide was committed" in line
    assert_unchanged(before, snapshot(store))
    assert SlideStore(store).slide_attrs("a", "a") == old
    if how == "full-tmpfs":
        filler.unlink()
    again = tile(folder, store)
    assert again.returncode == 0, again.stdout + again.stderr
    new = SlideStore(store).slide_attrs("a", "a")
    assert new["status"] == "complete" and new["source"] != old["source"]
    assert staging_leftovers(store) == []


def test_run_killed_mid_slide_keeps_the_store_readable_and_the_rerun_completes(make_slide, tmp_path):
    folder, store = tmp_path / "slides", tmp_path / "s.zarr"
    make_slide("a.svs", folder=folder, seed=1, width=3072, height=2048)
    make_slide("b.svs", folder=folder, seed=2, width=1024, height=1024)
    assert tile(folder, store).returncode == 0
    old = SlideStore(store).slide_attrs("a", "a")
    before = snapshot(store)
    make_slide("a.svs", folder=folder, seed=7, width=3072, height=2048)
    proc = start_tiling(folder, store, start_new_session=True)
    staged_worker(store, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-slide
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_unchanged(before, snapshot(store))  # staging aside, not one file changed
    info = subprocess.run([*CLI, "info", str(store)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert info.returncode == 0 and "2 slides (2 complete, 0 failed)" in info.stdout, info.stdout + info.stderr
    assert SlideStore(store).slide_attrs("a", "a") == old
    again = tile(folder, store)
    assert again.returncode == 0, again.stdout + again.stderr
    new = SlideStore(store).slide_attrs("a", "a")
    assert new["status"] == "complete" and new["source"] != old["source"]
    assert_unchanged(before, snapshot(store), allow=("patients/a/",))
    assert staging_leftovers(store) == []

import json
import os
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.store import STAGING, SlideStore, StoreError, StoreWriter


def write_slide(writer: StoreWriter, patient: str, slide: str, n: int, value: int = 7, label=None):
    staged = writer.stage()
    arr = staged.group.create_array("tiles", shape=(n, 8, 8, 3), dtype="uint8", chunks=(1, 8, 8, 3))
    arr[:] = value
    staged.group.create_array("coords", shape=(n, 2), dtype="int64")[:] = np.arange(2 * n).reshape(n, 2)
    staged.group.attrs.update(status="complete", n_tiles=n)
    writer.commit(staged, patient, slide, {"label": label, "split": None})


def test_new_store_has_schema_attrs_and_reads_back(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr")
    write_slide(writer, "P1", "S1", 5, label="tumour")
    write_slide(writer, "P1", "S2", 3)
    store = SlideStore(tmp_path / "s.zarr")
    assert store.info["schema_version"] == 2 and "created" in store.info and store.info["package_version"]
    assert store.patients() == ["P1"]
    assert store.slides("P1") == ["S1", "S2"]
    assert store.patient_attrs("P1")["label"] == "tumour"
    assert store.tiles("P1", "S1").shape == (5, 8, 8, 3)
    # the natural ways read it too
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert root["patients/P1/slides/S2/tiles"][0].max() == 7
    lazy = da.from_zarr(root["patients/P1/slides/S1/tiles"])
    assert int(lazy.sum().compute()) == 5 * 8 * 8 * 3 * 7
    assert store.summary()["n_tiles"] == 8


def test_store_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "store"
    f.write_text("not a store")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter(f)
    assert f.read_text() == "not a store"


def test_non_empty_foreign_folder_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an hlss store"):
        StoreWriter(tmp_path)


def test_read_only_location_is_a_clear_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root ignores permissions: simulate the OS saying no
        import pathlib

        def deny(self, *a, **k):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(pathlib.Path, "mkdir", deny)
    else:
        tmp_path.chmod(0o500)
    with pytest.raises(StoreError, match="cannot write the store here"):
        StoreWriter(tmp_path / "sub" / "s.zarr")


def test_replacing_a_slide_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr")
    write_slide(writer, "P", "S", 4, value=1)
    staged = writer.stage()
    staged.group.create_array("tiles", shape=(2, 8, 8, 3), dtype="uint8")[:] = 2
    # not committed yet: readers still see the old version, and nothing under _staging
    store = SlideStore(tmp_path / "s.zarr")
    assert store.tiles("P", "S").shape[0] == 4
    staged.group.attrs.update(status="complete", n_tiles=2)
    writer.commit(staged, "P", "S", {})
    store = SlideStore(tmp_path / "s.zarr")
    assert store.tiles("P", "S").shape[0] == 2 and store.tiles("P", "S")[0].max() == 2
    assert [p.name for p in (tmp_path / "s.zarr" / STAGING).iterdir()] == ["zarr.json"]


def test_commit_refuses_ids_that_escape(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr")
    staged = writer.stage()
    with pytest.raises(ValueError):
        writer.commit(staged, "../evil", "S", {})
    assert not (tmp_path / "evil").exists()


def test_staging_of_dead_writers_is_cleaned_but_live_ones_are_kept(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr")
    mine = writer.stage()
    dead = subprocess.run(
        [sys.executable, "-c", f"from pipeline.store import StoreWriter; print(StoreWriter({str(tmp_path / 's.zarr')!r}).stage().token)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    removed = writer.clean_staging()
    assert removed == [dead]
    assert mine.path.exists()


def test_owner_attrs_do_not_leak_into_committed_slides(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr")
    write_slide(writer, "P", "S", 1)
    meta = json.loads((tmp_path / "s.zarr/patients/P/slides/S/zarr.json").read_text())
    assert "owner" not in meta["attributes"]


def _commit_many(args):
    store, k, n = args
    writer = StoreWriter(store)
    errors = []
    for i in range(n):
        staged = writer.stage()
        staged.group.attrs.update(status="complete", n_tiles=0)
        try:
            writer.commit(staged, f"P{i}", f"S{k}_{i}", {"label": "x"})
        except Exception as e:  # collected: the test shows them all
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_processes_committing_slides_of_the_same_patients_at_once(tmp_path):
    import multiprocessing as mp

    store = str(tmp_path / "s.zarr")
    with mp.get_context("spawn").Pool(3) as pool:
        errors = pool.map(_commit_many, [(store, k, 25) for k in range(3)])
    assert errors == [[], [], []]
    s = SlideStore(store)
    assert len(s.patients()) == 25
    assert all(s.slides(f"P{i}") == [f"S{k}_{i}" for k in range(3)] for i in range(25))
    assert all(s.patient_attrs(f"P{i}")["label"] == "x" for i in range(25))


def _commit_same(args):
    store, k = args
    writer = StoreWriter(store)
    for i in range(15):
        staged = writer.stage()
        staged.group.create_array("tiles", shape=(1, 8, 8, 3), dtype="uint8")[:] = k
        staged.group.attrs.update(status="complete", n_tiles=1, writer=k)
        writer.commit(staged, "P", "S", {})


def test_processes_committing_the_same_slide_leave_one_whole_version(tmp_path):
    import multiprocessing as mp

    store = str(tmp_path / "s.zarr")
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_commit_same, [(store, 1), (store, 2)])
    s = SlideStore(store)
    k = s.slide_attrs("P", "S")["writer"]
    assert s.tiles("P", "S")[0].max() == k  # attrs and arrays of the same writer
    assert [p.name for p in (tmp_path / "s.zarr" / STAGING).iterdir()] == ["zarr.json"]


_KILLED_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, sys.argv[2])
import pipeline.store as st
from test_store import write_slide
writer = st.StoreWriter(sys.argv[1])
real = os.replace
def replace(src, dst):
    if "/_staging/" in str(src) and "/patients/" in str(dst) and "replaced-" not in str(src):
        os._exit(9)  # the writer dies after the old version went aside, before the new one moved in
    real(src, dst)
st.os.replace = replace
write_slide(writer, "P1", "S1", 2, value=9)
"""


def test_a_writer_killed_between_the_renames_of_a_commit_loses_nothing(tmp_path):
    from store_snapshot import assert_unchanged, snapshot

    store = tmp_path / "s.zarr"
    writer = StoreWriter(store)
    write_slide(writer, "P1", "S1", 3, value=7)
    before = snapshot(store)
    tests = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(store), tests], capture_output=True)
    assert proc.returncode == 9, proc.stderr
    assert not (store / "patients/P1/slides/S1").exists()  # the moment the old code lost the slide at
    StoreWriter(store).clean_staging()
    assert_unchanged(before, snapshot(store))  # the old version is back, byte for byte
    assert SlideStore(store).tiles("P1", "S1")[:].max() == 7
    assert [p.name for p in (store / STAGING).iterdir()] == ["zarr.json"]


def test_a_planted_aside_note_restores_nothing_outside_the_slides(tmp_path):
    from store_snapshot import assert_unchanged, snapshot

    store = tmp_path / "s.zarr"
    writer = StoreWriter(store)
    write_slide(writer, "P1", "S1", 3)
    planted = store / STAGING / "replaced-x-0"
    planted.mkdir()
    (planted / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    before = snapshot(store, skip=())
    for target in ("../../victim", "patients/P1/slides/S1", "patients/P1/../../x/slides/S", "evaluations/e"):
        (store / STAGING / "replaced-x-0.aside").write_text(json.dumps({"target": target}))
        assert not writer._restore_aside(planted)
    assert_unchanged(before, snapshot(store, skip=()), allow=(f"{STAGING}/replaced-x-0.aside",))
    assert not (tmp_path / "victim").exists() and not (tmp_path / "x").exists()
    writer.clean_staging()
    assert [p.name for p in (store / STAGING).iterdir()] == ["zarr.json"]

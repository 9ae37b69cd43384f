"""The cohort store on an object store: ``s3://`` through zarr's fsspec store, against a real
S3-compatible server (moto) on loopback. Credentials come from the environment only, as in production."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import traceback
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from pipeline.cohort import discover_cohort
from pipeline.config import TilingParams
from pipeline.location import ObjectLocation
from pipeline.runner import tile_cohort
from pipeline.store import STAGING, SlideStore, StoreError, StoreWriter
from pipeline.tiler import needs_tiling, tile_slide

SECRET = "hlss-test-SECRET-must-never-leak-7f3a9c"
KEY_ID = "HLSSTESTKEYID0000001"
PARAMS = TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=16)


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        # the usual environment, as a user would set it; spawned workers inherit it
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield f"http://{host}:{port}"
    server.stop()


def _new_bucket(endpoint: str) -> str:
    import s3fs

    name = f"hlss-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    return _new_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 small slides of 2 patients (about 30 tiles each; a real S3 server on loopback is slow per request)."""
    from pipeline.synthetic import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("objstore-cohort"), n_patients=2, slides_per_patient=(1, 2),
                            n_classes=2, width=1024, height=768, seed=2)


@pytest.fixture(scope="module")
def tiled(cohort, bucket, tmp_path_factory):
    """The cohort tiled into s3 (2 worker processes) and into a local folder, same parameters."""
    url = f"s3://{bucket}/cohort.zarr"
    report = tile_cohort(cohort, url, PARAMS, workers=2)
    assert report.exit_code == 0, report.table()
    local = tmp_path_factory.mktemp("objstore-local") / "cohort.zarr"
    writer = StoreWriter(local)
    assert all(tile_slide(spec, writer, PARAMS).status == "complete" for spec in discover_cohort(cohort).slides)
    return url, local, report


def _objects(url: str) -> dict[str, bytes]:
    loc = ObjectLocation(url)
    return {k[len(loc.root) + 1:]: loc.fs.cat_file(k) for k in loc.find("")}


# -- tiling, reading back, rerun ------------------------------------------------------------------


def test_cohort_tiled_to_s3_reads_back_equal_to_a_local_store(tiled):
    url, local, report = tiled
    assert report.store == url and len(report.by_status("complete")) == 3
    remote, here = SlideStore(url), SlideStore(local)
    assert remote.path == url and remote.is_remote
    assert remote.patients() == here.patients()
    for p in here.patients():
        assert remote.slides(p) == here.slides(p)
        assert remote.patient_attrs(p) == here.patient_attrs(p)
        for s in here.slides(p):
            a, b = remote.slide_attrs(p, s), here.slide_attrs(p, s)
            assert a["status"] == "complete" and a["n_tiles"] == b["n_tiles"] > 0
            assert a["params_hash"] == b["params_hash"] and a["source"] == b["source"]
            assert remote.tiles(p, s).shape == here.tiles(p, s).shape
            np.testing.assert_array_equal(remote.coords(p, s), here.coords(p, s))
            np.testing.assert_array_equal(remote.tissue(p, s), here.tissue(p, s))
    p = here.patients()[0]
    s = here.slides(p)[0]
    np.testing.assert_array_equal(remote.tiles(p, s)[:], here.tiles(p, s)[:])  # decoded through zarr
    # the stored shards are the very same bytes as the local files
    objects = _objects(url)
    shards = [k for k in objects if "/tiles/c/" in k]
    assert shards
    for k in shards:
        assert objects[k] == (local / k).read_bytes(), k
    # nothing left in staging, no "writing" marker anywhere
    assert [k for k in objects if k.startswith(STAGING + "/")] == [f"{STAGING}/zarr.json"]
    assert remote.summary()["n_complete"] == remote.summary()["n_slides"]


def test_rerun_into_s3_skips_every_slide(tiled, cohort):
    url, _, first = tiled
    again = tile_cohort(cohort, url, PARAMS, workers=2)
    assert again.exit_code == 0
    assert len(again.by_status("skipped")) == len(first.by_status("complete")) and not again.by_status("complete")


def test_store_location_survives_pickling_and_feeds_the_training_dataset(tiled):
    from hlss_model.augment import AugmentParams
    from hlss_model.data import CohortIndex, PatientDataset

    url, _, _ = tiled
    index = CohortIndex.from_store(url)
    assert index.store_path == url
    index = pickle.loads(pickle.dumps(index))
    dataset = PatientDataset(index, slides=2, tiles=3, views=1, augment=AugmentParams(out_size=32))
    dataset = pickle.loads(pickle.dumps(dataset))  # as a spawned DataLoader worker receives it
    item = dataset[(0, 123)]
    assert item["images"].shape[:3] == (2, 3, 1) and item["images"].shape[-1] == 32
    assert np.isfinite(item["images"].numpy()).all()


# -- killed and interrupted writers ---------------------------------------------------------------

_KILL_MID_COMMIT = textwrap.dedent("""
    import os, sys
    from pipeline.cohort import discover_cohort
    from pipeline.config import TilingParams
    from pipeline.location import ObjectLocation
    from pipeline.store import StoreWriter
    from pipeline.tiler import tile_slide

    real = ObjectLocation.copy

    def copy_half_then_die(self, src, dst):
        real(self, src[: len(src) // 2], dst[: len(dst) // 2])
        os._exit(9)  # killed: no finally, no clean-up

    ObjectLocation.copy = copy_half_then_die
    spec = discover_cohort(sys.argv[1]).slides[0]
    tile_slide(spec, StoreWriter(sys.argv[2]), TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=16))
    sys.exit("not killed")
""")


def test_writer_killed_mid_commit_is_never_complete_and_the_next_run_retiles(tiled, cohort):
    # on the shared store, which this test leaves as it found it (all complete, staging empty)
    url, manifest, writer = tiled[0], cohort, StoreWriter(tiled[0])
    victim, *others = discover_cohort(manifest).slides
    # a worker process retiling the first slide dies half-way through copying it into place
    done = subprocess.run([sys.executable, "-c", _KILL_MID_COMMIT, str(manifest), url], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 9, done.stderr

    store = SlideStore(url)  # still readable
    assert victim.slide_id not in store.slides(victim.patient_id)
    assert victim.slide_id in store.slides(victim.patient_id, status=None)
    assert store.slide_attrs(victim.patient_id, victim.slide_id)["status"] == "writing"
    assert sorted(r.slide_id for r in store.records(status="complete")) == sorted(o.slide_id for o in others)
    for other in others:
        assert store.tiles(other.patient_id, other.slide_id)[:4].any()
        assert not needs_tiling(writer, other, PARAMS)
    assert needs_tiling(writer, victim, PARAMS)
    assert len(ObjectLocation(url).children(STAGING)) == 2  # zarr.json + the dead writer's staging

    report = tile_cohort(manifest, url, PARAMS, workers=1)  # the next run (one spawned worker)
    assert [r.slide_id for r in report.by_status("complete")] == [victim.slide_id]
    assert len(report.by_status("skipped")) == len(others) and report.exit_code == 0
    store = SlideStore(url)
    assert store.slides(victim.patient_id) == [victim.slide_id]
    n = store.slide_attrs(victim.patient_id, victim.slide_id)["n_tiles"]
    assert store.tiles(victim.patient_id, victim.slide_id).shape[0] == n == len(store.coords(victim.patient_id, victim.slide_id))
    assert ObjectLocation(url).children(STAGING) == ["zarr.json"]  # the dead writer's staging is gone


def test_interrupted_retiling_keeps_the_previous_version(s3_endpoint, cohort, monkeypatch):
    from pipeline import tiler

    url = f"s3://{_new_bucket(s3_endpoint)}/store"
    spec = discover_cohort(cohort).slides[0]
    writer = StoreWriter(url)
    assert tile_slide(spec, writer, PARAMS).status == "complete"
    before = SlideStore(url).slide_attrs(spec.patient_id, spec.slide_id)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiler, "_pump_tiles", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(spec, writer, PARAMS)
    store = SlideStore(url)
    assert store.slides(spec.patient_id) == [spec.slide_id]
    assert store.slide_attrs(spec.patient_id, spec.slide_id) == before
    assert store.tiles(spec.patient_id, spec.slide_id).shape[0] == before["n_tiles"]


# -- features -------------------------------------------------------------------------------------


def test_features_extracted_into_s3_equal_local_ones_and_a_killed_commit_is_redone(tiled, monkeypatch):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    url, here, _ = tiled  # this test adds features to both stores; the others do not look at features
    enc = timm_encoder("test_resnet", name="f")
    slides = [(r.patient_id, r.slide_id) for r in SlideStore(url).records(status="complete")]
    first = slides[0]

    # the first commit dies after the array's "incomplete" marker and half its chunks are in place
    real = ObjectLocation.copy

    def copy_half_then_die(self, src_keys, dst_keys):
        if any("/features/" in k for k in dst_keys):
            real(self, src_keys[: len(src_keys) // 2], dst_keys[: len(dst_keys) // 2])
            raise KeyboardInterrupt
        real(self, src_keys, dst_keys)

    monkeypatch.setattr(ObjectLocation, "copy", copy_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_features(url, [enc], batch_size=32, device="cpu")
    store = SlideStore(url)
    assert store.feature_names(*first) == []
    meta = store.group(*first)["features"]["f"].attrs
    assert meta["complete"] is False
    with pytest.raises(KeyError, match="incomplete"):
        store.features(*first, "f")
    monkeypatch.undo()

    report = extract_features(url, [enc], batch_size=32, device="cpu")
    assert report.exit_code == 0 and report.extracted == slides
    assert extract_features(here, [enc], batch_size=32, device="cpu").extracted == slides
    remote, local_store = SlideStore(url), SlideStore(here)
    for p, s in slides:
        assert remote.feature_names(p, s) == ["f"]
        arr = remote.features(p, s, "f")
        assert arr.attrs["complete"] is True and "writer" not in arr.attrs
        assert arr.attrs["pooled"]["rows"] == arr.shape[0]  # slide vectors committed with the array
        assert arr.chunks[0] == min(32, arr.shape[0])  # one chunk per batch: no read-modify-write of objects
        np.testing.assert_allclose(arr[:], local_store.features(p, s, "f")[:], rtol=1e-5, atol=1e-6)
    assert ObjectLocation(url).children(STAGING) == ["zarr.json"]
    again = extract_features(url, [enc], batch_size=32, device="cpu")
    assert again.skipped == slides and not again.extracted


# -- errors: clear, naming the URL, never a secret ---------------------------------------------------


def _no_secret(e: BaseException) -> None:
    text = "".join(traceback.format_exception(e))
    assert SECRET not in text and SECRET not in repr(e)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_a_clear_error_without_secrets(s3_endpoint, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore retries a refused connection otherwise
    url = "s3://some-bucket/cohort.zarr"
    for open_store in (StoreWriter, SlideStore):
        with pytest.raises(StoreError, match="cannot reach the object store") as info:
            open_store(url)
        assert url in str(info.value) and "127.0.0.1" in str(info.value)
        _no_secret(info.value)
    assert SECRET not in caplog.text


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    for open_store in (StoreWriter, SlideStore):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-hlss' does not exist") as info:
            open_store("s3://no-such-bucket-hlss/cohort.zarr")
        assert "s3://no-such-bucket-hlss/cohort.zarr" in str(info.value)
        _no_secret(info.value)


def test_denied_access_and_credentials_in_the_url_are_clear_errors(s3_endpoint, monkeypatch):
    import moto.settings

    url = f"s3://{_new_bucket(s3_endpoint)}/cohort.zarr"
    # from now on the server checks signatures against its (empty) IAM: our key is unknown there
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    for open_store in (StoreWriter, SlideStore):
        with pytest.raises(StoreError, match="access denied") as info:
            open_store(url)
        assert url in str(info.value)
        _no_secret(info.value)
    monkeypatch.undo()

    with pytest.raises(StoreError, match="credentials in the store URL") as info:
        SlideStore(f"s3://{KEY_ID}:{SECRET}@bucket/cohort.zarr")
    _no_secret(info.value)


def test_no_secret_in_stored_attributes_reprs_or_reports(tiled):
    url, _, report = tiled
    for key, raw in _objects(url).items():
        if key.endswith("zarr.json"):
            assert SECRET.encode() not in raw and KEY_ID.encode() not in raw, key
    for thing in (SlideStore(url), StoreWriter(url), ObjectLocation(url), report.table()):
        assert SECRET not in repr(thing) and KEY_ID not in repr(thing)


def test_a_prefix_holding_something_else_is_refused(s3_endpoint):
    url = f"s3://{_new_bucket(s3_endpoint)}/data"
    ObjectLocation(url).write_json("notes.json", {"mine": True})
    with pytest.raises(StoreError, match="not an hlss store"):
        StoreWriter(url)
    with pytest.raises(StoreError, match="no such store"):
        SlideStore(url + "-absent")


def test_file_urls_are_local_folders(tmp_path):
    writer = StoreWriter(f"file://{tmp_path}/s.zarr")
    assert not writer.is_remote and writer.path == tmp_path / "s.zarr"
    assert (tmp_path / "s.zarr" / "zarr.json").exists()
    assert SlideStore(f"file://{tmp_path}/s.zarr").patients() == []
    assert json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["hlss"]["schema_version"] == 2
    assert os.fspath(writer.path)


def test_evaluations_are_recorded_on_s3(tiled):
    url = tiled[0]
    StoreWriter(url).write_evaluation("knn-test", {"accuracy": 0.5, "k": 20})
    assert SlideStore(url).evaluations()["knn-test"] == {"accuracy": 0.5, "k": 20}


def test_reprocess_flow_on_an_object_store(cohort, s3_endpoint):
    """The nightly flow against s3://: tiles and features land in the bucket; a rerun does nothing."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.reprocess import reprocess

    url = f"s3://{_new_bucket(s3_endpoint)}/flow.zarr"
    params = dict(source=str(cohort), store=url, tiling={"target_mpp": 1.0, "tile_size": 64}, workers=2,
                  extraction={"encoders": ["timm:resnet10t"], "random_init": True, "batch_size": 64, "device": "cpu"})
    with prefect_test_harness(server_startup_timeout=180):
        first = reprocess(**params)
        again = reprocess(**params)
    assert first["slides"]["complete"] == 3 and len(first["extraction"]["extracted"]) == 3
    assert "artifacts_error" not in first and first["report"] is None  # slide table and QC artifacts from s3://
    assert again["slides"]["complete"] == 0 and again["extraction"]["extracted"] == []
    reader = SlideStore(url)
    for rec in reader.records(status="complete"):
        assert reader.features(rec.patient_id, rec.slide_id, "resnet10t").shape == (rec.n_tiles, 512)


def test_verify_reads_every_chunk_on_s3_and_names_a_damaged_one(tiled):
    from pipeline.verify import verify_store

    url, _, _ = tiled
    assert verify_store(url).exit_code == 0
    loc = ObjectLocation(url)
    key = next(k for k in sorted(loc.find("")) if "/coords/c/" in k)
    data = loc.fs.cat_file(key)
    loc.fs.pipe_file(key, data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
    try:
        report = verify_store(url)
    finally:
        loc.fs.pipe_file(key, data)
    assert report.exit_code == 1 and len(report.damaged) == 1
    [damage] = report.damaged[0].damage
    assert damage.array == "coords" and damage.path == f"{url}/{key[len(loc.root) + 1:]}"
    assert "checksum mismatch (crc32c)" in damage.problem and SECRET not in str(damage)

"""``extract-features`` with ``extraction.devices``: one worker process per device under the flow."""

from __future__ import annotations

import shutil

import pytest

from pipeline.store import SlideStore


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_extract_features_flow_on_two_cpu_workers(harness, tmp_path, train_store):
    from flows.extract import extract_features_flow

    store = shutil.copytree(train_store, tmp_path / "store.zarr")
    extraction = {"encoders": ["timm:resnet10t"], "random_init": True, "batch_size": 32, "devices": ["cpu", "cpu"]}
    out = extract_features_flow(store=str(store), extraction=extraction)
    reader = SlideStore(store)
    records = list(reader.records(status="complete"))
    assert sorted(out["extraction"]["extracted"]) == sorted(f"{r.patient_id}/{r.slide_id}" for r in records)
    assert out["extraction"]["failed"] == [] and out["extraction"]["tiles"] == sum(r.n_tiles for r in records)
    for r in records:
        assert reader.features(r.patient_id, r.slide_id, "resnet10t").shape == (r.n_tiles, 512)


def test_devices_on_a_dask_cluster_is_refused_before_any_write(harness, tmp_path, train_store):
    from distributed import LocalCluster

    from flows.extract import extract_features_flow
    from flows.settings import FlowConfigError
    from store_snapshot import assert_unchanged, snapshot

    before = snapshot(train_store)
    extraction = {"encoders": ["timm:resnet10t"], "random_init": True, "devices": ["cpu", "cpu"]}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with pytest.raises(FlowConfigError, match="extraction.devices starts workers on this machine; on a Dask "
                                                  "cluster start one dask worker per GPU"):
            extract_features_flow(store=str(train_store), extraction=extraction,
                                  scheduler_address=cluster.scheduler_address)
    assert_unchanged(before, snapshot(train_store))


def test_device_and_devices_together_are_refused():
    from hlss_model.settings import ExtractionSettings

    with pytest.raises(ValueError, match=r"give device \(cuda:0\) or devices \(cuda:0, cuda:1\), not both"):
        ExtractionSettings(device="cuda:0", devices=["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="device 'gpu' is not one of"):
        ExtractionSettings(devices=["gpu"])
    assert ExtractionSettings(devices=["all"]).devices == ["all"]

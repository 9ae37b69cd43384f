"""The Prefect flows on a tiny synthetic cohort, against Prefect's test server (``prefect_test_harness``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.executor import SlideExecutor
from flows.settings import FlowConfigError, check_paths, load_defaults
from pipeline.cohort import SlideSpec
from pipeline.config import TilingParams
from pipeline.store import SlideStore, StoreWriter
from pipeline.synthetic import make_demo_cohort
from pipeline.tiler import change_reason

TILING = {"target_mpp": 1.0, "tile_size": 64}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory, tiny_text_model) -> Path:
    cfg = {
        "method": "hlss", "steps": 2, "seed": 0, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
        "channels_last": False,
        "sampler": {"batch_size": 2, "slides_per_patient": 1, "tiles_per_slide": 2, "views_per_tile": 2,
                    "num_workers": 0},
        "model": {"backbone": "resnet10t", "text_encoder": str(tiny_text_model)},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "augment": {"out_size": 32},
    }
    path = tmp_path_factory.mktemp("train-config") / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cohort(root: Path, n_patients: int = 6, seed: int = 5) -> Path:
    """A labelled cohort, one slide per patient, two classes: its manifest (slides in ``root/slides``)."""
    return make_demo_cohort(root, n_patients=n_patients, slides_per_patient=(1, 1), n_classes=2,
                            width=1024, height=768, seed=seed)


def _mtimes(store: Path) -> dict[str, float]:
    """mtime of every slide's and feature array's metadata: any rewrite changes one."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.glob("patients/*/slides/*/**/zarr.json")}


def test_tile_and_train_then_rerun_does_no_work(harness, tmp_path, train_yaml):
    from prefect.client.orchestration import get_client

    from flows.tile_and_train import tile_and_train

    manifest = _cohort(tmp_path)
    params = dict(source=str(manifest), store=str(tmp_path / "store"), run_dir=str(tmp_path / "run"),
                  tiling=TILING, training={"config": str(train_yaml)}, extraction={"batch_size": 16},
                  evaluation={"k": 5}, workers=2)
    first = tile_and_train(**params)
    assert first["slides"]["complete"] == 6 and first["slides"]["failed"] == 0
    assert {r["reason"] for r in first["slide_rows"]} == {"new"}
    assert first["training"]["status"] == "trained" and first["training"]["steps"] == 2
    assert len(first["extraction"]["extracted"]) == 6
    store = SlideStore(tmp_path / "store")
    for rec in store.records(status="complete"):
        assert store.features(rec.patient_id, rec.slide_id, "hlss").shape[0] == rec.n_tiles > 0
    knn = store.evaluations()["knn-hlss"]
    assert set(knn["levels"]) == {"tile", "slide", "patient"} and knn["feature"] == "hlss"
    assert first["knn"]["levels"]["patient"]["n"] == knn["levels"]["patient"]["n"] > 0
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    by_key = {a.key: a for a in artifact}
    md = by_key["tile-and-train-summary"].data
    assert "6 tiled, 0 unchanged, 0 failed" in md and "| patient |" in md and "kNN" in md
    assert "report.html" in md and first["report"] == str(tmp_path / "run" / "report.html")
    assert "artifacts_error" not in first
    # the report's slide table, this run's QC pictures and a link to the report, as artifacts
    table = json.loads(by_key["tile-and-train-slides"].data)
    assert sorted((r["patient"], r["slide"], r["n_tiles"]) for r in table) == sorted(
        (rec.patient_id, rec.slide_id, rec.n_tiles) for rec in store.records())
    assert all(0 < r["tissue_fraction"] <= 1 and r["status"] == "complete" for r in table)
    qc = by_key["tile-and-train-qc"].data
    assert qc.count("](data:image/jpeg;base64,") == 6
    assert (tmp_path / "run" / "report.html").as_uri() in by_key["tile-and-train-report"].data
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("<tr data-patient=") == 6 and "polyline" in html and "kNN evaluation" in html
    assert len(list((tmp_path / "run" / "report_files" / "slides").rglob("*.png"))) == 6

    before = _mtimes(tmp_path / "store")
    second = tile_and_train(**params)
    assert second["slides"] == {"complete": 0, "skipped": 6, "failed": 0, "tiled_tiles": 0}
    assert second["training"]["status"] == "reused"
    assert second["extraction"]["extracted"] == [] and second["extraction"]["skipped"] == 6
    assert _mtimes(tmp_path / "store") == before  # nothing in any slide was rewritten

    shutil.rmtree(tmp_path / "store")  # caches follow content: a deleted store is rebuilt
    third = tile_and_train(**params)
    assert third["slides"]["complete"] == 6 and len(third["extraction"]["extracted"]) == 6


def test_unfinished_run_resumes_only_when_asked(harness, tmp_path, train_yaml):
    from flows.tile_and_train import tile_and_train

    manifest = _cohort(tmp_path, n_patients=4, seed=8)
    params = dict(source=str(manifest), store=str(tmp_path / "store"), run_dir=str(tmp_path / "run"),
                  tiling=TILING, training={"config": str(train_yaml)}, evaluation={"k": 5})
    tile_and_train(**params)
    (tmp_path / "run" / "model.safetensors").unlink()  # as if killed before the end
    state = tile_and_train(**params, return_state=True)
    assert state.is_failed()
    assert "unfinished run" in str(state.result(raise_on_failure=False))
    resumed = tile_and_train(**{**params, "training": {"config": str(train_yaml), "resume": True}})
    assert resumed["training"]["status"] == "resumed"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_failed_training_start_is_restarted_by_the_corrected_rerun(harness, tmp_path, train_yaml):
    from prefect.client.orchestration import get_client

    from flows.tile_and_train import tile_and_train

    manifest = _cohort(tmp_path, n_patients=4, seed=8)
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(train_yaml.read_text())
    bad.write_text(yaml.safe_dump({**cfg, "sampler": {**cfg["sampler"], "batch_size": 50}}))
    params = dict(source=str(manifest), store=str(tmp_path / "store"), run_dir=str(tmp_path / "run"),
                  tiling=TILING, training={"config": str(bad)}, evaluation={"k": 5})
    # the flow refuses it before tiling (test_settings_that_cannot_train_fail_before_tiling); a start
    # made outside the flow, e.g. `hlss train`, fails once its store is there
    tile_and_train(**{**params, "training": {"config": str(train_yaml), "steps": 1}, "run_dir": str(tmp_path / "r0")})
    from hlss_model.config import TrainConfig
    from hlss_model.train import train

    with pytest.raises(ValueError, match="batch of 50 patients"):
        train(params["store"], tmp_path / "run", TrainConfig.from_yaml(bad))
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "run" / "checkpoints").exists()
    fixed = tile_and_train(**{**params, "training": {"config": str(train_yaml)}})
    assert fixed["training"]["status"] == "restarted" and fixed["training"]["steps"] == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with get_client(sync_client=True) as client:
        md = {a.key: a for a in client.read_latest_artifacts()}["tile-and-train-summary"].data
    assert "restarted, 2 steps" in md


def test_settings_that_cannot_train_fail_before_tiling(harness, tmp_path, train_yaml):
    from flows.tile_and_train import tile_and_train

    manifest = _cohort(tmp_path, n_patients=4, seed=8)  # 2 classes of 2 patients, 1 of each held out: 2 train
    store = tmp_path / "cohort.zarr"
    params = dict(source=str(manifest), store=str(store), tiling=TILING, evaluation={"k": 5},
                  training={"config": str(train_yaml), "overrides": {"sampler": {"batch_size": 3}}})
    state = tile_and_train(**params, return_state=True)
    message = str(state.result(raise_on_failure=False))
    assert state.is_failed()
    assert ("sampler.batch_size is 3 patients but the cohort has 2 training patients (4 patients, 2 held out "
            "for evaluation); set training.overrides.sampler.batch_size to 2 or less") in message
    assert not store.exists() and not (tmp_path / "cohort-run").exists()  # nothing was tiled or started
    for bad, says in (({"sampler": {"batch_sise": 2}}, "unknown config key sampler.batch_sise"),
                      ({"sampler": {"batch_size": 0}}, "sampler.batch_size must be >= 1")):
        state = tile_and_train(**{**params, "training": {"overrides": bad}}, return_state=True)
        assert state.is_failed() and says in str(state.result(raise_on_failure=False))
    state = tile_and_train(**{**params, "extraction": {"device": "cuda:7"}}, return_state=True)
    assert state.is_failed() and "extraction.device" in str(state.result(raise_on_failure=False))
    # the same settings with the batch the cohort allows: trains, in the documented default run_dir
    ok = tile_and_train(**{**params, "training": {"config": str(train_yaml), "overrides": {"sampler": {"batch_size": 2}}}})
    assert ok["training"]["status"] == "trained" and ok["training"]["run_dir"] == str(tmp_path / "cohort-run")
    assert (tmp_path / "cohort-run" / "model.safetensors").is_file()
    from hlss_model.config import TrainConfig
    from pipeline.run_folder import RunFolder

    assert TrainConfig.from_yaml(RunFolder(tmp_path / "cohort-run").config).sampler.batch_size == 2


def test_a_run_that_fails_after_tiling_still_shows_what_it_tiled(harness, tmp_path, train_yaml):
    from prefect.client.orchestration import get_client

    from flows.tile_and_train import tile_and_train

    manifest = _cohort(tmp_path, n_patients=4, seed=8)
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(train_yaml.read_text())
    bad.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "backbone": "no_such_network"}}))
    state = tile_and_train(source=str(manifest), store=str(tmp_path / "store"), run_dir=str(tmp_path / "run"),
                           tiling=TILING, training={"config": str(bad)}, evaluation={"k": 5}, return_state=True)
    assert state.is_failed() and "no_such_network" in str(state.result(raise_on_failure=False))
    assert len(list(SlideStore(tmp_path / "store").records(status="complete"))) == 4  # tiling was kept
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_latest_artifacts()}
    summary = arts["tile-and-train-summary"].data
    assert summary.startswith("# tile-and-train FAILED at training\n\n**Error:** ValueError\\: unknown timm model")
    assert "no\\_such\\_network" in summary and "## tile-and-train: 4 tiled, 0 unchanged, 0 failed" in summary
    qc = arts["tile-and-train-qc"].data
    assert qc.count("data:image/jpeg;base64,") == 4 and "No slide was tiled" not in qc
    table = json.loads(arts["tile-and-train-slides"].data)
    assert len(table) == 4 and {r["status"] for r in table} == {"complete"}


def test_bad_slide_is_reported_and_others_finish(harness, tmp_path, train_yaml):
    from flows.reprocess import reprocess

    manifest = _cohort(tmp_path, n_patients=3, seed=9)
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with open(manifest, "a") as f:
        f.write(f"{bad},PATIENT-BAD,PATIENT-BAD-S1,glandular,train\n")
    out = reprocess(source=str(manifest), store=str(tmp_path / "store"), tiling=TILING)
    assert out["slides"]["complete"] == 3 and out["slides"]["failed"] == 1
    failed = next(r for r in out["slide_rows"] if r["status"] == "failed")
    assert failed["slide"] == "PATIENT-BAD-S1" and "broken.svs" in failed["error"]
    attrs = StoreWriter(tmp_path / "store").slide_attrs("PATIENT-BAD", "PATIENT-BAD-S1")
    assert attrs["status"] == "failed" and "broken.svs" in attrs["error"]


def test_reprocess_picks_up_only_the_new_slide(harness, tmp_path, train_yaml):
    from flows.reprocess import reprocess
    from flows.tile_and_train import tile_and_train

    _cohort(tmp_path, n_patients=5, seed=11)
    folder = tmp_path / "slides"  # scanned as a folder: ids from the TCGA-style file names
    late = sorted(folder.glob("*.svs"))[-1]
    late.rename(tmp_path / late.name)  # not there yet on the first run
    store, run = str(tmp_path / "store"), str(tmp_path / "run")
    tile_and_train(source=str(folder), store=store, run_dir=run, tiling=TILING,
                   training={"config": str(train_yaml)}, evaluation={"k": 5})
    before = _mtimes(tmp_path / "store")
    (tmp_path / late.name).rename(late)

    out = reprocess(source=str(folder), store=store, run_dir=run, tiling=TILING)
    tiled = [r for r in out["slide_rows"] if r["status"] == "complete"]
    slide_id = late.name.split(".")[0]
    assert [(r["slide"], r["reason"]) for r in tiled] == [(slide_id, "new")]
    assert out["slides"]["skipped"] == 4
    assert out["extraction"]["extracted"] == [f"{tiled[0]['patient']}/{slide_id}"]
    after = _mtimes(tmp_path / "store")
    assert {k: v for k, v in after.items() if k in before} == before  # the old slides were not touched

    again = reprocess(source=str(folder), store=store, run_dir=run, tiling=TILING)
    assert again["slides"]["complete"] == 0 and again["extraction"]["extracted"] == []


def test_change_reasons(tmp_path, make_slide):
    path = make_slide("TCGA-AA-0001-01Z-00-DX1.svs", width=1024, height=768)
    spec = SlideSpec(path=path, patient_id="TCGA-AA-0001", slide_id="TCGA-AA-0001-01Z-00-DX1")
    params = TilingParams(**TILING)
    writer = StoreWriter(tmp_path / "store")
    assert change_reason(writer, spec, params) == "new"
    from pipeline.runner import tile_one

    assert tile_one(spec, str(writer.path), params).status == "complete"
    assert change_reason(writer, spec, params) is None
    os.utime(path, (time.time() + 60, time.time() + 60))  # touched, same content
    assert change_reason(writer, spec, params) is None
    assert change_reason(writer, spec, TilingParams(target_mpp=1.0, tile_size=128)) == "tiling parameters changed"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert change_reason(writer, spec, params) == "source content changed (fingerprint)"
    with open(path, "ab") as f:
        f.write(b"\x00" * 10)
    assert change_reason(writer, spec, params).startswith("source size changed")


def test_killed_worker_is_retried_and_the_slide_finishes(harness, tmp_path):
    """SIGKILL the worker process while it writes a slide: the task's retry tiles it again."""
    from flows.reprocess import reprocess

    make_demo_cohort(tmp_path, n_patients=1, slides_per_patient=(1, 1), n_classes=1, width=4096, height=3072,
                     seed=3)
    store = tmp_path / "store"
    killed: list[int] = []

    def kill_first_writer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for child in (store / "_staging").glob(f"{socket.gethostname()}-*"):
                pid = int(child.name.split("-")[-2])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_first_writer, daemon=True)
    watcher.start()
    out = reprocess(source=str(tmp_path / "slides"), store=str(store), tiling={"tile_size": 128})
    watcher.join()
    assert killed, "the watcher never saw a worker writing"
    assert out["slides"]["complete"] == 1 and out["slides"]["failed"] == 0
    reader = SlideStore(store)
    (rec,) = list(reader.records())
    assert rec.status == "complete" and reader.tiles(rec.patient_id, rec.slide_id).shape[0] == rec.n_tiles > 0
    StoreWriter(store).clean_staging()
    assert not [p for p in (store / "_staging").iterdir() if p.is_dir()]  # the dead writer's half slide is gone


def test_a_flow_retries_only_a_dead_worker_as_hlss_tile_does():
    """One retry policy: the tile-slide task retries a slide whose worker died, as often as the
    runner does, and nothing else (a slide's own failure is in its result, not raised)."""
    from prefect.states import Failed

    from flows.executor import WorkerLost
    from flows.steps import _worker_died, tile_slide_task
    from pipeline.runner import WORKER_RETRIES

    assert tile_slide_task.retries == WORKER_RETRIES
    assert _worker_died(tile_slide_task, None, Failed(data=WorkerLost("a worker process died")))
    assert not _worker_died(tile_slide_task, None, Failed(data=ValueError("cannot pickle")))


def test_task_and_flow_names_say_one_thing_each():
    """No task shares its name with a flow (``extract-features`` is the flow; its task is
    ``extract-slide-features``) and no two tasks share one."""
    import importlib
    import pkgutil

    import flows
    from prefect import Flow, Task

    tasks, flow_names = [], set()
    for info in pkgutil.iter_modules(flows.__path__):
        for obj in vars(importlib.import_module(f"flows.{info.name}")).values():
            if isinstance(obj, Task):
                tasks.append(obj)
            elif isinstance(obj, Flow):
                flow_names.add(obj.name)
    names = [t.name for t in {id(t): t for t in tasks}.values()]
    assert "extract-features" in flow_names and "extract-slide-features" in names
    assert not set(names) & flow_names and len(names) == len(set(names)), (sorted(names), sorted(flow_names))


def test_extract_features_flow_with_timm_encoder_and_dask(harness, tmp_path, train_store):
    from distributed import LocalCluster

    from flows.extract import extract_features_flow

    store = tmp_path / "store.zarr"
    shutil.copytree(train_store, store)
    reader = SlideStore(store)
    tissue = np.concatenate([reader.tissue(r.patient_id, r.slide_id) for r in reader.records(status="complete")])
    threshold = float(np.median(tissue))  # a QC filter that keeps about half the tiles, passed to the workers
    extraction = {"encoders": ["timm:resnet10t"], "random_init": True, "batch_size": 32, "device": "cpu",
                  "tile_filter": {"min_tissue": threshold}}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        out = extract_features_flow(store=str(store), extraction=extraction, workers=2,
                                    scheduler_address=cluster.scheduler_address)
    n_slides = sum(1 for _ in reader.records(status="complete"))
    assert len(out["extraction"]["extracted"]) == n_slides and out["extraction"]["failed"] == []
    kept = 0
    for rec in reader.records(status="complete"):
        feats = reader.features(rec.patient_id, rec.slide_id, "resnet10t")
        assert feats.shape == (rec.n_tiles, 512) and feats.attrs["tile_filter"] == {"min_tissue": threshold}
        keep = reader.tissue(rec.patient_id, rec.slide_id) >= threshold
        assert np.array_equal(~np.isnan(feats[:]).any(axis=1), keep)
        kept += int(keep.sum())
    assert 0 < kept < len(tissue)
    again = extract_features_flow(store=str(store), extraction=extraction)
    assert again["extraction"]["extracted"] == [] and again["extraction"]["skipped"] == n_slides


def test_tiling_on_a_dask_cluster(harness, tmp_path):
    from distributed import LocalCluster

    from flows.reprocess import reprocess

    manifest = _cohort(tmp_path, n_patients=3, seed=13)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        out = reprocess(source=str(manifest), store=str(tmp_path / "store"), tiling=TILING, workers=2,
                        scheduler_address=cluster.scheduler_address)
    assert out["slides"]["complete"] == 3
    assert sum(1 for _ in SlideStore(tmp_path / "store").records(status="complete")) == 3


def test_device_slot_serialises_work_on_one_device(harness):
    from flows.limits import device_slot

    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with device_slot("cuda:7"):
            start = time.monotonic()
            time.sleep(0.6)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1 - 0.05, f"two holders overlapped: {spans}"


# -- settings and fail-fast checks ----------------------------------------------------------------


def test_defaults_from_file_then_environment(tmp_path):
    cfg = tmp_path / "flows.yaml"
    cfg.write_text("source: /data/slides\nstore: /data/a.zarr\nworkers: 3\ntiling: {tile_size: 224}\n")
    d = load_defaults(cfg, env={"HLSS_STORE": "s3://bucket/b.zarr", "HLSS_REPROCESS_CRON": "30 1 * * *"})
    assert (d.source, d.store, d.workers, d.tiling.tile_size, d.reprocess_cron) == \
        ("/data/slides", "s3://bucket/b.zarr", 3, 224, "30 1 * * *")
    params = d.flow_parameters("tile-and-train")
    assert params["tiling"]["tile_size"] == 224 and "run_dir" not in params
    assert load_defaults(env={"HLSS_FLOW_CONFIG": str(cfg)}).workers == 3


@pytest.mark.parametrize("text, message", [
    ("workers: 0\n", "workers"),
    ("tiling: {tile_sise: 224}\n", "tiling.tile_sise"),
    ("extraction: {encoders: [resnet50]}\n", "timm:NAME"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_settings_name_the_setting(tmp_path, text, message):
    cfg = tmp_path / "flows.yaml"
    cfg.write_text(text)
    with pytest.raises(FlowConfigError, match=message):
        load_defaults(cfg, env={})


def test_bad_tiling_value_is_caught_before_work(harness, tmp_path):
    from flows.reprocess import reprocess

    manifest = _cohort(tmp_path, n_patients=1, seed=2)
    state = reprocess(source=str(manifest), store=str(tmp_path / "store"), tiling={"tile_size": 8},
                      return_state=True)
    assert state.is_failed() and "tile_size 8" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "store").exists()


def test_worker_counts_are_validated_as_parameters(harness, tmp_path):
    from flows.reprocess import reprocess
    from flows.tile_and_train import tile_and_train

    assert tile_and_train.parameters.properties["workers"]["minimum"] == 1
    state = reprocess(source=str(tmp_path), store=str(tmp_path / "store"), workers=0, return_state=True)
    assert state.is_failed() and "workers" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "store").exists()


def test_paths_are_checked_with_clear_messages(tmp_path):
    with pytest.raises(FlowConfigError, match="no such folder"):
        check_paths(source=str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlowConfigError, match="is a file"):
        check_paths(store=str(tmp_path / "file" / "store.zarr"))
    with pytest.raises(FlowConfigError, match="read-only path or no permission"):
        check_paths(store="/proc/hlss-store.zarr")  # nobody, root included, creates files in /proc


def test_local_executor_survives_a_dead_worker():
    from flows.executor import WorkerLost

    with SlideExecutor(workers=1) as ex:
        with pytest.raises(WorkerLost, match="died"):
            ex.run(os._exit, 3)
        assert ex.run(abs, -4) == 4  # a fresh pool took over


def test_unreachable_prefect_api_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    for cmd in (["serve"], ["run", "--source", str(tmp_path), "--store", str(tmp_path / "s"), "--run-dir",
                            str(tmp_path / "r")]):
        proc = subprocess.run([sys.executable, "-m", "hlss", *cmd], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Prefect API at http://127.0.0.1:9/api is unreachable" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hlss", "serve"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, timeout=120)
    assert proc.returncode == 2 and "prefect server start" in proc.stderr


def test_hlss_run_uses_a_temporary_local_server(tmp_path, train_yaml):
    """The embedded default (`make demo`): no server, no configuration beyond a settings file."""
    import subprocess
    import sys

    manifest = _cohort(tmp_path, n_patients=4, seed=17)
    cfg = tmp_path / "flows.yaml"
    cfg.write_text(yaml.safe_dump({"tiling": TILING, "training": {"config": str(train_yaml)},
                                   "evaluation": {"k": 5}, "extraction": {"name": "demo"}}))
    # as a user runs it: no API, and no telemetry settings of ours (hlss run turns telemetry off itself)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    cmd = [sys.executable, "-m", "hlss", "run", "--config", str(cfg), "--source", str(manifest),
           "--store", str(tmp_path / "store"), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "# tile-and-train: 4 tiled, 0 unchanged, 0 failed" in proc.stdout
    assert "telemetry" not in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert "| patient |" in proc.stdout  # the kNN table
    assert "knn-demo" in SlideStore(tmp_path / "store").evaluations()
    no_store = cmd[:cmd.index("--store")] + cmd[cmd.index("--store") + 2:]  # --run-dir has a default, --store none
    proc = subprocess.run(no_store, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--store" in proc.stderr and "--run-dir" not in proc.stderr


@pytest.mark.parametrize("address, message", [
    ("tcp://127.0.0.1:notaport", "not an address of the form tcp://host:port"),
    ("tcp://:8786", "not an address of the form tcp://host:port"),
])
def test_check_scheduler_refuses_malformed_addresses(address, message):
    from flows.executor import check_scheduler

    with pytest.raises(ConnectionError, match=message):
        check_scheduler(address)


def test_slide_executor_fails_fast_on_a_scheduler_nobody_listens_at():
    import socket

    from flows.executor import SlideExecutor, check_scheduler

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port} \(Connection refused\)"):
        SlideExecutor(2, f"tcp://127.0.0.1:{port}")
    check_scheduler("inproc://anything")  # schemes without host:port are Dask's to judge
    with socket.socket() as srv:  # something listening passes the probe
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_scheduler(f"127.0.0.1:{srv.getsockname()[1]}")


def test_run_form_descriptions_are_plain_words():
    import re

    from prefect.utilities.callables import parameter_schema

    from flows.extract import extract_features_flow
    from flows.reprocess import reprocess
    from flows.tile_and_train import tile_and_train

    for f in (tile_and_train, extract_features_flow, reprocess):
        schema = json.dumps(parameter_schema(f).model_dump())
        assert "TilingParams" in schema or f is extract_features_flow  # the descriptions are there...
        assert not re.search(r":(class|func|meth|mod|attr):|``", schema), f.name  # ...without markup

"""End to end, the production way: ``prefect server start``, ``hlss serve``, ``prefect deployment run``.

A real Prefect server on loopback (SQLite in a temporary PREFECT_HOME), the deployments served by
``hlss serve`` with defaults from a flow config file and ``HLSS_*`` variables, and runs triggered
from the ``prefect`` command with no parameters, then with ``--params`` overriding the defaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from browser import Browser, chromium
from pipeline.store import SlideStore
from pipeline.synthetic import make_demo_cohort

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


_DECODED_IMAGES = """(async () => {
  const imgs = [...document.images].filter(i => i.src.startsWith('data:image/jpeg'));
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {n: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          alts: imgs.map(i => i.alt).sort()};
})()"""


_REPORT_LINK = "[...document.links].map(a => a.href).find(h => h.includes('/report/')) || null"

_REPORT_PAGE = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {url: location.href, title: document.title, n: imgs.length,
          decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{log.read_text() if log else ''}")
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout} s\n{log.read_text()[-4000:] if log else ''}")


def _stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """Ctrl-C, as a person would; the process must exit by itself."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[:3]} did not stop within {timeout} s of SIGINT")


def test_deployment_run_end_to_end(tmp_path, tiny_text_model):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "HF_HUB_OFFLINE": "1"}
    manifest = make_demo_cohort(tmp_path / "cohort", n_patients=6, slides_per_patient=(1, 1), n_classes=2,
                                width=1024, height=768, seed=21)
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({
        "method": "hlss", "steps": 2, "device": "cpu", "checkpoint_every": 2, "log_every": 1,
        "sampler": {"batch_size": 2, "slides_per_patient": 1, "tiles_per_slide": 2, "views_per_tile": 2,
                    "num_workers": 0},
        "model": {"backbone": "resnet10t", "text_encoder": str(tiny_text_model)},
        "augment": {"out_size": 32},
    }))
    flow_cfg = tmp_path / "hlss-flows.yaml"
    flow_cfg.write_text(yaml.safe_dump({
        "workers": 2, "tiling": {"target_mpp": 1.0, "tile_size": 64}, "evaluation": {"k": 5},
        "extraction": {"batch_size": 32}, "reprocess_cron": "15 3 * * *",
    }))
    store, run = tmp_path / "store.zarr", tmp_path / "run"
    report_port = _free_port()
    serve_env = {**env, "HLSS_FLOW_CONFIG": str(flow_cfg), "HLSS_SOURCE": str(manifest), "HLSS_STORE": str(store),
                 "HLSS_RUN_DIR": str(run), "HLSS_TRAIN_CONFIG": str(train_cfg), "HLSS_REPORT_PORT": str(report_port)}
    work = tmp_path / "cwd"
    work.mkdir()

    server_log, serve_log, worker_log = tmp_path / "server.log", tmp_path / "serve.log", tmp_path / "worker.log"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=work, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    serve = worker = None
    try:
        _wait("prefect server", lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, server,
              server_log)
        serve = subprocess.Popen([sys.executable, "-m", "hlss", "serve"], env=serve_env, cwd=work,
                                 stdout=serve_log.open("w"), stderr=subprocess.STDOUT)

        def deployment(name: str) -> dict | None:
            r = httpx.get(f"{api}/deployments/name/{name}", timeout=5)
            return r.json() if r.status_code == 200 else None

        for name in ("tile-and-train/default", "extract-features/default", "reprocess/nightly"):
            _wait(f"deployment {name}", lambda: deployment(name), 120, serve, serve_log)
        nightly = deployment("reprocess/nightly")
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["15 3 * * *"]
        assert deployment("tile-and-train/default")["parameters"]["source"] == str(manifest)

        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "tile-and-train/default", "--watch"],
                              env=env, cwd=work, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout + done.stderr + serve_log.read_text()[-4000:]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {
            "any_": [deployment("tile-and-train/default")["id"]]}}}, timeout=10).json()
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"], runs

        reader = SlideStore(store)
        records = list(reader.records(status="complete"))
        assert len(records) == 6
        for rec in records:
            assert reader.tiles(rec.patient_id, rec.slide_id).shape[0] == rec.n_tiles > 0
            assert reader.features(rec.patient_id, rec.slide_id, "hlss").shape[0] == rec.n_tiles
        assert set(reader.evaluations()["knn-hlss"]["levels"]) == {"tile", "slide", "patient"}
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [
            "tile-and-train-summary"]}}}, timeout=10).json()
        assert artifacts and "6 tiled, 0 unchanged, 0 failed" in artifacts[0]["data"]
        assert (run / "report.html").is_file()
        # the run's QC pictures as the Prefect UI shows them: every picture decoded by a real browser
        qc = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["tile-and-train-qc"]}}},
                        timeout=10).json()
        assert len(qc) == 1 and qc[0]["data"].count("data:image/jpeg;base64,") == 6
        browser = Browser(chromium())
        try:
            session = browser.open(f"http://127.0.0.1:{port}/artifacts/artifact/{qc[0]['id']}")

            def pictures() -> dict | None:  # the UI renders the artifact after its API call returns
                state = browser.evaluate(session, _DECODED_IMAGES)
                return state if state["n"] == 6 else None

            shown = _wait("the QC pictures in the Prefect UI", pictures, 60)
            # the report link as the UI shows it, followed as a click does: served by `hlss serve` over HTTP
            link = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [
                "tile-and-train-report"]}}}, timeout=10).json()
            assert len(link) == 1
            url = link[0]["data"].rsplit("](", 1)[1].removesuffix(")")  # the artifact is markdown: [text](url)
            assert url == f"http://127.0.0.1:{report_port}/report{run / 'report.html'}"
            session = browser.open(f"http://127.0.0.1:{port}/artifacts/artifact/{link[0]['id']}")
            _wait("the report link in the Prefect UI", lambda: browser.evaluate(session, _REPORT_LINK), 60)
            browser.evaluate(session, "(() => { const a = [...document.links].find(a => a.href.includes('/report/'));"
                                      " a.removeAttribute('target'); a.click(); return true; })()")
            browser.wait_event("Page.loadEventFired", session, timeout=120)
            report_page = browser.evaluate(session, _REPORT_PAGE)
        finally:
            browser.close()
        assert shown["decoded"] == 6 and shown["alts"] == sorted(f"{r.patient_id} / {r.slide_id}" for r in records)
        assert report_page["url"] == url and report_page["title"].startswith("Cohort report")
        assert report_page["n"] >= 6 and report_page["decoded"] == report_page["n"]  # its pictures, over HTTP too

        # --params overrides the served defaults for one run: a timm encoder instead of the run's
        override = subprocess.run([str(BIN / "prefect"), "deployment", "run", "extract-features/default", "--watch",
                                   "--params", '{"run_dir": null, "extraction": {"encoders": ["timm:resnet10t"], "random_init": true, '
                                   '"batch_size": 32}}'],
                                  env=env, cwd=work, capture_output=True, text=True, timeout=300)
        assert override.returncode == 0, override.stdout + override.stderr + serve_log.read_text()[-4000:]
        assert all(reader.feature_names(r.patient_id, r.slide_id) == ["hlss", "resnet10t"] for r in records)
        serve_rc, serve = _stop(serve), None
        assert serve_rc in (0, 130, -signal.SIGINT), serve_log.read_text()[-3000:]

        # the work-pool alternative: the same deployments, run by a Prefect worker instead of `hlss serve`
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "hlss-pool", "--type", "process"], env=env,
                       cwd=work, check=True, capture_output=True, timeout=120)
        deployed = subprocess.run([sys.executable, "-m", "hlss", "deploy", "--pool", "hlss-pool"], env=serve_env,
                                  cwd=work, capture_output=True, text=True, timeout=120)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert deployment("reprocess/nightly")["work_pool_name"] == "hlss-pool"
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "hlss-pool"],
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=work,
                                  stdout=worker_log.open("w"), stderr=subprocess.STDOUT)
        nightly_run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "reprocess/nightly", "--watch"],
                                     env=env, cwd=work, capture_output=True, text=True, timeout=300)
        assert nightly_run.returncode == 0, nightly_run.stdout + nightly_run.stderr + worker_log.read_text()[-4000:]
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [
            "reprocess-summary"]}}}, timeout=10).json()
        assert artifacts and "0 tiled, 6 unchanged, 0 failed" in artifacts[0]["data"]
    finally:
        if serve is not None:
            _stop(serve)
        if worker is not None:
            worker_rc = _stop(worker)
        server_rc = _stop(server)
    assert worker_rc in (0, 130, -signal.SIGINT), worker_log.read_text()[-3000:]
    assert server_rc in (0, 130, -signal.SIGINT), server_log.read_text()[-3000:]
    shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)

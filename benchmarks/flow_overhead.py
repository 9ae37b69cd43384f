"""Orchestration overhead of the Prefect flows, and tiling throughput in slides/hour.

    python benchmarks/flow_overhead.py                      # 12 patients, demo training config
    python benchmarks/flow_overhead.py --patients 24 --workers 2

Prints from one run, on one synthetic cohort (``make_demo_cohort``, 4096 x 3072 px at 0.5 µm/px):

1. Direct: the steps of ``tile-and-train`` called as plain functions, each timed:
   ``tile_cohort`` -> ``train`` -> ``extract_features`` (the trained encoder) -> ``knn_from_store``.
2. Flow: the ``tile-and-train`` flow on a fresh store and run folder with the same settings, run
   in-process against Prefect's temporary local server (as ``hlss run`` does). The server is
   started by a trivial flow beforehand and its start-up is reported on its own line.
   Overhead = flow wall time / sum of the direct steps - 1 (goal: under 10% when the direct run
   takes over a minute).
3. Tiling alone, slides/hour, with 1 and 2 workers: ``tile_cohort`` against the ``reprocess`` flow
   (no run folder: discovery, one task per slide, the summary artifact) on fresh stores.

Order: direct first. The direct run fills the text-embedding cache (``$HLSS_CACHE_DIR``), so the
flow's training finds it warm; run the script twice for a fair first row (both warm).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

OUT = Path(__file__).resolve().parent / "output"


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t0


_started = False


def _start_prefect() -> None:
    """Start the temporary Prefect server with a trivial flow, so no timed flow pays for it."""
    global _started
    if _started:
        return
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    _, t_server = _timed(warm_up)
    _started = True
    print(f"Prefect temporary server start-up + a trivial flow: {t_server:.1f} s (once per process; not counted)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2, help="tiling workers of the direct/flow comparison")
    ap.add_argument("--train-config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    ap.add_argument("--parts", default="overhead,rates", help="comma-separated: overhead (1 and 2), rates (3)")
    args = ap.parse_args()

    from hlss_model.config import TrainConfig
    from pipeline.config import TilingParams
    from pipeline.synthetic import make_demo_cohort

    cohort_dir = OUT / f"flow_cohort_{args.patients}p"
    if not (cohort_dir / "manifest.csv").is_file():
        make_demo_cohort(cohort_dir, n_patients=args.patients, slides_per_patient=(1, 2), n_classes=2, seed=0)
    manifest = cohort_dir / "manifest.csv"
    n_slides = sum(1 for _ in open(manifest)) - 1
    work = Path(tempfile.mkdtemp(prefix="flow-bench-", dir=OUT))
    cfg = TrainConfig.from_yaml(args.train_config)
    params = TilingParams()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; cohort: {args.patients} patients, "
          f"{n_slides} slides; training {args.train_config} ({cfg.steps} steps, {cfg.model.backbone}); "
          f"tiling workers {args.workers}")

    parts = set(args.parts.split(","))
    if "overhead" in parts:
        _overhead(args, manifest, work, cfg, params)
    if "rates" in parts:
        _rates(manifest, work, params, n_slides)
    shutil.rmtree(work, ignore_errors=True)


def _overhead(args, manifest: Path, work: Path, cfg, params) -> None:
    from hlss_model.evaluate import knn_from_store
    from hlss_model.runs import read_run, run_encoder
    from hlss_model.train import train
    from hlss_model.extract import extract_features
    from pipeline.runner import tile_cohort

    n_slides = sum(1 for _ in open(manifest)) - 1
    # -- 1. direct ---------------------------------------------------------------------------
    store, run = work / "direct.zarr", work / "direct-run"
    report, t_tile = _timed(tile_cohort, manifest, store, params, workers=args.workers)
    _, t_train = _timed(train, store, run, cfg, progress=False)
    enc = run_encoder(run, "hlss")
    ext, t_extract = _timed(extract_features, store, [enc], batch_size=128)
    _, t_knn = _timed(knn_from_store, store, features="hlss", split=read_run(run)["split"], k=20)
    direct = t_tile + t_train + t_extract + t_knn
    print(f"direct: tile {t_tile:.1f} s ({report.n_tiles} tiles), train {t_train:.1f} s, extract {t_extract:.1f} s, "
          f"knn {t_knn:.1f} s; sum {direct:.1f} s")

    # -- 2. flow -----------------------------------------------------------------------------
    _start_prefect()
    from flows.tile_and_train import tile_and_train

    summary, t_flow = _timed(
        tile_and_train, source=str(manifest), store=str(work / "flow.zarr"), run_dir=str(work / "flow-run"),
        training={"config": args.train_config}, extraction={"batch_size": 128}, evaluation={"k": 20},
        workers=args.workers)
    assert summary["slides"]["complete"] == n_slides and summary["slides"]["failed"] == 0, summary["slides"]
    print(f"flow tile-and-train: {t_flow:.1f} s; flow / direct = {t_flow / direct:.3f} "
          f"(overhead {100 * (t_flow / direct - 1):+.1f}%)")



def _rates(manifest: Path, work: Path, params, n_slides: int) -> None:
    """Tiling alone: direct ``tile_cohort`` against the ``reprocess`` flow, 1 and 2 workers."""
    from flows.reprocess import reprocess
    from pipeline.runner import tile_cohort

    _start_prefect()
    for workers in (1, 2):
        _, t_direct = _timed(tile_cohort, manifest, work / f"rate-direct-{workers}.zarr", params, workers=workers)
        out, t_flowed = _timed(reprocess, source=str(manifest), store=str(work / f"rate-flow-{workers}.zarr"),
                               workers=workers)
        assert out["slides"]["complete"] == n_slides
        print(f"tiling, {workers} worker(s): direct {3600 * n_slides / t_direct:.0f} slides/h ({t_direct:.1f} s), "
              f"reprocess flow {3600 * n_slides / t_flowed:.0f} slides/h ({t_flowed:.1f} s); flow / direct time "
              f"{t_flowed / t_direct:.3f}; orchestration {(t_flowed - t_direct) / n_slides:.2f} s per slide")


if __name__ == "__main__":
    main()

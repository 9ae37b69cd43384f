"""The same encoder at initialisation, trained with HiDisc, with HLSS, and with HLSS plus HiDisc's
contrast on z (``loss.visual_weight: 1``): kNN side by side.

Same synthetic cohort, seed, batches and steps for every method; kNN (k, T=0.07) on the manifest's
held-out patients with backbone features of every tile. Prints one table and writes JSON to
``benchmarks/output/hlss_vs_hidisc.json``.

    python benchmarks/hlss_vs_hidisc.py                      # CPU-sized defaults, about 6 minutes on 2 cores
    python benchmarks/hlss_vs_hidisc.py --steps 600 --backbone resnet18 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hlss_model.config import TrainConfig  # noqa: E402
from hlss_model.evaluate import knn_from_store  # noqa: E402
from hlss_model.runs import read_run, run_encoder  # noqa: E402
from hlss_model.train import train  # noqa: E402
from pipeline.config import TilingParams  # noqa: E402
from pipeline.runner import tile_cohort  # noqa: E402
from pipeline.synthetic import make_demo_cohort  # noqa: E402

OUT = Path(__file__).resolve().parent / "output"


def build_store(patients: int, classes: int, size: int, seed: int, slides: int, tile: int, mpp: float) -> Path:
    root = OUT / f"compare_{patients}p_{classes}c_{size}_{slides}s_{tile}px_{mpp}_s{seed}"
    store = root / "store.zarr"
    if not store.exists():
        manifest = make_demo_cohort(root / "slides", n_patients=patients, slides_per_patient=(slides, slides),
                                    n_classes=classes, width=size, height=size, seed=seed)
        report = tile_cohort(manifest, store, TilingParams(target_mpp=mpp, tile_size=tile),
                             workers=min(2, os.cpu_count() or 1))
        if report.exit_code:
            raise SystemExit(report.table())
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--image-size", type=int, default=64, help="view side in px")
    ap.add_argument("--tile-size", type=int, default=96, help="stored tile side in px at --tile-mpp")
    ap.add_argument("--tile-mpp", type=float, default=1.0)
    ap.add_argument("--slides-per-patient", type=int, default=1)
    ap.add_argument("--batch-patients", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine floor; 1 = constant after warm-up")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    store = build_store(args.patients, args.classes, args.size, args.seed, args.slides_per_patient,
                        args.tile_size, args.tile_mpp)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"store {store}; {args.steps} steps of {args.batch_patients} patients x {args.slides_per_patient} slides x 2 tiles x 2 views, "
          f"{args.backbone} at {args.image_size} px; device {device}; torch {torch.__version__}; {platform.node()}")
    base = {
        "steps": args.steps, "seed": args.seed, "checkpoint_every": args.steps, "log_every": 10,
        "sampler": {"batch_size": args.batch_patients, "slides_per_patient": args.slides_per_patient,
                    "num_workers": 1},
        "model": {"backbone": args.backbone},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 6), "min_lr_ratio": args.min_lr_ratio},
        "augment": {"out_size": args.image_size, "crop_scale": [0.4, 1.0]},
    }
    methods = {"hidisc": {"method": "hidisc"}, "hlss": {"method": "hlss"},
               "hlss+visual": {"method": "hlss", "loss": {"visual_weight": 1.0}}}
    results, timings = {}, {}
    for method, extra in methods.items():
        run = OUT / f"compare_run_{method.replace('+', '_')}"
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        res = train(store, run, TrainConfig.from_dict({**base, **extra}), progress=False)
        timings[method] = {"seconds": round(time.perf_counter() - t, 1), "images_per_s": round(res.images_per_s, 1),
                           "final_loss": round(res.final_loss, 4)}
        split = read_run(run)["split"]
        if "initial" not in results:  # both runs start from the same backbone weights (same seed)
            results["initial"] = knn_from_store(store, encoder=run_encoder(run, initial=True), split=split, k=args.k)
        results[method] = knn_from_store(store, encoder=run_encoder(run), split=split, k=args.k)

    print()
    print(f"{'level':<9}" + "".join(f"{name + ' acc':>18}{'MCA':>8}" for name in results))
    for level in ("tile", "slide", "patient"):
        row = f"{level:<9}"
        for rep in results.values():
            r = rep.levels[level]
            row += f"{100 * r.accuracy:>17.1f}%{100 * r.mean_class_accuracy:>7.1f}%"
        print(row)
    n = results["initial"].levels
    print(f"(held-out: {n['tile'].n} tiles, {n['slide'].n} slides, {n['patient'].n} patients; "
          f"k={args.k}, T=0.07)")
    for method, t in timings.items():
        print(f"{method}: {t['seconds']} s, {t['images_per_s']} images/s, final loss {t['final_loss']}")
    OUT.mkdir(exist_ok=True)
    (OUT / "hlss_vs_hidisc.json").write_text(json.dumps(
        {"args": vars(args), "device": device, "timings": timings,
         "knn": {name: rep.to_dict() for name, rep in results.items()}}, indent=2))


if __name__ == "__main__":
    main()

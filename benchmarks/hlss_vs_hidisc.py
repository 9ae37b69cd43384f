"""HiDisc and HLSS on the same encoder, data, batches and steps, over several seeds: kNN and a linear probe.

Protocol (the same for every method and seed):

* the cohort: a synthetic one (``make_demo_cohort``: 4 classes that differ in tissue structure, a
  random stain per slide, ``--slides-per-patient`` slides each, about 1/3 of each class's patients
  held out), or any labelled store given with ``--store`` (its manifest split, else a seeded one);
* training: each method from the same initial weights (same seed), the same batches, ``--steps``
  steps at a constant lr after a warm-up; a checkpoint at every ``--eval-every`` steps;
* evaluation at each checkpoint, on the held-out patients against the training patients, on backbone
  features and on z (``run_encoder(space='z')``): kNN (``--k``, T = 0.07) at tile, slide and patient
  level, and a linear probe on slide embeddings (the mean of a slide's tile vectors; sklearn
  ``LogisticRegression`` on standardised vectors) trained on the training slides. Two checkpoints
  show whether a method is still improving (converged = no gain beyond the seed spread).

Prints a markdown table (mean ± sd over seeds, then the per-seed values) and writes it with the raw
figures to ``benchmarks/output/hlss_vs_hidisc.{md,json}`` (``--out-name`` changes the stem).

    python benchmarks/hlss_vs_hidisc.py                          # synthetic defaults: ~14 min, loaded 2-core CPU
    python benchmarks/hlss_vs_hidisc.py --seeds 0 1 2 3 4 --steps 400
    python benchmarks/hlss_vs_hidisc.py --store tcga.zarr --tower clip:vinid/plip --image-size 224 \\
        --steps 2000 --eval-every 1000 --batch-patients 32 --device cuda --precision bf16

With ``--store`` every complete labelled slide of the store is used (patients need a ``label``;
held-out patients come from the manifest's ``split`` column when it has one).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hlss_model.config import TrainConfig  # noqa: E402
from hlss_model.encoders import Encoder, state_fingerprint  # noqa: E402
from hlss_model.evaluate import _complete_slides  # noqa: E402
from hlss_model.extract import embed_tiles  # noqa: E402
from hlss_model.knn import FeatureTable, knn_evaluate  # noqa: E402
from hlss_model.runs import RunEmbedding, load_run_model, read_run  # noqa: E402
from hlss_model.train import train  # noqa: E402
from pipeline.config import TilingParams  # noqa: E402
from pipeline.files import write_csv  # noqa: E402
from pipeline.run_folder import RunFolder  # noqa: E402
from pipeline.runner import tile_cohort  # noqa: E402
from pipeline.store import SlideStore  # noqa: E402
from pipeline.synthetic import make_demo_cohort  # noqa: E402

OUT = Path(__file__).resolve().parent / "output"
LEVELS = ("tile", "slide", "patient")
SPACES = ("features", "z")
METHODS = {"hidisc": {"method": "hidisc"}, "hlss": {"method": "hlss"},
           "hlss+visual": {"method": "hlss", "loss": {"visual_weight": 1.0}}}


def build_store(patients: int, classes: int, size: int, seed: int, slides: int, tile: int, mpp: float,
                held_out: float | None = None) -> Path:
    """A tiled synthetic cohort under ``benchmarks/output`` (built once per setting, then reused).

    ``held_out``: share of each class's patients in the test split (None: the cohort's own, about 1/3).
    """
    tag = "" if held_out is None else f"_h{held_out}"
    root = OUT / f"compare_{patients}p_{classes}c_{size}_{slides}s_{tile}px_{mpp}_s{seed}{tag}"
    store = root / "store.zarr"
    if not store.exists():
        manifest = make_demo_cohort(root / "slides", n_patients=patients, slides_per_patient=(slides, slides),
                                    n_classes=classes, width=size, height=size, seed=seed)
        if held_out is not None:
            resplit(manifest, held_out)
        report = tile_cohort(manifest, store, TilingParams(target_mpp=mpp, tile_size=tile),
                             workers=min(2, os.cpu_count() or 1))
        if report.exit_code:
            raise SystemExit(report.table())
    return store


def resplit(manifest: Path, held_out: float) -> None:
    """Rewrite the manifest's split: the first ``round(held_out * n)`` patients of each class are "test"."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[str, list[str]] = {}
    for r in rows:
        members = by_class.setdefault(r["label"], [])
        if r["patient_id"] not in members:
            members.append(r["patient_id"])
    test = {p for members in by_class.values() for p in members[:round(held_out * len(members))]}
    write_csv(manifest, list(rows[0]), [[*r.values()][:-1] + ["test" if r["patient_id"] in test else "train"]
                                        for r in rows])


def checkpoint_encoder(run: Path, step: int, space: str) -> Encoder:
    """The run's backbone (``space='features'``) or z (``'z'``) with the weights of its checkpoint at ``step``."""
    model, meta = load_run_model(run, initial=True)
    model.load_state_dict(load_file(str(RunFolder(run).checkpoint(step) / "model.safetensors")))
    net = (model.backbone if space == "features" else RunEmbedding(model.backbone, model.projection)).eval()
    return Encoder(name=f"{run.name}-{step}-{space}", model=net,
                   dim=model.feature_dim if space == "features" else model.embed_dim,
                   image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                   source=f"hlss-run:{run} step {step} {space}", fingerprint=state_fingerprint(net))


def initial_encoder(run: Path) -> Encoder:
    """The run's backbone before training (the same for every method of one seed)."""
    model, meta = load_run_model(run, initial=True)
    return Encoder(name=f"{run.name}-initial", model=model.backbone.eval(), dim=model.feature_dim,
                   image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                   source=f"hlss-run:{run} initial", fingerprint=state_fingerprint(model.backbone))


def labelled_slides(store: Path, split: dict[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The complete slides of labelled patients in ``split``, and patient -> label."""
    st = SlideStore(store)
    slides, labels = [], {}
    for p, own in _complete_slides(st).items():
        label = st.patient_attrs(p).get("label")
        if p in split and label not in (None, ""):
            labels[p] = str(label)
            slides += [(p, s) for s in own]
    return slides, labels


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of a logistic regression on standardised ``(n, D)`` slide embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(train_x, train_y)
    return float(np.mean(probe.predict(test_x) == test_y))


def evaluate(store: Path, encoder: Encoder, split: dict[str, str], k: int, device: str,
             max_tiles: int | None) -> dict[str, float]:
    """Held-out kNN accuracy per level and linear-probe slide accuracy, in percent."""
    slides, labels = labelled_slides(store, split)
    names = sorted(set(labels.values()))
    feats = embed_tiles(store, encoder, slides, device=device, max_tiles_per_slide=max_tiles)
    tables, probe = {}, {}
    for part in ("train", "test"):
        keys = [key for key in slides if split[key[0]] == part and key in feats]
        y = [names.index(labels[p]) for p, _ in keys]
        tables[part] = FeatureTable(
            features=np.concatenate([feats[key] for key in keys]),
            labels=np.concatenate([np.full(len(feats[key]), c) for key, c in zip(keys, y)]),
            slide_ids=[f"{p}/{s}" for p, s in keys for _ in range(len(feats[(p, s)]))],
            patient_ids=[p for p, s in keys for _ in range(len(feats[(p, s)]))])
        probe[part] = (np.stack([feats[key].mean(0) for key in keys]), np.asarray(y))
    rep = knn_evaluate(tables["train"], tables["test"], names, k=k)
    out = {f"knn_{lv}": 100 * rep.levels[lv].accuracy for lv in LEVELS}
    out["probe_slide"] = 100 * linear_probe(*probe["train"], *probe["test"])
    out["n_test"] = {lv: rep.levels[lv].n for lv in LEVELS}
    return out


def base_config(args: argparse.Namespace, seed: int) -> dict:
    """The training config shared by every method (method-specific keys are merged in)."""
    model = {"backbone": args.backbone, "head_init": args.head_init}
    if args.tower:
        model["tower"] = args.tower
    if args.attributes:
        model["attributes"] = str(args.attributes)
    return {
        "steps": args.steps, "seed": seed, "checkpoint_every": args.eval_every, "keep_checkpoints": 1000,
        "log_every": 10, "device": args.device, "precision": args.precision,
        "sampler": {"batch_size": args.batch_patients, "slides_per_patient": args.slides_per_patient,
                    "num_workers": 1},
        "model": model,
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10), "min_lr_ratio": args.min_lr_ratio},
        "augment": {"out_size": args.image_size, "crop_scale": [0.4, 1.0]},
    }


def run_protocol(store: Path, methods: dict[str, dict], args: argparse.Namespace, work: Path,
                 results: dict, save: Callable[[], None],
                 prepare: Callable[[str, int], AbstractContextManager] = lambda method, seed: nullcontext()) -> dict:
    """Train every method for every seed and evaluate each checkpoint; ``results`` is filled in place
    (``results[method][step][space][metric] = [per-seed values]``) and ``save()`` called after each run.
    ``prepare(method, seed)``: a context the training runs in (the language experiment's rotation)."""
    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    for seed in args.seeds:
        for method, extra in methods.items():
            run = work / f"run_{method.replace('+', '_')}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = base_config(args, seed)
            for key, value in extra.items():
                cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
            t = time.perf_counter()
            with prepare(method, seed):
                res = train(store, run, TrainConfig.from_dict(cfg), progress=False)
            wall = time.perf_counter() - t
            split = read_run(run)["split"]
            timing = results.setdefault("_timing", {}).setdefault(method, [])
            timing.append({"seed": seed, "train_s": round(wall, 1), "images_per_s": round(res.images_per_s, 1),
                           "final_loss": round(res.final_loss, 4)})
            if method == next(iter(methods)):
                ev = evaluate(store, initial_encoder(run), split, args.k, args.eval_device, args.max_tiles)
                _append(results, "initial", 0, "features", ev)
            for step in steps:
                for space in SPACES:
                    ev = evaluate(store, checkpoint_encoder(run, step, space), split, args.k, args.eval_device,
                                  args.max_tiles)
                    _append(results, method, step, space, ev)
            timing[-1]["total_s"] = round(time.perf_counter() - t, 1)
            print(f"seed {seed} {method}: {timing[-1]}; " + "; ".join(
                f"step {s} {sp} " + " ".join(f"{m} {results[method][s][sp][m][-1]:.1f}" for m in METRICS)
                for s in steps for sp in SPACES), flush=True)
            save()
            if not args.keep_runs:
                shutil.rmtree(run, ignore_errors=True)
    return results


METRICS = ("knn_tile", "knn_slide", "knn_patient", "probe_slide")


def _append(results: dict, method: str, step: int, space: str, ev: dict) -> None:
    cell = results.setdefault(method, {}).setdefault(step, {}).setdefault(space, {})
    for m in METRICS:
        cell.setdefault(m, []).append(round(ev[m], 2))
    results.setdefault("_n_test", ev["n_test"])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def markdown(results: dict, seeds: list[int]) -> str:
    """The results as a markdown table: one row per method, step and space; mean ± sd, then per seed."""
    head = "| method | step | space | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|" * len(METRICS)]
    per_seed = [head.replace("| " + METRICS[0], "| per seed " + METRICS[0]), lines[1]]
    for method, by_step in results.items():
        if method.startswith("_"):
            continue
        for step, by_space in by_step.items():
            for space, cell in by_space.items():
                label = f"| {method} | {step} | {space} | "
                lines.append(label + " | ".join(_mean_sd(cell[m]) for m in METRICS) + " |")
                per_seed.append(label + " | ".join(", ".join(f"{v:.1f}" for v in cell[m]) for m in METRICS) + " |")
    n = results.get("_n_test", {})
    note = (f"\nHeld-out: {n.get('tile')} tiles, {n.get('slide')} slides, {n.get('patient')} patients; "
            f"seeds {', '.join(map(str, seeds))}; accuracy in %; mean ± sd over seeds (sd: sample standard "
            "deviation); probe_slide: linear probe on mean-pooled slide embeddings.\n")
    return "\n".join(lines) + "\n\nPer-seed values (seed order as above):\n\n" + "\n".join(per_seed) + "\n" + note


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU, {os.cpu_count()} cores (load average {load:.1f} at start)"


def parser(doc: str = __doc__) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a labelled store to run on instead of the synthetic cohort")
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--size", type=int, default=1280, help="synthetic slide side in px at 0.5 µm/px")
    ap.add_argument("--held-out", type=float, default=0.5,
                    help="share of each class's synthetic patients held out (the cohort's own split holds out 1/3)")
    ap.add_argument("--cohort-seed", type=int, default=0, help="seed of the synthetic cohort")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=None, help="checkpoint + evaluation interval (default steps/2)")
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--tower", default=None, help="model.tower (clip:<folder|hub id>, open_clip:...) for every method")
    ap.add_argument("--attributes", type=Path, default=None, help="attribute YAML file or folder (HLSS)")
    ap.add_argument("--head-init", default="whitened")
    ap.add_argument("--image-size", type=int, default=48, help="view side in px")
    ap.add_argument("--tile-size", type=int, default=96, help="stored tile side in px at --tile-mpp")
    ap.add_argument("--tile-mpp", type=float, default=1.0)
    ap.add_argument("--slides-per-patient", type=int, default=2)
    ap.add_argument("--batch-patients", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine floor; 1 = constant after warm-up")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--max-tiles", type=int, default=None, help="tiles per slide evaluated (default all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=None, help="one seed (the old option; same as --seeds N)")
    ap.add_argument("--methods", nargs="+", default=["hidisc", "hlss"], choices=list(METHODS))
    ap.add_argument("--device", default="auto", help="training device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA) | bf16 | fp32")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders")
    ap.add_argument("--out-name", default="hlss_vs_hidisc")
    return ap


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.seed is not None:
        args.seeds = [args.seed]
    args.eval_every = args.eval_every or max(1, args.steps // 2)
    args.eval_device = "cuda" if args.device.startswith("cuda") else ("cuda" if args.device == "auto"
                                                                       and torch.cuda.is_available() else "cpu")
    return args


def main() -> None:
    args = finish_args(parser().parse_args())
    store = args.store or build_store(args.patients, args.classes, args.size, args.cohort_seed,
                                      args.slides_per_patient, args.tile_size, args.tile_mpp, args.held_out)
    device = machine()
    what = args.tower or args.backbone
    print(f"store {store}; {args.steps} steps of {args.batch_patients} patients x {args.slides_per_patient} "
          f"slides x 2 tiles x 2 views, {what} at {args.image_size} px; seeds {args.seeds}; device {device}; "
          f"torch {torch.__version__}; {platform.node()}", flush=True)
    OUT.mkdir(exist_ok=True)
    results: dict = {}
    t0 = time.perf_counter()

    def save() -> None:
        meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "store": str(store), "device": device, "wall_s": round(time.perf_counter() - t0, 1)}
        (OUT / f"{args.out_name}.json").write_text(json.dumps({**meta, "results": results}, indent=2))
        (OUT / f"{args.out_name}.md").write_text(
            f"{what} at {args.image_size} px, {args.steps} steps of {args.batch_patients} patients x "
            f"{args.slides_per_patient} slides x 2 tiles x 2 views, lr {args.lr}; k = {args.k}; {device}; "
            f"wall {meta['wall_s']} s\n\n" + markdown(results, args.seeds))

    run_protocol(store, {m: METHODS[m] for m in args.methods}, args, OUT / f"{args.out_name}_runs", results, save)
    print()
    print((OUT / f"{args.out_name}.md").read_text())


if __name__ == "__main__":
    main()

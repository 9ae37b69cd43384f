"""HLSS / HiDisc pretraining from a cohort store.

``train(store, out, config)`` writes a run folder: its config, run.json (what rebuilds the encoder,
with the store's train/held-out split), metrics, checkpoints and final weights; the files and their
format are :mod:`pipeline.run_folder`'s, which every reader of a run goes through.

Checkpoints are written to a temporary folder and renamed, so a kill leaves the previous one usable;
``resume=True`` continues from ``latest.json`` with the same batches an uninterrupted run would see.
A run folder that never reached its first checkpoint holds nothing worth keeping: training into it
again restarts it (with the config given now) and says so in :attr:`TrainResult.restarted`; a folder
with a checkpoint is only ever resumed, with its own config.
Multi-GPU: launch with ``torchrun --nproc-per-node N -m hlss train ...``; embeddings are gathered
across ranks before the loss, as HiDisc does.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.files import atomic_write, remove_owned, utc_now
from pipeline.run_folder import MODEL, OPTIMIZER, RunFolder
from pipeline.store import SlideStore

from .augment import AugmentParams
from .config import ConfigError, TrainConfig
from .data import CohortIndex, make_loader
from .device_views import DeviceViews, views_on
from .evaluate import store_split
from .extract import resolve_device
from .losses import AlignmentLoss, HiDiscLoss, HLSSLoss, HVCLoss
from .model import HLSSModel
from .towers import Tower, check_tower_source, load_tower

__all__ = ["train", "TrainResult", "lr_factor"]


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    images_per_s: float
    restarted: str | None = None  # what was restarted: an earlier start in ``out`` that had no checkpoint


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


class _GatherLayer(torch.autograd.Function):
    """all_gather with a gradient: each rank gets the summed gradient of its own slice (as in HiDisc/SimCLR)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0, keeping the gradient path to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return torch.cat(_GatherLayer.apply(t.contiguous()), dim=0)


def _text_side(cfg: TrainConfig, run: RunFolder, tower: Tower | None) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The attribute embeddings (written to the run) and what run.json says of them; a tower's own
    frozen text tower embeds them when the run has one."""
    if not cfg.uses_text:
        return None, {}
    from .text import attribute_embeddings, load_attributes

    attrs = load_attributes(cfg.model.attributes)
    if tower is not None:
        emb = attribute_embeddings(attrs, encoder=tower.text, use_cache=False)
    else:
        emb = attribute_embeddings(attrs, cfg.model.text_encoder)
    save_file({k: v.contiguous() for k, v in emb.items()}, str(run.attributes))
    names = {level: list(attrs.names(level)) for level in emb}
    return emb, {"attributes": names, "attributes_hash": attrs.content_hash(),
                 "text_encoder": cfg.model.tower or cfg.model.text_encoder}


def _build_loss(cfg: TrainConfig) -> torch.nn.Module:
    lc = cfg.loss
    lambdas = dict(lambda_patient=lc.lambda_patient, lambda_slide=lc.lambda_slide, lambda_patch=lc.lambda_patch)
    if cfg.method == "hidisc":
        return HiDiscLoss(temperature=lc.temperature, **lambdas)
    return HLSSLoss(HVCLoss(temperature=lc.temperature, **lambdas), AlignmentLoss(lc.alignment_temperature),
                    alignment_weight=lc.alignment_weight, visual=HiDiscLoss(temperature=lc.temperature, **lambdas),
                    visual_weight=lc.visual_weight)


def train(store: str | Path, out: str | Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Pretrain on the training patients of ``store``; writes the run folder ``out`` (see module doc).

    ``resume`` continues the run in ``out`` (its saved config is used; a different ``config`` is an error).
    """
    run = RunFolder(out)
    out = run.path
    rank, local_rank, world = _dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cfg, start, restarted = _prepare_run(run, config, resume, rank)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True

    reader = SlideStore(store)
    index = CohortIndex.from_store(reader, tile_filter=cfg.tile_filter)
    split = store_split(reader, cfg.seed)
    train_index = index.subset([p for p, s in split.items() if s == "train"])
    tower = None
    if cfg.model.tower:  # built under the seed, as runs.load_run_model rebuilds it (embedding text draws nothing)
        torch.manual_seed(cfg.seed)
        tower = load_tower(cfg.model.tower, text=cfg.uses_text and rank == 0)
    augment = tower.image.augment_params(cfg.augment) if tower else cfg.augment
    # rank 0 embeds the attribute text and writes it to the run; then every rank reads that file,
    # so all build their heads in the same order
    attributes, text_meta = _text_side(cfg, run, tower) if rank == 0 else (None, {})
    if world > 1 and cfg.uses_text:
        dist.barrier()
        attributes = load_file(str(run.attributes))
    embed_dim = next(iter(attributes.values())).shape[1] if attributes else \
        tower.image.embed_dim if tower else cfg.model.proj_dim

    if tower is None:
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone (see runs.load_run_model)
    model = HLSSModel(cfg.model.backbone, embed_dim, attributes, cfg.model.weights, cfg.model.head_init,
                      tower=tower.image if tower else None).to(device)
    del tower  # the text tower's work is done (the run keeps the embeddings it made)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    targets = {k: v.to(device) for k, v in (attributes or {}).items()}
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
    if start:
        _load_checkpoint(run, start, model, optimizer, scheduler)
    elif rank == 0:
        _write_run_meta(run, cfg, augment, store, model, split, index, text_meta)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    loss_fn = _build_loss(cfg).to(device)
    sc = cfg.sampler
    on_device = views_on(sc.views_on, device) == "device"
    loader = make_loader(train_index, sc.slides_per_patient, sc.tiles_per_slide, sc.views_per_tile, augment,
                         sc.batch_size, seed=cfg.seed, balanced=sc.balanced, start_step=start,
                         num_workers=sc.num_workers, rank=rank, world_size=world,
                         pin_memory=device.type == "cuda", encoded=on_device, worker_kind=sc.worker_kind)
    device_views = DeviceViews(augment, device, sc.slides_per_patient, sc.tiles_per_slide, sc.views_per_tile) \
        if on_device else None
    amp = _autocast_dtype(cfg.precision, device)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step, last_loss, seen, t0 = start, float("nan"), 0, time.perf_counter()
    net.train()
    for batch in loader:
        if step >= cfg.steps:
            break
        images = device_views(batch) if device_views else batch["images"].to(device, non_blocking=True)
        B, S, T, V = images.shape[:4]
        flat = images.flatten(0, 3)
        if cfg.channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        ids = {k: _gather(batch[k].to(device)) for k in ("patient", "slides", "tiles")}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = net(flat)
        z = _gather(outputs["z"].float().reshape(B, S, T, V, -1))
        if cfg.method == "hidisc":
            parts = loss_fn(z, ids["patient"], ids["slides"], ids["tiles"])
        else:
            heads = {k: _gather(h.float().reshape(B, S, T, V, -1)) for k, h in outputs["heads"].items()}
            parts = loss_fn(heads, z, targets, ids["patient"], ids["slides"], ids["tiles"])
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: { {k: float(v) for k, v in parts.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if cfg.optim.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        seen += flat.shape[0] * world
        last_loss = float(loss.detach())
        record = {"step": step, "lr": lr, **{k: float(v.detach()) for k, v in parts.items()}}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if rank == 0:
            if step % cfg.log_every == 0 or step == cfg.steps:
                record["images_per_s"] = seen / (time.perf_counter() - t0)
                run.append_metrics(record)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_checkpoint(run, step, cfg, model, optimizer, scheduler)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}")
        if on_step is not None:
            on_step(step, record)
    if bar is not None:
        bar.close()
    if rank == 0:
        atomic_write(run.model, lambda tmp: shutil.copyfile(run.checkpoint(step) / MODEL, tmp))
    elapsed = time.perf_counter() - t0
    if world > 1:
        dist.barrier()
    return TrainResult(out, step, last_loss, seen / elapsed if elapsed else 0.0, restarted)


def _prepare_run(run: RunFolder, config: TrainConfig | None, resume: bool,
                 rank: int) -> tuple[TrainConfig, int, str | None]:
    """The run's config, the step to start from, and what was restarted (None: nothing was)."""
    out, saved = run.path, run.config
    if resume and not saved.is_file():
        raise FileNotFoundError(f"{out}: nothing to resume (no config.yaml)")
    if run.has_checkpoint():
        if not resume:
            raise FileExistsError(f"{out}: already holds a run with checkpoints; pass --resume to continue it "
                                  "or choose another --out")
        cfg = TrainConfig.from_yaml(saved)
        if config is not None and config.to_dict() != cfg.to_dict():
            raise ConfigError(f"{out}: --resume with a config that differs from the run's own config.yaml "
                              f"({_changes(cfg, config)}); a run with checkpoints keeps its config")
        return cfg, run.latest_step(), None
    try:
        old = TrainConfig.from_yaml(saved) if saved.is_file() else None
    except ConfigError:
        if resume and config is None:
            raise
        old = None  # a start without a checkpoint whose config no longer reads: replaced by the new one
    cfg = (config or old or TrainConfig()) if resume else (config or TrainConfig())
    resolve_device(cfg.device)  # an unusable device fails here, before the folder is touched
    if cfg.model.tower:
        check_tower_source(cfg.model.tower)  # and so does a tower folder or weights file that is not there
    restarted = None
    if rank == 0:
        restarted = _restart(run, old, cfg)
        run.write_config(cfg.to_dict())
    return cfg, 0, restarted


def _restart(run: RunFolder, old: TrainConfig | None, cfg: TrainConfig) -> str | None:
    """Remove what an earlier start without a checkpoint left in ``run`` (never a checkpoint, never
    anything but the run's own files); a sentence saying what was restarted, or None when none was there."""
    if not run.is_run():
        return None  # not a run folder (a new one, or one the user owns): nothing of it is ours to remove
    run.remove_started()
    out = run.path
    steps = f"step 0 of {old.steps}" if old is not None else "step 0"
    changed = _changes(old, cfg) if old is not None else "its config.yaml was missing or unreadable"
    return f"{out}: restarted the run that never reached its first checkpoint ({steps}; {changed})"


def _changes(old: TrainConfig, new: TrainConfig) -> str:
    """``steps 30 -> 40, sampler.batch_size 4 -> 2``, or ``same config``."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(old.to_dict()), flat(new.to_dict())
    diff = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff) if diff else "same config"


def _write_run_meta(run: RunFolder, cfg: TrainConfig, augment: AugmentParams, store: str | Path, model: HLSSModel,
                    split: dict[str, str], index: CohortIndex, text_meta: dict) -> None:
    """run.json; ``augment`` is what the views were made with (a tower's normalisation, if any)."""
    run.write_meta({
        "method": cfg.method,
        "backbone": cfg.model.backbone,
        "tower": cfg.model.tower,
        "feature_dim": model.feature_dim,
        "embed_dim": model.embed_dim,
        "image_size": augment.out_size,
        "mean": list(augment.mean),
        "std": list(augment.std),
        "seed": cfg.seed,
        "weights": cfg.model.weights,
        "head_init": cfg.model.head_init,
        "store": str(Path(store).expanduser().resolve()),
        "class_names": list(index.class_names),
        "split": split,
        **text_meta,
    })


def _save_checkpoint(run: RunFolder, step: int, cfg: TrainConfig, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler) -> None:
    tmp = run.checkpoint_tmp(step)
    remove_owned(run.checkpoints, tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / MODEL))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / OPTIMIZER)
    run.write_state(tmp, {"step": step, "optimizer_state": OPTIMIZER, "model": MODEL, "config": cfg.to_dict(),
                          "saved": utc_now()})
    run.commit_checkpoint(step, cfg.keep_checkpoints)


def _load_checkpoint(run: RunFolder, step: int, model: HLSSModel, optimizer, scheduler) -> None:
    ckpt = run.checkpoint(step)
    model.load_state_dict(load_file(str(ckpt / MODEL), device=str(next(model.parameters()).device)))
    state = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])

"""Trained runs as encoders: rebuild the model of a run folder written by :func:`hlss_model.train.train`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .encoders import Encoder, state_fingerprint

from .model import HLSSModel

__all__ = ["read_run", "load_run_model", "run_encoder", "has_checkpoint"]


def has_checkpoint(run: str | Path) -> bool:
    """Whether ``run`` holds a checkpoint or final weights: such a run is resumed or kept, never restarted.

    A checkpoint being written (``checkpoints/.step_*.tmp``) is not one yet."""
    run = Path(run).expanduser()
    return ((run / "latest.json").exists() or (run / "model.safetensors").exists()
            or any((run / "checkpoints").glob("step_*")))


def read_run(run: str | Path) -> dict:
    """``run.json`` of a training run, with a clear error when ``run`` is not one."""
    path = Path(run).expanduser() / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no run.json)")
    return json.loads(path.read_text())


def load_run_model(run: str | Path, map_location: str | torch.device = "cpu",
                   initial: bool = False) -> tuple[HLSSModel, dict]:
    """The trained model of ``run`` (its final weights, else its latest checkpoint) and its run.json.

    ``initial=True`` rebuilds the model as it was before the first step (same seed, same init),
    the baseline a trained encoder is compared against.
    """
    run = Path(run).expanduser()
    meta = read_run(run)
    attributes = None
    if meta["method"] == "hlss":
        attributes = load_file(str(run / "attributes.safetensors"))
    with torch.random.fork_rng():
        torch.manual_seed(meta["seed"])
        model = HLSSModel(meta["backbone"], meta["embed_dim"], attributes, meta.get("weights"), meta["head_init"])
    if initial:
        return model.eval(), meta
    weights = run / "model.safetensors"
    if not weights.is_file():
        latest = run / "latest.json"
        if not latest.is_file():
            raise FileNotFoundError(f"{run}: no model.safetensors and no checkpoint yet")
        weights = run / json.loads(latest.read_text())["path"] / "model.safetensors"
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    return model.eval(), meta


def run_encoder(run: str | Path, name: str | None = None, initial: bool = False) -> Encoder:
    """The backbone of a run as an extraction :class:`~hlss_model.encoders.Encoder` (pooled ``(N, F)`` features).

    Tiles are resized to the run's training view size, as its views were during training.
    ``initial=True``: the same backbone before training (see :func:`load_run_model`).
    """
    model, meta = load_run_model(run, initial=initial)
    run = Path(run).expanduser().resolve()
    return Encoder(
        name=name or f"hlss-{run.name}",
        model=model.backbone,
        dim=model.feature_dim,
        image_size=int(meta["image_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        source=f"hlss-run:{run} ({meta['method']}, {meta['backbone']}{', at initialisation' if initial else ''})",
        fingerprint=state_fingerprint(model.backbone),
    )

"""Trained runs as encoders: rebuild the model of a run folder written by :func:`hlss_model.train.train`.

The folder's files are read through :mod:`pipeline.run_folder` (``read_run`` and ``has_checkpoint``
are re-exported from there); this module adds what needs torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.run_folder import RunFolder, has_checkpoint, read_run

from .encoders import Encoder, state_fingerprint
from .model import HLSSModel

__all__ = ["read_run", "load_run_model", "run_encoder", "has_checkpoint"]


def load_run_model(run: str | Path, map_location: str | torch.device = "cpu",
                   initial: bool = False) -> tuple[HLSSModel, dict]:
    """The trained model of ``run`` (its final weights, else its latest checkpoint) and its run.json.

    ``initial=True`` rebuilds the model as it was before the first step (same seed, same init),
    the baseline a trained encoder is compared against.
    """
    folder = RunFolder(run)
    meta = folder.read_meta()
    attributes = None
    if meta["method"] == "hlss":
        attributes = load_file(str(folder.attributes))
    with torch.random.fork_rng():
        torch.manual_seed(meta["seed"])
        model = HLSSModel(meta["backbone"], meta["embed_dim"], attributes, meta.get("weights"), meta["head_init"],
                          tower=meta.get("tower"))
    if initial:
        return model.eval(), meta
    model.load_state_dict(load_file(str(folder.weights()), device=str(map_location)))
    return model.eval(), meta


def run_encoder(run: str | Path, name: str | None = None, initial: bool = False) -> Encoder:
    """The backbone of a run as an extraction :class:`~hlss_model.encoders.Encoder` (pooled ``(N, F)`` features).

    Tiles are resized to the run's training view size and normalised as its views were during training
    (a tower's own mean and std). A tower run rebuilds its tower from ``model.tower`` (the folder or
    cached hub model must still be there) before loading the trained weights.
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
        source=f"hlss-run:{run} ({meta['method']}, {meta.get('tower') or meta['backbone']}"
               f"{', at initialisation' if initial else ''})",
        fingerprint=state_fingerprint(model.backbone),
    )

"""Trained runs as encoders: rebuild the model of a run folder written by :func:`hlss_model.train.train`.

The folder's files are read through :mod:`pipeline.run_folder` (``read_run`` and ``has_checkpoint``
are re-exported from there); this module adds what needs torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.run_folder import RunFolder, has_checkpoint, read_run

from .encoders import Encoder, state_fingerprint
from .model import HLSSModel

__all__ = ["read_run", "load_run_model", "run_encoder", "RunEmbedding", "has_checkpoint"]


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


class RunEmbedding(nn.Module):
    """A run's z as features: ``(N, 3, H, W)`` -> ``(N, D)`` L2-normalised ``projection(backbone(x))``."""

    def __init__(self, backbone: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.backbone(images)).float(), dim=-1)


def run_encoder(run: str | Path, name: str | None = None, initial: bool = False, space: str = "features") -> Encoder:
    """The backbone of a run as an extraction :class:`~hlss_model.encoders.Encoder` (pooled ``(N, F)`` features).

    Tiles are resized to the run's training view size and normalised as its views were during training
    (a tower's own mean and std). A tower run rebuilds its tower from ``model.tower`` (the folder or
    cached hub model must still be there) before loading the trained weights.
    ``initial=True``: the same backbone before training (see :func:`load_run_model`).
    ``space="z"``: the L2-normalised projected embedding z ``(N, D)`` instead (the space the losses act
    on; the reference evaluates HLSS there).
    """
    if space not in ("features", "z"):
        raise ValueError(f"space must be features or z, got {space!r}")
    model, meta = load_run_model(run, initial=initial)
    run = Path(run).expanduser().resolve()
    net = model.backbone if space == "features" else RunEmbedding(model.backbone, model.projection)
    return Encoder(
        name=name or f"hlss-{run.name}",
        model=net,
        dim=model.feature_dim if space == "features" else model.embed_dim,
        image_size=int(meta["image_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        source=f"hlss-run:{run} ({meta['method']}, {meta.get('tower') or meta['backbone']}"
               f"{', z' if space == 'z' else ''}{', at initialisation' if initial else ''})",
        fingerprint=state_fingerprint(net),
    )

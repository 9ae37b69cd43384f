"""Image encoders for feature extraction: a model plus how to feed it and how to name what it was.

An :class:`Encoder` maps a batch of stored tiles ``(N, T, T, 3) uint8`` to features ``(N, D)``; its
``fingerprint`` identifies the weights, so extraction can tell finished work from stale work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Encoder", "timm_encoder", "state_fingerprint", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def state_fingerprint(model: nn.Module) -> str:
    """blake2b of every parameter and buffer (names, shapes, bytes): same weights, same fingerprint."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Encoder:
    """A feature extractor.

    Attributes:
        name: feature array name in the store (``features/<name>``).
        model: ``(N, 3, S, S)`` normalised float images -> ``(N, D)`` features.
        dim: D.
        image_size: S in px; None feeds tiles at their stored size (any CNN accepts it).
        mean, std: per-channel normalisation of [0, 1] RGB.
        source: what the model is, e.g. ``timm:resnet50`` or ``hlss-run:/runs/a``.
        fingerprint: identity of the weights (see :func:`state_fingerprint`).
    """

    name: str
    model: nn.Module
    dim: int
    image_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    fingerprint: str

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3) uint8`` on any device -> ``(N, 3, S, S) float32`` normalised, channels-last."""
        x = tiles.permute(0, 3, 1, 2).float().div_(255)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def attrs(self) -> dict:
        """Attributes recorded on the feature array."""
        return {"model": self.source, "weights_fingerprint": self.fingerprint, "dim": self.dim,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def timm_encoder(model_name: str, weights: str | Path | None = None, name: str | None = None,
                 seed: int = 0) -> Encoder:
    """A timm backbone's pooled features (``num_classes=0``).

    ``weights``: a local safetensors/torch file; without it the model is randomly initialised from
    ``seed`` (a reproducible baseline, not a useful feature extractor).
    """
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0,
                                      **({"checkpoint_path": str(weights)} if weights else {}))
        except RuntimeError as e:
            raise ValueError(f"timm model {model_name!r}: {e}") from None
    cfg = timm.data.resolve_data_config({}, model=model)
    fixed = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    return Encoder(
        name=name or model_name.replace("/", "_"),
        model=model.eval(),
        dim=int(model.num_features),
        image_size=int(cfg["input_size"][-1]) if fixed else None,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        source=f"timm:{model_name}" + (f" weights={Path(weights).name}" if weights else f" random-init seed={seed}"),
        fingerprint=state_fingerprint(model),
    )

"""The HLSS / HiDisc network: timm backbone, linear projection, one text head per level.

    images (N, 3, H, W) -> backbone -> features (N, F)        pooled; used for kNN and extraction
                        -> projection, L2 norm -> z (N, D)     D = text dim (HLSS) or proj_dim (HiDisc)
                        -> head_level, L2 norm -> (N, A_level) one output per attribute (HLSS only)

Each head's weight rows start as its level's attribute embeddings (bias 0), so at step 0 a head
output is the similarity of z to every attribute; the heads then train with the rest. By default
(``head_init="centered"``) the level's mean embedding is removed from the rows first (then they are
re-normalised): sentences of one domain share a large common direction (mean pairwise cosine
0.5-0.6 with the shipped attributes), which makes every head output nearly the same vector, and the
hierarchical contrast then collapses (on the demo cohort the HVC loss stayed at log(N-1) for 80 steps
with raw rows; with centred rows it falls). ``head_init="raw"`` keeps the rows as they are.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HLSSModel", "create_backbone", "HEAD_INITS"]

HEAD_INITS = ("centered", "raw")


def create_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward`` gives pooled ``(N, F)`` features.

    ``weights`` is a local safetensors or torch file (a classifier in it is ignored); None = random init.
    """
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ValueError(f"unknown timm model {name!r}: {e}") from None
    if weights is not None:
        path = Path(weights).expanduser()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when not strict
            raise ValueError(f"{path}: weights do not fit timm model {name!r}: {str(e).splitlines()[-1].strip()}") from None
        head = {k for k in unexpected if k.split(".")[0] in ("fc", "head", "classifier", "last_linear")}
        if missing or set(unexpected) - head:
            raise ValueError(f"{path}: weights do not fit timm model {name!r} "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(set(unexpected) - head)[:5]})")
    return model


class HLSSModel(nn.Module):
    """Backbone + projection (+ per-level heads when ``attributes`` is given).

    Args:
        backbone: timm model name.
        embed_dim: D, the projection's output size (the text encoder's dimension for HLSS).
        attributes: level -> ``(A_level, D)`` L2-normalised attribute embeddings; None for HiDisc.
        weights: optional local backbone weights file.
        head_init: ``centered`` (rows minus the level's mean, re-normalised) or ``raw``.
    """

    def __init__(self, backbone: str, embed_dim: int, attributes: dict[str, torch.Tensor] | None = None,
                 weights: str | Path | None = None, head_init: str = "centered") -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, weights)
        self.feature_dim = int(self.backbone.num_features)
        self.embed_dim = embed_dim
        self.projection = nn.Linear(self.feature_dim, embed_dim)
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.heads = nn.ModuleDict()
        for level, emb in (attributes or {}).items():
            if emb.ndim != 2 or emb.shape[1] != embed_dim:
                raise ValueError(f"attributes[{level!r}] is {tuple(emb.shape)}, expected (A, {embed_dim})")
            if head_init == "centered" and emb.shape[0] > 1:
                emb = F.normalize(emb - emb.mean(0, keepdim=True), dim=1)
            head = nn.Linear(embed_dim, emb.shape[0])
            with torch.no_grad():
                head.weight.copy_(emb)
                head.bias.zero_()
            self.heads[level] = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, F)`` pooled backbone features."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """``(N, 3, H, W)`` -> ``{"features": (N, F), "z": (N, D), "heads": {level: (N, A_level)}}``."""
        feats = self.backbone(images)
        z = F.normalize(self.projection(feats).float(), dim=-1)
        heads = {level: F.normalize(head(z), dim=-1) for level, head in self.heads.items()}
        return {"features": feats, "z": z, "heads": heads}

"""The HLSS / HiDisc network: an image encoder, a projection to z, one text head per level.

    images (N, 3, H, W) -> backbone -> features (N, F)        pooled; used for kNN and extraction
                        -> projection, L2 norm -> z (N, D)     D = text dim (HLSS) or proj_dim (HiDisc)
                        -> head_level, L2 norm -> (N, K_level) K = max(128, A_level) (HLSS only)

The backbone is a timm model with a new linear projection, or a vision-language tower
(``model.tower``, :mod:`hlss_model.towers`): then backbone and projection are the CLIP image tower
split before its projection, z is its joint embedding and D its joint dimension (for HiDisc too).

Heads (``head_init``). Each head is a linear layer (bias 0) whose rows start from the level's
attribute embeddings, so at step 0 a head output is (mostly) the similarity of z to each attribute:

* ``whitened`` (default): the text rows' polar factor ``U V^T`` (the orthonormal rows nearest to
  the text rows; each stays nearest its own attribute) plus a random orthonormal basis of the rest
  of the space, 128 rows in all: every singular value 1.
* ``orthogonal``: the L2-normalised text rows as they are, plus the same kind of complement.
* ``centered`` (the default before issue 14): one row per attribute, the level's mean removed and
  re-normalised (sentences of one domain share a large direction; with raw rows the hierarchical
  contrast stalled at log(N-1) on the demo cohort).
* ``raw``: one row per attribute, the embeddings as they are.

Why 128 rows: with one row per attribute the rows span few directions, and HVC contrasts z only
through them. Effective rank (exp of the entropy of the normalised singular values) of the shipped
attributes (14 / 9 / 7 per level, all-MiniLM-L6-v2, 384-d): raw 11.9 / 7.3 / 5.8, centered 12.5 /
7.9 / 5.8, orthogonal 125.9 / 126.3 / 126.8, whitened 128 / 128 / 128. Held-out kNN accuracy, tile
/ patient, on the synthetic benchmark (``benchmarks/hlss_vs_hidisc.py``'s store and settings:
20 patients, 4 classes, resnet10t, 64 px views, 60 steps, batch 8; seeds 0, 1, 2; mean ± sd):

    centered      30.8 ± 3.2 / 37.5 ± 12.5     (34.4, 28.7, 29.2 / 50, 37.5, 25)
    orthogonal    54.0 ± 20.1 / 62.5 ± 33.1    (75.4, 35.6, 50.9 / 100, 37.5, 50)
    whitened      57.9 ± 20.2 / 66.7 ± 31.5    (80.6, 51.4, 41.8 / 100, 62.5, 37.5)
    HiDisc        59.8 ± 20.7 / 70.8 ± 26.0    (79.6, 38.3, 61.4 / 100, 50, 62.5)

Both wide heads bring HLSS from far behind HiDisc to its level; whitened is ahead of orthogonal on
the mean (2 of 3 seeds), within the seed spread. HA (the alignment loss) on / off, same runs:
orthogonal 54.0 / 52.4 tile, 62.5 / 54.2 patient; whitened 57.9 / 58.5 tile, 66.7 / 70.8 patient:
no measurable effect here, so ``alignment_weight`` stays 1 (the paper's objective; the reference
code computed HA but, turned into a Python float, never trained it). These runs use the timm
backbone and the sentence encoder (no pretrained pathology CLIP is available offline); with a
tower, text and image share a space and HA may matter more (not measured). Old run folders keep
the ``head_init`` written in their run.json, so they rebuild their exact model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .towers import ImageTower

__all__ = ["HLSSModel", "create_backbone", "HEAD_INITS", "HEAD_OUTPUTS", "head_rows", "effective_rank"]

HEAD_INITS = ("centered", "raw", "orthogonal", "whitened")  # model.head_init
HEAD_OUTPUTS = 128  # outputs per level of the orthogonal and whitened heads (at least)


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
        backbone: timm model name (not used with a ``tower``).
        embed_dim: D, the projection's output size (the text encoder's dimension for HLSS); with a
            ``tower`` it must be the tower's joint dimension.
        attributes: level -> ``(A_level, D)`` L2-normalised attribute embeddings; None for HiDisc.
        weights: optional local backbone weights file (timm backbones only).
        head_init: one of :data:`HEAD_INITS` (see the module doc); ``centered`` when not given, as
            before (training passes ``model.head_init``, whose default is ``whitened``).
        tower: a vision-language tower (:class:`~hlss_model.towers.ImageTower` or its ``model.tower``
            spec): its image tower is the backbone and its projection gives z; None = timm backbone.
    """

    def __init__(self, backbone: str, embed_dim: int, attributes: dict[str, torch.Tensor] | None = None,
                 weights: str | Path | None = None, head_init: str = "centered",
                 tower: "ImageTower | str | None" = None) -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if tower is None:
            self.backbone = create_backbone(backbone, weights)
            self.feature_dim = int(self.backbone.num_features)
            self.projection = nn.Linear(self.feature_dim, embed_dim)
        else:
            if isinstance(tower, str):
                from .towers import load_tower

                tower = load_tower(tower, text=False).image
            if tower.embed_dim != embed_dim:
                raise ValueError(f"{tower.spec}: its joint embedding has {tower.embed_dim} dims, not {embed_dim}")
            self.backbone, self.projection, self.feature_dim = tower.backbone, tower.projection, tower.feature_dim
        self.embed_dim = embed_dim
        self.heads = nn.ModuleDict()
        for level, emb in (attributes or {}).items():
            if emb.ndim != 2 or emb.shape[1] != embed_dim:
                raise ValueError(f"attributes[{level!r}] is {tuple(emb.shape)}, expected (A, {embed_dim})")
            rows = head_rows(emb, head_init)
            head = nn.Linear(embed_dim, rows.shape[0])
            with torch.no_grad():
                head.weight.copy_(rows)
                head.bias.zero_()
            self.heads[level] = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, F)`` pooled backbone features."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """``(N, 3, H, W)`` -> ``{"features": (N, F), "z": (N, D), "heads": {level: (N, K_level)}}``."""
        feats = self.backbone(images)
        z = F.normalize(self.projection(feats).float(), dim=-1)
        heads = {level: F.normalize(head(z), dim=-1) for level, head in self.heads.items()}
        return {"features": feats, "z": z, "heads": heads}


def head_rows(text: torch.Tensor, init: str, outputs: int = HEAD_OUTPUTS) -> torch.Tensor:
    """The initial ``(K, D)`` weight rows of one level's head from its ``(A, D)`` attribute embeddings.

    ``centered`` / ``raw``: K = A (see the module doc). ``orthogonal``: the L2-normalised text rows,
    then an orthonormal basis of their span's complement drawn at random (torch's global generator,
    so the seed fixes it), K = max(A, ``outputs``). ``whitened``: the same complement after the text
    rows' polar factor ``U V^T`` (the orthonormal rows nearest to the text rows). Rows that cannot
    be orthogonal (K > D) are random unit rows.
    """
    a, d = text.shape
    if init == "raw":  # the rows as given, bit for bit (old run folders rebuild exactly)
        return text
    if init == "centered":
        return F.normalize(text - text.mean(0, keepdim=True), dim=1) if a > 1 else text
    text = F.normalize(text.float(), dim=1)
    if init == "whitened":
        u, _, vh = torch.linalg.svd(text, full_matrices=False)
        text = u @ vh
    k = max(a, outputs)
    basis = torch.linalg.svd(text, full_matrices=True).Vh  # rows past rank(text) span the complement
    rank = int(torch.linalg.matrix_rank(text))
    complement = basis[rank:]
    if complement.shape[0]:  # a random orthonormal basis of the complement, not SVD's arbitrary one
        rotation, _ = torch.linalg.qr(torch.randn(complement.shape[0], complement.shape[0]))
        complement = rotation @ complement
    extra = complement[:k - a]
    spare = F.normalize(torch.randn(max(0, k - a - extra.shape[0]), d), dim=1)
    return torch.cat([text, extra, spare])


def effective_rank(rows: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of ``rows`` (Roy and Vetterli, 2007): between 1
    (one direction) and min(K, D) (all singular values equal)."""
    s = torch.linalg.svdvals(rows.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))

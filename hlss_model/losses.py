"""Contrastive objectives for HLSS pre-training.

- `SupConLoss`: supervised contrastive loss, the building block of the others.
- `HiDiscLoss`: HiDisc's patient/slide/patch contrast on image embeddings.
- `HVCLoss`: HLSS's hierarchical vision-text contrast on the per-level text-head outputs.
- `AlignmentLoss`: HLSS's hierarchical alignment (HA) of image embeddings to attribute texts.
- `HLSSLoss`: HVC + weighted HA.

Batches are laid out as (B, S, T, V, ...): B patients, S slides per patient, T tiles per slide,
V augmented views per tile. Everything is flattened row-major to N = B*S*T*V rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = ("patient", "slide", "patch")


def _upcast(x: Tensor) -> Tensor:
    """Half precision is computed in float32: exp/logsumexp over a batch lose too much in bf16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al., 2020), the "L_out" form.

    For anchor i with positives P(i) = {p != i : y_p = y_i} and A(i) = {a != i}:

        loss_i = -(tau / base_tau) / |P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau)
                                                        / sum_{a in A(i)} exp(z_i.z_a / tau) )

    The loss is the mean of loss_i over anchors with at least one positive; anchors without one are
    left out. If no anchor has a positive the loss is a zero still connected to the graph.

    Args:
        temperature: tau.
        base_temperature: base_tau; None means equal to ``temperature`` (factor 1).
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.base_temperature = (
            self.temperature if base_temperature is None else _check_temperature(base_temperature)
        )

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """
        Args:
            features: (N, D) embeddings, already L2-normalised (not normalised here, so callers
                choose where normalisation happens). fp16/bf16 are computed in float32.
            labels: (N,) integer labels; equal labels are positives.

        Returns:
            Scalar loss, float32 for half-precision input, else the input's dtype.
        """
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"expected features (N, D) and labels (N,), "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        z = _upcast(features)
        n = z.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(dim=1)
        has_pos = n_pos > 0
        if not has_pos.any():
            return z.sum() * 0

        # -inf on the diagonal drops the anchor from its own denominator; logsumexp subtracts the
        # row max, so this stays finite for small temperatures
        logits = (z @ z.T / self.temperature).masked_fill(self_mask, float("-inf"))
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
        # masked_fill rather than multiply: 0 * -inf on the diagonal would be nan
        pos_log_prob = log_prob.masked_fill(~positives, 0).sum(dim=1)
        mean_log_prob_pos = pos_log_prob[has_pos] / n_pos[has_pos]
        return -(self.temperature / self.base_temperature) * mean_log_prob_pos.mean()


def hierarchy_labels(
    shape_bst: tuple[int, int, int] | torch.Size,
    patient_ids: Tensor | None,
    slide_ids: Tensor | None,
    tile_ids: Tensor | None,
    views: int,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """SupCon labels for each level of a (B, S, T, V) batch, flattened row-major to N = B*S*T*V.

    - "patient": every view of every tile of every slide of a patient is positive to the others.
    - "slide": the views of the tiles of the same slide.
    - "patch": the views of the same tile.

    The ids let the sampler mark repeats (a one-slide patient repeats its slide; a small slide may
    repeat a tile) as the same slide/tile. Each id only needs to be unique within its parent: a
    slide label is the pair (patient, slide id), a patch label the pair (slide label, tile id).

    Args:
        shape_bst: (B, S, T).
        patient_ids: (B,) ints, or None for one patient per b.
        slide_ids: (B, S) ints, or None for a distinct slide per (b, s).
        tile_ids: (B, S, T) ints, or None for a distinct tile per (b, s, t).
        views: V.
        device: where to build default ids; defaults to the given ids' device, else CPU.

    Returns:
        Dict level -> (N,) int64 labels.
    """
    b, s, t = (int(x) for x in shape_bst)
    if device is None:
        device = next((x.device for x in (patient_ids, slide_ids, tile_ids) if x is not None), None)

    def ids_or_positions(ids: Tensor | None, shape: tuple[int, ...], name: str) -> Tensor:
        if ids is None:
            # unique across the batch, not just within the parent: two positions of a repeated
            # patient are still two slides
            return torch.arange(torch.Size(shape).numel(), device=device).reshape(shape)
        if ids.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
        return ids.to(device=device, dtype=torch.long)

    def refine(parent: Tensor, child: Tensor) -> Tensor:
        # relabel (parent, child) pairs densely, so a child id is only compared within its parent
        pairs = torch.stack(torch.broadcast_tensors(parent, child), dim=-1).reshape(-1, 2)
        return torch.unique(pairs, dim=0, return_inverse=True)[1].reshape(child.shape)

    patient = ids_or_positions(patient_ids, (b,), "patient_ids")
    slide = refine(patient[:, None], ids_or_positions(slide_ids, (b, s), "slide_ids"))
    patch = refine(slide[:, :, None], ids_or_positions(tile_ids, (b, s, t), "tile_ids"))

    def per_row(labels: Tensor) -> Tensor:
        # broadcast over the missing trailing dims (down to views), then flatten
        labels = labels.reshape(labels.shape + (1,) * (4 - labels.dim()))
        return labels.expand(b, s, t, views).reshape(-1)

    return {"patient": per_row(patient), "slide": per_row(slide), "patch": per_row(patch)}


class _HierarchicalSupCon(nn.Module):
    """Weighted sum of SupCon at the patient, slide and patch levels; a zero weight skips its level."""

    def __init__(
        self,
        temperature: float = 0.07,
        lambda_patient: float = 1.0,
        lambda_slide: float = 1.0,
        lambda_patch: float = 1.0,
    ) -> None:
        super().__init__()
        self.supcon = SupConLoss(temperature)
        self.weights = {"patient": lambda_patient, "slide": lambda_slide, "patch": lambda_patch}

    def _contrast(
        self,
        features: Mapping[str, Tensor],
        patient_ids: Tensor | None,
        slide_ids: Tensor | None,
        tile_ids: Tensor | None,
    ) -> dict[str, Tensor]:
        """features: level -> (B, S, T, V, D_level); all levels share (B, S, T, V)."""
        shapes = {x.shape[:4] for x in features.values()}
        if len(shapes) != 1 or any(x.dim() != 5 for x in features.values()):
            got = [tuple(x.shape) for x in features.values()]
            raise ValueError(f"expected (B, S, T, V, D) tensors sharing (B, S, T, V), got {got}")
        (shape,) = shapes
        any_features = next(iter(features.values()))
        labels = hierarchy_labels(
            shape[:3], patient_ids, slide_ids, tile_ids, shape[3], device=any_features.device
        )

        out: dict[str, Tensor] = {}
        loss = any_features.new_zeros((), dtype=_upcast(any_features).dtype)
        for level in LEVELS:
            weight = self.weights[level]
            if weight == 0:
                out[level] = loss.new_zeros(())
                continue
            x = features[level]
            out[level] = self.supcon(x.reshape(-1, x.shape[-1]), labels[level])
            loss = loss + weight * out[level]
        out["loss"] = loss
        return out


class HiDiscLoss(_HierarchicalSupCon):
    """HiDisc hierarchical discrimination loss (Jiang et al., CVPR 2023).

        L = lambda_patient * L_patient + lambda_slide * L_slide + lambda_patch * L_patch

    each term `SupConLoss` on the same embeddings with the labels of `hierarchy_labels`: positives
    are the rows of the same patient, of the same slide, or the views of the same tile.
    """

    def forward(
        self,
        embeddings: Tensor,
        patient_ids: Tensor | None = None,
        slide_ids: Tensor | None = None,
        tile_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            embeddings: (B, S, T, V, D), L2-normalised.
            patient_ids: (B,) or None. slide_ids: (B, S) or None. tile_ids: (B, S, T) or None.
                See `hierarchy_labels`.

        Returns:
            Scalars "patient", "slide", "patch" (unweighted; 0 where the lambda is 0) and "loss"
            (the weighted sum).
        """
        return self._contrast(dict.fromkeys(LEVELS, embeddings), patient_ids, slide_ids, tile_ids)


class HVCLoss(_HierarchicalSupCon):
    """HLSS hierarchical vision-text contrast (Watawana et al., MICCAI 2024).

        L = lambda_patient * SupCon(h_patient, y_patient) + lambda_slide * SupCon(h_slide, y_slide)
            + lambda_patch * SupCon(h_patch, y_patch)

    where h_level is the output of that level's text head (the embedding expressed against the
    level's attribute texts) and y_level the labels of `hierarchy_labels`.
    """

    def forward(
        self,
        heads: Mapping[str, Tensor],
        patient_ids: Tensor | None = None,
        slide_ids: Tensor | None = None,
        tile_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            heads: "patient", "slide", "patch" -> (B, S, T, V, A_level), L2-normalised; A_level
                may differ per level.
            patient_ids: (B,) or None. slide_ids: (B, S) or None. tile_ids: (B, S, T) or None.

        Returns:
            Scalars "patient", "slide", "patch" (unweighted; 0 where the lambda is 0) and "loss".
        """
        return self._contrast({lvl: heads[lvl] for lvl in LEVELS}, patient_ids, slide_ids, tile_ids)


class AlignmentLoss(nn.Module):
    """HLSS hierarchical alignment (HA): pull each embedding towards its nearest attribute text.

    For each level with attribute embeddings e_1..e_A and each row z:

        t* = e_{argmax_a z.e_a}            (chosen without gradient)
        p = softmax(z / tau),  q = softmax(t* / tau)       (over the D dims)
        L_level = mean_rows [ KL(p || q) + KL(q || p) ]

    and the loss is the mean of L_level over levels. Gradient flows into z only.

    The reference HLSS code converted this term to a Python float before adding it to the loss, so
    it never reached the gradient; here it does.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, z: Tensor, attributes: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """
        Args:
            z: (N, D) projected image embeddings, L2-normalised.
            attributes: level -> (A_level, D) L2-normalised attribute text embeddings (constants).

        Returns:
            One scalar per level and "loss", their mean.
        """
        if z.dim() != 2:
            raise ValueError(f"expected z of shape (N, D), got {tuple(z.shape)}")
        if not attributes:
            raise ValueError("attributes is empty")
        z = _upcast(z)
        log_p = F.log_softmax(z / self.temperature, dim=-1)
        out: dict[str, Tensor] = {}
        for level, texts in attributes.items():
            texts = texts.detach().to(z)
            with torch.no_grad():
                nearest = texts[(z @ texts.T).argmax(dim=1)]
            log_q = F.log_softmax(nearest / self.temperature, dim=-1)
            # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
            out[level] = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1).mean()
        out["loss"] = torch.stack(list(out.values())).mean()
        return out


class HLSSLoss(nn.Module):
    """HLSS objective: L = L_HVC + alignment_weight * L_HA [+ visual_weight * L_HiDisc(z)].

    The last term is off by default (the paper's objective). With it, the hierarchical contrast is
    also applied to z itself, as in HiDisc. It was added when the heads had one row per attribute
    (7-14 outputs): HVC alone, acting through those small spaces, taught the backbone much less than
    HiDisc did. With the 128-output heads (``head_init: whitened``, see :mod:`hlss_model.model`) HVC
    alone reached HiDisc's level; benchmarks/README.md has the measurements.
    """

    def __init__(self, hvc: HVCLoss, alignment: AlignmentLoss, alignment_weight: float = 1.0,
                 visual: HiDiscLoss | None = None, visual_weight: float = 0.0) -> None:
        super().__init__()
        self.hvc = hvc
        self.alignment = alignment
        self.alignment_weight = alignment_weight
        self.visual = visual if visual_weight > 0 else None
        self.visual_weight = visual_weight

    def forward(
        self,
        heads: Mapping[str, Tensor],
        z: Tensor,
        attributes: Mapping[str, Tensor],
        patient_ids: Tensor | None = None,
        slide_ids: Tensor | None = None,
        tile_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            heads: see `HVCLoss.forward`.
            z: (B, S, T, V, D) projected image embeddings, L2-normalised.
            attributes: see `AlignmentLoss.forward`.
            patient_ids, slide_ids, tile_ids: see `hierarchy_labels`.

        Returns:
            "hvc_patient", "hvc_slide", "hvc_patch", "ha_<level>" per attribute level, "hvc", "ha"
            (with a visual term also "vis_<level>" and "vis") and "loss".
        """
        hvc = self.hvc(heads, patient_ids, slide_ids, tile_ids)
        ha = self.alignment(z.reshape(-1, z.shape[-1]), attributes)
        out = {f"hvc_{level}": hvc[level] for level in LEVELS}
        out |= {f"ha_{level}": value for level, value in ha.items() if level != "loss"}
        out["hvc"] = hvc["loss"]
        out["ha"] = ha["loss"]
        out["loss"] = hvc["loss"] + self.alignment_weight * ha["loss"]
        if self.visual is not None:
            vis = self.visual(z, patient_ids, slide_ids, tile_ids)
            out |= {f"vis_{level}": vis[level] for level in LEVELS}
            out["vis"] = vis["loss"]
            out["loss"] = out["loss"] + self.visual_weight * vis["loss"]
        return out

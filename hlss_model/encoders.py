"""Image encoders for feature extraction: a model plus how to feed it and how to name what it was.

An :class:`Encoder` maps a batch of stored tiles ``(N, T, T, 3) uint8`` to features ``(N, D)``; its
``fingerprint`` identifies the weights, so extraction can tell finished work from stale work.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_strict, load_transformers
from .encoder_zoo import IMAGENET_MEAN, IMAGENET_STD, WeightsError, hub_error, zoo_entry

if TYPE_CHECKING:
    from .encoder_zoo import ZooEntry

__all__ = ["Encoder", "timm_encoder", "zoo_encoder", "zoo_network", "hub_encoder", "file_encoder", "state_fingerprint",
           "IMAGENET_MEAN", "IMAGENET_STD"]


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
        mpp: µm/px of the tiles it was trained on (None: unknown, or natural images).
        trident_name: TRIDENT's name for it (``uni_v1``...), recorded so exports name TRIDENT's folders
            the way TRIDENT does; None for encoders TRIDENT does not have.
    """

    name: str
    model: nn.Module
    dim: int
    image_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    fingerprint: str
    mpp: float | None = None
    trident_name: str | None = None

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
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                **({"trident_name": self.trident_name} if self.trident_name else {})}


def _origin(weights: str | Path | None, seed: int) -> str:
    """How the weights came, for :attr:`Encoder.source`: ``weights=FILE`` or ``random-init seed=N``."""
    return f" weights={Path(weights).name}" if weights else f" random-init seed={seed}"


def _options_text(options: Mapping[str, Any] | None) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in options.items()) if options else ""


def _create_timm(model_name: str, what: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, its refusals (an unknown name, an option the model does not take) as ValueError."""
    import timm

    try:
        return timm.create_model(model_name, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"{what}: {type(e).__name__}: {e}") from None


def timm_encoder(model_name: str, weights: str | Path | None = None, name: str | None = None,
                 seed: int = 0, options: Mapping[str, Any] | None = None) -> Encoder:
    """A timm backbone's pooled features (``num_classes=0``).

    ``weights``: a local safetensors/torch file in timm's layout, loaded strictly (a classifier in it
    is ignored); without it the model is randomly initialised from ``seed`` (a reproducible baseline,
    not a useful feature extractor). ``options``: more ``timm.create_model`` arguments (e.g.
    ``init_values=1e-5`` for UNI-style checkpoints).
    """
    import timm

    options = dict(options or {})
    what = f"timm model {model_name!r}" + (f" with {_options_text(options)[1:]}" if options else "")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _create_timm(model_name, what, pretrained=False, num_classes=0, **options)
    if weights:
        classifier = model.pretrained_cfg.get("classifier") or "head"
        load_strict(model, weights, "timm", drop=(f"{classifier}.",), what=what)
    cfg = timm.data.resolve_data_config({}, model=model)
    fixed = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    return Encoder(
        name=name or model_name.replace("/", "_"),
        model=model.eval(),
        dim=int(model.num_features),
        image_size=int(cfg["input_size"][-1]) if fixed else None,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        source=f"timm:{model_name}{_options_text(options)}{_origin(weights, seed)}",
        fingerprint=state_fingerprint(model),
    )


def hub_encoder(repo: str, name: str | None = None, *, random_init: bool = False, seed: int = 0,
                options: Mapping[str, Any] | None = None) -> Encoder:
    """A timm model published on the hub (``hf-hub:ORG/NAME``), with its pretrained weights (or, with
    ``random_init``, its architecture only); WeightsError saying why the hub gave nothing."""
    import timm

    options = dict(options or {})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = _create_timm(f"hf-hub:{repo}", f"hf-hub:{repo}", pretrained=not random_init, num_classes=0,
                                 **options)
        except OSError as e:  # the hub's errors (gated, offline, missing) are OSErrors
            raise WeightsError(hub_error(e, repo, None, f"hf-hub:{repo}")) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    fixed = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    return Encoder(
        name=name or repo.replace("/", "_"), model=model.eval(), dim=int(model.num_features),
        image_size=int(cfg["input_size"][-1]) if fixed else None, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        source=f"hf-hub:{repo}{_options_text(options)}" + (f" random-init seed={seed}" if random_init else ""),
        fingerprint=state_fingerprint(model))


class _AttentionalPooler(nn.Module):
    """CONCH's attentional pooler (TRIDENT model_zoo/conchv1_5: ``AttentionalPooler``), same parameter
    names: ``n_queries`` learnt queries attend over the trunk's tokens ``(N, T, C)`` -> ``(N, n_queries, d)``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h = x.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (N, heads, tokens, d/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d/heads)) v, as TRIDENT's
        return self.to_out(out.transpose(1, 2).flatten(2))


class _ConchVision(nn.Module):
    """CONCH v1.5's vision tower (TRIDENT ``CONCHVisionTower``): trunk tokens -> pooled, normalised 768-d."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = _AttentionalPooler(d_model=768, context_dim=trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class _ClsPlusMean(nn.Module):
    """Class token concatenated with the mean of the patch tokens (registers excluded): ``(N, 2C)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net(x)  # (N, prefix + patches, C): built with global_pool=""
        return torch.cat([tokens[:, 0], tokens[:, self.net.num_prefix_tokens:].mean(1)], dim=-1)


class _ClsToken(nn.Module):
    """A transformers backbone's class token after its final layer norm: ``(N, C)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).last_hidden_state[:, 0]


def _resolve(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.load() if hasattr(v, "load") else v for k, v in args.items()}


def build_network(entry: "ZooEntry", *, head: bool = False) -> nn.Module:
    """``entry``'s network, randomly initialised, with the parameter names of its hub file (``head``:
    with the classifier its hub file has, where it has one). Builds on the current default device,
    so ``with torch.device("meta"):`` builds it without memory."""
    if entry.builder in ("dinov2", "dinov2-reg"):
        model_cls, config = _transformers_model(entry)
        return model_cls(config)
    kwargs = dict(_resolve(entry.args), num_classes=entry.head_classes if head and entry.head_classes else 0)
    net = _create_timm(entry.arch, f"encoder {entry.name}", pretrained=False, **kwargs)
    if entry.name == "resnet50-trunc":  # CLAM's resnet50_trunc: layers 1-3, then the average pool
        net.layer4 = nn.Identity()
        net.num_features = 1024
    if entry.builder == "conch":
        net = _ConchVision(net)
    return net


def _transformers_model(entry: "ZooEntry") -> tuple[Any, Any]:
    """The transformers model class and config of a ``dinov2`` / ``dinov2-reg`` entry."""
    import transformers

    if entry.builder == "dinov2":
        return transformers.Dinov2Model, transformers.Dinov2Config(**entry.args)
    return transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(**entry.args)


def zoo_network(entry: "ZooEntry", weights: str | Path | None, *, head: bool = False, seed: int = 0) -> nn.Module:
    """``entry``'s network with ``weights`` loaded strictly in its hub layout (None: random from
    ``seed``), in eval mode; ``head`` keeps the classifier of an ImageNet baseline (for checking its
    predictions)."""
    what = f"encoder {entry.name} ({entry.architecture})"
    if weights and entry.layout == "transformers":
        return load_transformers(*_transformers_model(entry), weights, what).eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network(entry, head=entry.head_classes is not None)
    if weights:
        load_strict(net, weights, entry.layout, drop=entry.drop, what=what)
    if entry.head_classes is not None and not head:
        net.reset_classifier(0)
    return net.eval()


def _features(entry: "ZooEntry", net: nn.Module) -> nn.Module:
    """``net`` as images ``(N, 3, S, S)`` -> features ``(N, D)`` by ``entry.output``."""
    if entry.output == "cls+mean":
        return _ClsPlusMean(net)
    if entry.output == "cls":
        return _ClsToken(net)
    return net


def zoo_encoder(entry_name: str, weights: str | Path | None = None, name: str | None = None,
                seed: int = 0) -> Encoder:
    """The registered encoder ``entry_name`` (:data:`hlss_model.encoder_zoo.ZOO`) with ``weights``
    (a local file in the hub repository's layout; None: random from ``seed``)."""
    entry = zoo_entry(entry_name)
    model = _features(entry, zoo_network(entry, weights, seed=seed)).eval()
    return Encoder(name=name or entry.name, model=model, dim=entry.dim, image_size=entry.image_size,
                   mean=entry.mean, std=entry.std, source=f"{entry.name}{_origin(weights, seed)}",
                   fingerprint=state_fingerprint(model), mpp=entry.mpp, trident_name=entry.trident_name)


def file_encoder(doc: Mapping[str, Any], weights: str | Path | None, name: str | None = None, *,
                 random_init: bool = False, seed: int = 0) -> Encoder:
    """The encoder an encoder file describes (``doc`` from :func:`hlss_model.settings.read_encoder_file`):
    its timm, hub or registered model, then its own ``mean``, ``std``, ``image_size``, ``mpp`` and ``name``."""
    if doc["kind"] == "timm":
        enc = timm_encoder(doc["ref"], weights, seed=seed, options=doc["options"])
    elif doc["kind"] == "hf-hub":
        enc = hub_encoder(doc["ref"], random_init=random_init, seed=seed, options=doc["options"])
    else:
        enc = zoo_encoder(doc["ref"], weights, seed=seed)
    return dataclasses.replace(
        enc, name=name or doc.get("name") or enc.name,
        mean=tuple(doc["mean"]) if doc.get("mean") else enc.mean, std=tuple(doc["std"]) if doc.get("std") else enc.std,
        image_size=doc.get("image_size") or enc.image_size, mpp=doc.get("mpp", enc.mpp))

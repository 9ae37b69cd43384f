"""Extraction and evaluation settings, and encoder specs: each setting and its default defined once.

These models are at once the library's defaults (``extract_features(batch_size=...)``,
``knn_evaluate(k=..., temperature=...)`` take theirs from here), the Prefect flows' parameter models
(re-exported by :mod:`flows.settings`, so the parameter schema and the YAML keys are these fields)
and what the command line's defaults must equal (a test compares them). Training settings are
:class:`hlss_model.config.TrainConfig`, tiling settings :class:`pipeline.config.TilingParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.qc import TileFilter
from pipeline.run_folder import is_run_folder

from .checks import check_device_name, check_weights_file

if TYPE_CHECKING:  # torch is imported only when an encoder is built
    from .encoders import Encoder

__all__ = ["ExtractionSettings", "EvaluationSettings", "EncoderSpec", "EXTRACTION", "EVALUATION", "METHODS"]

METHODS = ("hlss", "hidisc")  # training methods (hlss_model.config.TrainConfig.method); here, free of torch

ENCODER_SYNTAX = "timm:NAME[:WEIGHTS_FILE] or run:TRAINING_RUN_FOLDER"


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder described by value, so a worker can build it: a training run or a timm model."""

    kind: Literal["run", "timm"]
    ref: str  # run folder, or timm model name
    weights: str | None = None  # timm only: a local weights file
    name: str | None = None  # feature name; default from the model

    @classmethod
    def parse(cls, text: str, name: str | None = None) -> "EncoderSpec":
        """``timm:NAME[:WEIGHTS_FILE]`` or ``run:FOLDER`` (syntax only; :meth:`checked` looks at the files)."""
        kind, _, rest = text.partition(":")
        if kind == "run" and rest:
            return cls("run", rest, None, name)
        model, _, weights = rest.partition(":")
        if kind == "timm" and model:
            return cls("timm", model, weights or None, name)
        raise ValueError(f"encoder {text!r}: expected {ENCODER_SYNTAX}")

    def checked(self) -> "EncoderSpec":
        """``self`` once its files are usable: a readable weights file of the right format, or a run
        folder with its run.json; ValueError naming the file otherwise."""
        if self.kind == "run" and not is_run_folder(Path(self.ref).expanduser()):
            raise ValueError(f"encoder run:{self.ref}: {self.ref} is not a training run folder (no run.json)")
        if self.weights is not None:
            check_weights_file(self.weights, what=f"encoder timm:{self.ref}: weights file ")
        return self

    def build(self) -> "Encoder":
        if self.kind == "run":
            from .runs import run_encoder

            return run_encoder(self.ref, self.name)
        from .encoders import timm_encoder

        return timm_encoder(self.ref, self.weights, self.name)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExtractionSettings(_Settings):
    """Feature extraction with the trained encoder (and optional extra timm encoders)."""

    name: str = Field("hlss", description="feature name: features/<name> in every slide")
    encoders: list[str] = Field(default_factory=list, description=f"extra encoders: {ENCODER_SYNTAX}")
    # 128, not the library's former 256: what `hlss extract`, `hlss explain`, the flows and kNN
    # evaluation already used, so only direct Python callers change; half the activation memory
    batch_size: int = Field(128, ge=1, description="tiles per forward pass")
    dtype: Literal["float32", "float16"] = Field("float32", description="stored feature dtype")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    tile_filter: dict[str, float] = Field(
        default_factory=dict, description="QC limits on the tiles to extract, e.g. {min_focus: 20, max_pen: 0.05} "
                                          "(see pipeline.qc.TileFilter); rows of other tiles are NaN")

    @field_validator("tile_filter")
    @classmethod
    def _known_limits(cls, limits: dict[str, float]) -> dict[str, float]:
        TileFilter.from_dict(limits)
        return limits

    @field_validator("encoders")
    @classmethod
    def _encoder_specs(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            EncoderSpec.parse(spec)
        return specs

    devices: list[str] = Field(
        default_factory=list, description="several devices of this machine instead of device, one worker "
                                          "process each, slides split between them: e.g. [cuda:0, cuda:1], or [all] "
                                          "for every CUDA device (hlss_model.multi_device)")

    @field_validator("devices")
    @classmethod
    def _device_names(cls, names: list[str]) -> list[str]:
        return [name if name == "all" else check_device_name(name) for name in names]

    @model_validator(mode="after")
    def _device_or_devices(self) -> "ExtractionSettings":
        if self.devices and self.device != "auto":
            raise ValueError(f"give device ({self.device}) or devices ({', '.join(self.devices)}), not both")
        return self


class EvaluationSettings(_Settings):
    """Weighted kNN evaluation of features on the held-out patients."""

    # HiDisc's (and DINO's) kNN protocol: k=200 neighbours, weights exp(cos / 0.07); unchanged
    k: int = Field(200, ge=1, description="neighbours per query tile")
    temperature: float = Field(0.07, gt=0, description="T in the neighbour weight exp(cosine / T)")
    max_tiles_per_slide: int | None = Field(None, ge=1, description="seeded subsample of larger slides")
    seed: int = Field(0, description="seed of the tile subsample and of the patient split when the manifest has none")


EXTRACTION = ExtractionSettings()  # the defaults, for library signatures
EVALUATION = EvaluationSettings()

"""Extraction and evaluation settings, and encoder specs: each setting and its default defined once.

These models are at once the library's defaults (``extract_features(batch_size=...)``,
``knn_evaluate(k=..., temperature=...)`` take theirs from here), the Prefect flows' parameter models
(re-exported by :mod:`flows.settings`, so the parameter schema and the YAML keys are these fields)
and what the command line's defaults must equal (a test compares them). Training settings are
:class:`hlss_model.config.TrainConfig`, tiling settings :class:`pipeline.config.TilingParams`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.escape import plain_schema, terminal
from pipeline.qc import TileFilter
from pipeline.run_folder import is_run_folder

from .checks import check_device_name, check_weights_file
from .encoder_zoo import (ZOO, WeightsError, missing_weights_message, read_checkpoints, read_yaml, zoo_entry,
                          zoo_weights)

if TYPE_CHECKING:  # torch is imported only when an encoder is built
    from .encoders import Encoder

__all__ = ["ExtractionSettings", "EvaluationSettings", "EncoderSpec", "EXTRACTION", "EVALUATION", "METHODS"]

METHODS = ("hlss", "hidisc")  # training methods (hlss_model.config.TrainConfig.method); here, free of torch

ENCODER_SYNTAX = ("timm:NAME[?KEY=VALUE&...][:WEIGHTS_FILE], a registered name (`hlss encoders`: uni, "
                  "virchow2, ...)[:WEIGHTS_FILE], hf-hub:ORG/NAME[?KEY=VALUE&...], an encoder YAML file "
                  "or run:TRAINING_RUN_FOLDER")
_ENCODER_FILE_KEYS = {"timm", "hf-hub", "encoder", "options", "weights", "mean", "std", "image_size", "mpp", "name"}
_OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_options(text: str, where: str) -> tuple[tuple[str, Any], ...]:
    """``key=value&key=value`` (values read as YAML scalars: ``1e-5``, ``true``, ``224``) as pairs;
    ValueError naming ``where`` and the bad part otherwise."""
    out = []
    for part in text.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not _OPTION_KEY.fullmatch(key):
            raise ValueError(f"encoder {where}: option {part!r} is not KEY=VALUE (KEY a Python name)")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (dict, list)):
            raise ValueError(f"encoder {where}: option {key}={value!r}: expected a number, true/false or a word")
        out.append((key, _number(parsed)))
    return tuple(out)


def _number(value: Any) -> Any:
    """``value``, or the float a string spells: YAML 1.1 reads ``1e-5`` (no dot) as text."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _with_options(text: str, where: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    name, q, opts = text.partition("?")
    return name, (parse_options(opts, where) if q else ())


def read_encoder_file(path: str | Path) -> dict[str, Any]:
    """An encoder YAML file: one of ``timm: NAME``, ``hf-hub: ORG/NAME`` or ``encoder: REGISTERED_NAME``,
    with optional ``options`` (timm arguments), ``weights`` (relative to the file), ``mean``, ``std``
    (3 numbers each), ``image_size`` (px), ``mpp`` (µm/px it was trained at) and ``name``. ValueError
    naming the file and the key otherwise."""
    path = Path(path).expanduser()
    shown = terminal(str(path))
    doc = read_yaml(path, f"encoder file {shown}")
    if not isinstance(doc, dict):
        raise ValueError(f"encoder file {shown}: expected a mapping with timm, hf-hub or encoder")
    unknown = sorted(set(map(str, doc)) - _ENCODER_FILE_KEYS)
    if unknown:
        raise ValueError(f"encoder file {shown}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_ENCODER_FILE_KEYS))}")
    kinds = [k for k in ("timm", "hf-hub", "encoder") if doc.get(k)]
    if len(kinds) != 1 or not isinstance(doc[kinds[0]], str):
        raise ValueError(f"encoder file {shown}: give exactly one of timm: NAME, hf-hub: ORG/NAME, encoder: NAME")
    if kinds[0] == "encoder":
        zoo_entry(doc["encoder"])
        if doc.get("options"):
            raise ValueError(f"encoder file {shown}: options apply to timm and hf-hub models, not to a "
                             f"registered encoder (its architecture is fixed)")
    if not isinstance(doc.get("options") or {}, dict):
        raise ValueError(f"encoder file {shown}: options: expected a mapping of timm arguments")
    for key in ("mean", "std"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3
                                      and all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"encoder file {shown}: {key}: expected 3 numbers, got {value!r}")
    size = doc.get("image_size")
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"encoder file {shown}: image_size: expected a positive integer (px), got {size!r}")
    weights = doc.get("weights")
    if weights:
        file = Path(str(weights)).expanduser()
        doc["weights"] = str(file if file.is_absolute() else path.parent / file)
    options = {str(k): _number(v) for k, v in (doc.get("options") or {}).items()}
    return {**doc, "kind": kinds[0], "ref": doc[kinds[0]], "options": options}


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder described by value, so a worker can build it: a training run, a timm model, a
    registered encoder (:data:`hlss_model.encoder_zoo.ZOO`), a timm model on the hub or an encoder file.

    ``random_init``: an encoder given no weights starts from random weights (never silently: without
    it, a missing weights file is an error); ``checkpoints``: a YAML map of registered names to files.
    """

    kind: Literal["run", "timm", "zoo", "hf-hub", "yaml"]
    ref: str  # run folder, timm model name, registered name, ORG/NAME on the hub, or encoder file
    weights: str | None = None  # a local weights file (timm, registered)
    name: str | None = None  # feature name; default from the model
    options: tuple[tuple[str, Any], ...] = ()  # timm arguments (timm, hf-hub)
    random_init: bool = False
    checkpoints: str | None = None

    @classmethod
    def parse(cls, text: str, name: str | None = None) -> "EncoderSpec":
        """One of :data:`ENCODER_SYNTAX` (syntax only; :meth:`checked` looks at the files)."""
        kind, _, rest = text.partition(":")
        if kind == "run" and rest:
            return cls("run", rest, None, name)
        if kind == "timm":
            model, _, weights = rest.partition(":")
            model, options = _with_options(model, text)
            if model:
                return cls("timm", model, weights or None, name, options)
        if kind == "hf-hub":
            repo, options = _with_options(rest, text)
            if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
                return cls("hf-hub", repo, None, name, options)
            raise ValueError(f"encoder {text!r}: expected hf-hub:ORG/NAME[?KEY=VALUE&...]")
        if text.lower().endswith((".yaml", ".yml")) and kind not in ZOO:
            return cls("yaml", text, None, name)
        if kind in ZOO:
            return cls("zoo", kind, rest or None, name)
        close = difflib.get_close_matches(kind, list(ZOO), n=1)
        raise ValueError(f"encoder {text!r}: " + (f"did you mean {close[0]}? " if close else "") +
                         f"expected {ENCODER_SYNTAX}")

    @property
    def label(self) -> str:
        """The encoder as the user wrote it (without the weights file)."""
        return {"run": f"run:{self.ref}", "timm": f"timm:{self.ref}", "hf-hub": f"hf-hub:{self.ref}"}.get(
            self.kind, self.ref)

    def checked(self) -> "EncoderSpec":
        """``self`` once its files are usable and it has weights or ``random_init``: a readable weights
        file of the right format, a checkpoints map naming it, a run folder with its run.json, an
        encoder file; ValueError (WeightsError when there are no weights) naming the file otherwise."""
        if self.kind == "run":
            if not is_run_folder(Path(self.ref).expanduser()):
                raise ValueError(f"encoder run:{self.ref}: {self.ref} is not a training run folder (no run.json)")
            return self
        if self.weights is not None:
            check_weights_file(self.weights, what=f"encoder {self.label}: weights file ")
        if self.checkpoints:
            read_checkpoints(self.checkpoints)
        self._weights(download=False)
        return self

    def _weights(self, download: bool) -> str | Path | None:
        """The weights file to load (None: random init or the hub's own, for hf-hub); ``download=False``
        only checks that there will be some. WeightsError when there are none and no ``random_init``."""
        if self.kind == "hf-hub":
            return None
        kind, ref, weights = self.kind, self.ref, self.weights
        if kind == "yaml":
            doc = read_encoder_file(ref)
            kind, ref, weights = {"encoder": "zoo"}.get(doc["kind"], doc["kind"]), doc["ref"], weights or doc.get("weights")
            if kind == "hf-hub":
                return None
            if weights:
                check_weights_file(weights, what=f"encoder file {terminal(self.ref)}: weights ")
        if kind == "zoo":
            return zoo_weights(zoo_entry(ref), weights, self.checkpoints, self.random_init, download=download)
        if not weights and not self.random_init:
            raise WeightsError(missing_weights_message(self.label))
        return weights

    def build(self) -> "Encoder":
        if self.kind == "run":
            from .runs import run_encoder

            return run_encoder(self.ref, self.name)
        from . import encoders

        weights = self._weights(download=True)
        if self.kind == "timm":
            return encoders.timm_encoder(self.ref, weights, self.name, options=dict(self.options))
        if self.kind == "zoo":
            return encoders.zoo_encoder(self.ref, weights, self.name)
        if self.kind == "hf-hub":
            return encoders.hub_encoder(self.ref, self.name, random_init=self.random_init, options=dict(self.options))
        return encoders.file_encoder(read_encoder_file(self.ref), weights, self.name, random_init=self.random_init)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=plain_schema)


class ExtractionSettings(_Settings):
    """Feature extraction with the trained encoder (and optional extra timm encoders)."""

    name: str = Field("hlss", description="feature name: features/<name> in every slide")
    encoders: list[str] = Field(default_factory=list, description=f"extra encoders: {ENCODER_SYNTAX}")
    checkpoints: str | None = Field(None, description="YAML map of registered encoder names to local weights "
                                                      "files (like TRIDENT's local_ckpts.json)")
    random_init: bool = Field(False, description="encoders given no weights start from random weights "
                                                 "(a baseline); without it they are an error")
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

    def encoder_specs(self) -> list[EncoderSpec]:
        """:attr:`encoders` as specs carrying :attr:`checkpoints` and :attr:`random_init`, each
        :meth:`~EncoderSpec.checked` (ValueError naming the encoder and what is missing)."""
        return [dataclasses.replace(EncoderSpec.parse(e), checkpoints=self.checkpoints,
                                    random_init=self.random_init).checked() for e in self.encoders]


class EvaluationSettings(_Settings):
    """Weighted kNN evaluation of features on the held-out patients."""

    # HiDisc's (and DINO's) kNN protocol: k=200 neighbours, weights exp(cos / 0.07); unchanged
    k: int = Field(200, ge=1, description="neighbours per query tile")
    temperature: float = Field(0.07, gt=0, description="T in the neighbour weight exp(cosine / T)")
    max_tiles_per_slide: int | None = Field(None, ge=1, description="seeded subsample of larger slides")
    seed: int = Field(0, description="seed of the tile subsample and of the patient split when the manifest has none")


EXTRACTION = ExtractionSettings()  # the defaults, for library signatures
EVALUATION = EvaluationSettings()

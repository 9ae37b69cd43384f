"""Typed flow parameters, and the defaults a deployment gets from a config file or the environment.

Prefect validates flow parameters against these pydantic models (they are the parameter schema in
the UI and for ``prefect deployment run --param/--params``); :func:`check_paths` then checks what a
schema cannot (the source exists, the store is writable) before any work starts.

Defaults, lowest to highest precedence: the models' own defaults, a YAML file (``--config`` or
``$HLSS_FLOW_CONFIG``), then environment variables ``HLSS_SOURCE``, ``HLSS_STORE``, ``HLSS_RUN_DIR``,
``HLSS_WORKERS``, ``HLSS_SCHEDULER_ADDRESS``, ``HLSS_TRAIN_CONFIG``, ``HLSS_DEVICE``,
``HLSS_REPROCESS_CRON``. Example ``hlss-flows.yaml``::

    source: /data/slides          # folder of slides or a manifest .csv
    store: /data/cohort.zarr      # or s3://bucket/cohort.zarr
    run_dir: /data/runs/hlss
    workers: 4
    tiling: {target_mpp: 0.5, tile_size: 256}
    training: {config: configs/demo.yaml}
    reprocess_cron: "0 2 * * *"
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hlss_model.settings import METHODS, EvaluationSettings, ExtractionSettings
from pipeline.codecs import TileCompression
from pipeline.escape import plain_schema
from pipeline.config import TilingParams
from pipeline.location import is_remote, local_path
from pipeline.reader import READERS

if TYPE_CHECKING:  # torch is imported only when a training config is built
    from hlss_model.config import TrainConfig

__all__ = [
    "TilingSettings", "TrainingSettings", "ExtractionSettings", "EvaluationSettings", "FlowDefaults",
    "load_defaults", "check_paths", "default_run_dir", "FlowConfigError",
]


class FlowConfigError(ValueError):
    """An unusable flow parameter or config file; the message says which and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=plain_schema)


class TilingSettings(_Model):
    """How slides become tiles: the flow's view of :class:`pipeline.config.TilingParams`, whose
    defaults and checks these are (compression by name, as in a YAML file)."""

    target_mpp: float = Field(TilingParams.target_mpp, description="µm per px of the stored tiles (0.5 ≈ 20x)")
    tile_size: int = Field(TilingParams.tile_size, description="tile side in px")
    min_tissue: float = Field(TilingParams.min_tissue, description="minimum tissue fraction of a kept tile")
    mask_mpp: float = Field(TilingParams.mask_mpp, description="µm per px of the tissue mask")
    reader: Literal[READERS] = TilingParams.reader
    compression: str | None = Field(None, description="jpeg[:QUALITY[:auto|444|422|420]] | lossless[:CODEC LEVEL] | none")
    slide_timeout_s: float = Field(TilingParams.slide_timeout_s, ge=0,
                                   description="seconds a slide may take before it fails alone (0: no limit)")

    def params(self) -> TilingParams:
        try:
            compression = TileCompression.from_name(self.compression) if self.compression else TileCompression()
            return TilingParams(target_mpp=self.target_mpp, tile_size=self.tile_size, min_tissue=self.min_tissue,
                                mask_mpp=self.mask_mpp, reader=self.reader, compression=compression,
                                slide_timeout_s=self.slide_timeout_s)
        except ValueError as e:
            raise FlowConfigError(f"tiling: {e}") from e


class TrainingSettings(_Model):
    """HLSS pretraining. ``config`` is a YAML training config (hlss_model/config.py); the rest override
    it (:meth:`hlss_model.config.TrainConfig.with_overrides`), so there are no defaults here."""

    config: str | None = Field(None, description="YAML training config file")
    steps: int | None = Field(None, ge=1)
    method: Literal[METHODS] | None = None
    device: str | None = Field(None, description="auto, cpu, cuda, cuda:N")
    resume: bool = Field(False, description="continue an unfinished (or extended) run in run_dir")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="training config keys to change, by section, on top of the config "
                                          "file, e.g. {sampler: {batch_size: 4}, optim: {lr: 0.0005}}")

    @field_validator("overrides")
    @classmethod
    def _known_keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        from hlss_model.config import ConfigError, TrainConfig

        try:  # unknown sections, keys and bad values are refused here, before any work
            TrainConfig.from_dict(_merged(TrainConfig().to_dict(), overrides))
        except ConfigError as e:
            raise ValueError(f"training.overrides: {e}") from None
        return overrides

    def train_config(self, fallback: str | Path | None = None) -> "TrainConfig":
        """The training config these settings make: ``config`` (else ``fallback``, e.g. the run's saved
        config, else the defaults), then ``overrides``, then ``steps``, ``method`` and ``device``."""
        from hlss_model.config import ConfigError, TrainConfig

        source = self.config or fallback
        try:
            cfg = TrainConfig.from_yaml(Path(source).expanduser()) if source else TrainConfig()
            if self.overrides:
                cfg = TrainConfig.from_dict(_merged(cfg.to_dict(), self.overrides))
            return cfg.with_overrides(steps=self.steps, method=self.method, device=self.device)
        except ConfigError as e:
            raise FlowConfigError(f"training: {e}") from None


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it, section by section (nested mappings merged, not replaced)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


Workers = Annotated[int, Field(ge=1, description="slides tiled at once (processes, or Dask worker slots)")]
Threads = Annotated[int, Field(ge=1, description="cores per tiling worker")]


class FlowDefaults(_Model):
    """What ``hlss serve`` gives its deployments (and ``hlss run`` its flow) as default parameters."""

    source: str | None = None
    store: str | None = None
    run_dir: str | None = None
    workers: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    scheduler_address: str | None = None
    tiling: TilingSettings = Field(default_factory=TilingSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    extraction: ExtractionSettings = Field(default_factory=ExtractionSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    reprocess_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    report_host: str = Field("127.0.0.1", description="address the report server of hlss serve binds to")
    report_port: int | None = Field(4280, ge=0, le=65535,
                                    description="its port (0: any free one; null: no report server)")
    report_url: str | None = Field(None, description="the address people open the reports at, when it is not "
                                                     "http://report_host:report_port (a reverse proxy, a tunnel)")

    def flow_parameters(self, flow: str) -> dict[str, Any]:
        """The parameters of ``flow`` (``tile-and-train`` | ``extract-features`` | ``reprocess``) that are set."""
        common = {"store": self.store, "workers": self.workers, "scheduler_address": self.scheduler_address}
        if flow == "tile-and-train":
            out = {**common, "source": self.source, "run_dir": self.run_dir, "threads": self.threads,
                   "tiling": self.tiling.model_dump(), "training": self.training.model_dump(),
                   "extraction": self.extraction.model_dump(), "evaluation": self.evaluation.model_dump()}
        elif flow == "extract-features":
            out = {**common, "run_dir": self.run_dir, "extraction": self.extraction.model_dump()}
        elif flow == "reprocess":
            out = {**common, "source": self.source, "run_dir": self.run_dir, "threads": self.threads,
                   "tiling": self.tiling.model_dump(), "extraction": self.extraction.model_dump()}
        else:
            raise ValueError(f"unknown flow {flow!r}")
        return {k: v for k, v in out.items() if v is not None}


_ENV = {
    "HLSS_SOURCE": ("source",), "HLSS_STORE": ("store",), "HLSS_RUN_DIR": ("run_dir",),
    "HLSS_WORKERS": ("workers",), "HLSS_SCHEDULER_ADDRESS": ("scheduler_address",),
    "HLSS_TRAIN_CONFIG": ("training", "config"), "HLSS_DEVICE": ("training", "device"),
    "HLSS_REPROCESS_CRON": ("reprocess_cron",), "HLSS_REPORT_HOST": ("report_host",),
    "HLSS_REPORT_PORT": ("report_port",),
}


def load_defaults(config: str | Path | None = None, env: dict[str, str] | None = None) -> FlowDefaults:
    """Flow defaults from ``config`` (else ``$HLSS_FLOW_CONFIG``, if set) and ``HLSS_*`` variables."""
    env = dict(os.environ if env is None else env)
    config = config or env.get("HLSS_FLOW_CONFIG")
    doc: dict[str, Any] = {}
    if config:
        path = Path(config).expanduser()
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise FlowConfigError(f"{path}: cannot read the flow config ({e.strerror or e})") from e
        except yaml.YAMLError as e:
            raise FlowConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(doc, dict):
            raise FlowConfigError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
    for var, keys in _ENV.items():
        if env.get(var):
            node = doc
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = env[var]
    try:
        return FlowDefaults.model_validate(doc)
    except ValidationError as e:
        where = f"{config} and HLSS_* variables" if config else "HLSS_* variables"
        raise FlowConfigError(f"flow settings from {where}: {_errors(e)}") from e


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def default_run_dir(store: str) -> str:
    """Where a training run goes when no ``run_dir`` is given: beside a local store,
    ``/data/cohort.zarr`` -> ``/data/cohort-run``. A store in an object store has no such place."""
    if is_remote(store):
        raise FlowConfigError(f"run_dir: not set, and the store {store} is not a local folder to put the run "
                              "beside; set run_dir to a local folder")
    path = local_path(store)
    return str(path.with_name(path.name.removesuffix(".zarr") + "-run"))


def check_paths(source: str | None = None, store: str | None = None, run_dir: str | None = None) -> None:
    """Fail fast, with the path and the reason, on a missing source, or a store or run dir not writable."""
    if source is not None:
        src = Path(source).expanduser()
        if not src.exists():
            raise FlowConfigError(f"source {src}: no such folder or manifest")
        if src.is_file() and src.suffix.lower() != ".csv":
            raise FlowConfigError(f"source {src}: expected a folder of slides or a manifest .csv")
    if store is not None and not is_remote(store):
        _check_writable(local_path(store), "store")
    if run_dir is not None:
        _check_writable(Path(run_dir).expanduser(), "run_dir")


def _check_writable(path: Path, what: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FlowConfigError(f"{what} {path}: {probe} is a file, not a folder")
    try:  # a real write, not os.access: root passes access() checks on read-only mounts too
        with tempfile.TemporaryFile(dir=probe, prefix=".hlss-write-check-"):
            pass
    except OSError as e:
        raise FlowConfigError(f"{what} {path}: cannot write in {probe} ({e.strerror or e}; "
                              "read-only path or no permission)") from e

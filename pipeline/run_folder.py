"""The training run folder: its file names, and every read and write of its files.

Training (:mod:`hlss_model.train`) writes a run folder, the flows, the report, kNN and
:mod:`hlss_model.runs` read it; all of them go through this module, which imports no torch::

    config.yaml              the resolved training configuration (YAML)
    run.json                 what rebuilds the encoder: backbone, dims, method, text encoder,
                             attribute names, the store and its train/held-out split
    attributes.safetensors   level -> (A_level, D) attribute text embeddings (HLSS runs)
    metrics.jsonl            one JSON object per logged step (loss components, lr, images/s)
    checkpoints/step_XXXXXXXX/{model.safetensors, optimizer.pt, state.json}
    latest.json              the newest complete checkpoint, ``{"step", "path"}`` (written last)
    model.safetensors        the final weights
    knn-<feature>.json       kNN evaluations of the run's features (written by the flows)

Weights and tensors are written by the caller (they need torch) to the paths given here; the JSON,
YAML and metrics files are written here, whole or not at all (:mod:`pipeline.files`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from .files import atomic_write_bytes, remove_owned, replace_folder

__all__ = ["RUN_FORMAT", "CONFIG", "RUN", "ATTRIBUTES", "METRICS", "LATEST", "MODEL", "CHECKPOINTS",
           "OPTIMIZER", "STATE", "FILE_NAMES", "RunFolder", "read_run", "read_metrics", "has_checkpoint",
           "is_run_folder", "run_split"]

RUN_FORMAT = 1  # run.json's "format"

CONFIG = "config.yaml"
RUN = "run.json"
ATTRIBUTES = "attributes.safetensors"
METRICS = "metrics.jsonl"
LATEST = "latest.json"
MODEL = "model.safetensors"  # final weights; also the weights inside each checkpoint
CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.pt"  # inside a checkpoint
STATE = "state.json"  # inside a checkpoint
KNN_PREFIX = "knn-"
FILE_NAMES = (CONFIG, RUN, ATTRIBUTES, METRICS, LATEST, MODEL, CHECKPOINTS, OPTIMIZER, STATE)

# what a run writes before its first checkpoint: replaced when such a run is restarted
STARTED_FILES = (CONFIG, RUN, ATTRIBUTES, METRICS)


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step_{step:08d}"


class RunFolder:
    """One training run folder at ``path`` (``~`` expanded): the paths of its files (attributes named
    after them, e.g. :attr:`config`, :attr:`meta` for run.json) and their reads and writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.config = self.path / CONFIG
        self.meta = self.path / RUN
        self.attributes = self.path / ATTRIBUTES
        self.metrics = self.path / METRICS
        self.latest = self.path / LATEST
        self.model = self.path / MODEL
        self.checkpoints = self.path / CHECKPOINTS

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- paths --------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at ``step``."""
        return self.path / _checkpoint_name(step)

    def checkpoint_tmp(self, step: int) -> Path:
        """Where the checkpoint at ``step`` is written before it is renamed into place."""
        final = self.checkpoint(step)
        return final.with_name(f".{final.name}.tmp")

    def checkpoint_dirs(self) -> list[Path]:
        """The complete checkpoint folders, oldest first."""
        return sorted(self.checkpoints.glob("step_*")) if self.checkpoints.is_dir() else []

    def partial_checkpoints(self) -> list[Path]:
        """Checkpoints a killed writer left half written."""
        return sorted(self.checkpoints.glob(".step_*.tmp")) if self.checkpoints.is_dir() else []

    # -- state --------------------------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether a training run was started here (it has a config.yaml or a run.json)."""
        return self.config.exists() or self.meta.exists()

    def has_checkpoint(self) -> bool:
        """Whether the run holds a checkpoint or final weights: such a run is resumed or kept, never
        restarted. A checkpoint being written (``checkpoints/.step_*.tmp``) is not one yet."""
        return self.latest.exists() or self.model.exists() or bool(self.checkpoint_dirs())

    def latest_step(self) -> int:
        """The step of the newest complete checkpoint (0 when there is none)."""
        return int(json.loads(self.latest.read_text())["step"]) if self.latest.is_file() else 0

    def weights(self) -> Path:
        """The run's trained weights: the final ones, else those of the newest checkpoint."""
        if self.model.is_file():
            return self.model
        if not self.latest.is_file():
            raise FileNotFoundError(f"{self.path}: no {MODEL} and no checkpoint yet")
        return self.path / json.loads(self.latest.read_text())["path"] / MODEL

    # -- reads --------------------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        """``run.json``, with a clear error when this is not a training run."""
        if not self.meta.is_file():
            raise FileNotFoundError(f"{self.path}: not a training run (no {RUN})")
        return json.loads(self.meta.read_text())

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as plain data (empty when the file is empty)."""
        return yaml.safe_load(self.config.read_text()) or {}

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (unreadable lines skipped; empty when there is none)."""
        out = []
        if self.metrics.is_file():
            for line in self.metrics.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def split(self) -> dict[str, str] | None:
        """Patient -> split recorded in run.json; None when there is no readable one."""
        try:
            split = json.loads(self.meta.read_text()).get("split")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        return {str(k): str(v) for k, v in split.items()} if isinstance(split, dict) else None

    def knn_results(self) -> dict[str, dict[str, Any]]:
        """``knn-<feature>`` -> the kNN evaluation recorded in the run (unreadable files skipped)."""
        out = {}
        for path in sorted(self.path.glob(f"{KNN_PREFIX}*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict):
                out[path.stem] = doc
        return out

    # -- writes -------------------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        """``config.yaml`` (keys in the order given), creating the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config, yaml.safe_dump(config, sort_keys=False).encode())

    def write_meta(self, meta: dict[str, Any]) -> None:
        """``run.json``: ``meta`` after the format version."""
        _write_json(self.meta, {"format": RUN_FORMAT, **meta})

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (appended: a kill loses at most that line, which reads skip)."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_state(self, folder: Path, state: dict[str, Any]) -> None:
        """``state.json`` of a checkpoint being written in ``folder``."""
        (Path(folder) / STATE).write_text(json.dumps(state, indent=2))

    def write_latest(self, step: int) -> None:
        """Point ``latest.json`` at the (complete) checkpoint of ``step``."""
        _write_json(self.latest, {"step": step, "path": _checkpoint_name(step)})

    def write_knn(self, feature: str, doc: dict[str, Any]) -> None:
        """The kNN evaluation of ``feature`` as ``knn-<feature>.json``."""
        _write_json(self.path / f"{KNN_PREFIX}{feature}.json", doc)

    def remove_started(self) -> list[str]:
        """Remove what a start without a checkpoint wrote (never a checkpoint, nothing but the run's own
        files, see :data:`STARTED_FILES`); the names of the files that were there."""
        left = [name for name in STARTED_FILES if (self.path / name).exists()]
        for path in [*(self.path / name for name in left), *self.partial_checkpoints()]:
            remove_owned(self.path, path)
        return left

    def commit_checkpoint(self, step: int, keep: int) -> None:
        """Rename the checkpoint written in :meth:`checkpoint_tmp` into place, point ``latest.json`` at
        it, then remove all but the newest ``keep`` checkpoints (older ones only cost disk)."""
        replace_folder(self.checkpoints, self.checkpoint_tmp(step), self.checkpoint(step))
        self.write_latest(step)
        for old in self.checkpoint_dirs()[:-keep]:
            remove_owned(self.checkpoints, old)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def read_run(run: str | Path) -> dict[str, Any]:
    """``run.json`` of the run folder ``run`` (see :meth:`RunFolder.read_meta`)."""
    return RunFolder(run).read_meta()


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of ``run``'s metrics.jsonl (see :meth:`RunFolder.read_metrics`)."""
    return RunFolder(run).read_metrics()


def has_checkpoint(run: str | Path) -> bool:
    """Whether ``run`` holds a checkpoint or final weights (see :meth:`RunFolder.has_checkpoint`)."""
    return RunFolder(run).has_checkpoint()


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a training run folder an encoder can be rebuilt from (it has a run.json)."""
    return RunFolder(path).meta.is_file()


def run_split(run_dirs: Iterable[str | Path]) -> dict[str, str]:
    """Patient -> split of the first run folder whose run.json records one (empty when none does)."""
    for d in run_dirs:
        split = RunFolder(d).split()
        if split is not None:
            return split
    return {}

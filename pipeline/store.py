"""The Zarr cohort store: layout, atomic slide commits, and a typed read API.

Layout (the contract other modules and users rely on)::

    <store>/                      attrs["hlss"]: schema_version, created, package_version
      patients/<patient_id>/      attrs: label, split (when known)
        slides/<slide_id>/        attrs: status "complete" | "failed", error, source, reader, mpp0, ...
          tiles       (N, T, T, 3) uint8   one tile per chunk, chunks grouped in shards
          coords      (N, 2) int64         level-0 (x, y) of each tile's top-left corner
          tissue      (N,) float32         tissue fraction of each tile
          thumbnail   (h, w, 3) uint8      attrs["scale"]: level-0 px per thumbnail px (x, y)
          tissue_mask (h, w) bool          same pixels as the thumbnail, attrs["scale"]
          features/<name> (N, D) float    one row per tile, aligned with coords; attrs: model,
                                           weights fingerprint, tiles_version (of the tiles it saw)
      _staging/                   slides being written (never read as results)

A slide is written into ``_staging/<token>`` and moved into place with one atomic rename only when
every array and its attributes are written, so a killed run never leaves a slide that looks complete.
Feature arrays take the same path into a committed slide; retiling a slide replaces the whole group,
so features can never be misaligned with the tiles they were computed from.
Different processes write different slides (whole groups, whole shards), so they never share a
chunk or shard. Staging groups of dead writers are removed by the next writer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import zarr

from .ids import validate_id

__all__ = ["SCHEMA_VERSION", "StoreError", "StoreWriter", "StagedSlide", "SlideStore", "SlideRecord", "tiles_version"]

SCHEMA_VERSION = 1
STAGING = "_staging"
_STALE_FOREIGN_S = 24 * 3600


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message names the path."""


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hlss-pipeline")
    except PackageNotFoundError:
        return "0+unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_store_path(path: Path, create: bool) -> None:
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store folder; choose another --store path")
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no such store")
        return
    marker = path / "zarr.json"
    if not marker.exists():
        if any(path.iterdir()):
            raise StoreError(f"{path}: folder exists, is not empty and is not an hlss store; refusing to write into it")
        return
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable zarr.json ({e})") from e
    hlss = meta.get("attributes", {}).get("hlss")
    if meta.get("node_type") != "group" or not isinstance(hlss, dict):
        raise StoreError(f"{path}: a Zarr node but not an hlss store (no 'hlss' attributes)")
    if hlss.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {hlss.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
        )


@dataclass
class StagedSlide:
    """A slide group being written under ``_staging``; move it into place with :meth:`StoreWriter.commit`."""

    token: str
    group: zarr.Group
    path: Path


class StoreWriter:
    """Writes slides into a local store folder. Safe for several processes writing different slides."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().absolute()
        _check_store_path(self.path, create=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "zarr.json").exists():
                hlss = {"schema_version": SCHEMA_VERSION, "created": _now(), "package_version": _package_version()}
                _ensure_group(self.path, {"hlss": hlss})
            _ensure_group(self.path / "patients")
            _ensure_group(self.path / STAGING)
        except PermissionError as e:
            raise StoreError(f"{self.path}: cannot write the store here ({e.strerror})") from e
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the store ({e.strerror or e})") from e

    # -- reading what is there -------------------------------------------------------------
    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a committed slide group, or None if there is none."""
        marker = self._slide_dir(patient_id, slide_id) / "zarr.json"
        try:
            return dict(json.loads(marker.read_text()).get("attributes", {}))
        except (OSError, ValueError):
            return None

    # -- writing ---------------------------------------------------------------------------
    def stage(self) -> StagedSlide:
        """A new, empty staging group owned by this process."""
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        group = zarr.open_group(self.path, mode="a")[STAGING].require_group(token)
        group.attrs["owner"] = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        return StagedSlide(token=token, group=group, path=self.path / STAGING / token)

    def commit(self, staged: StagedSlide, patient_id: str, slide_id: str, patient_attrs: dict[str, Any]) -> None:
        """Move a fully written staged slide to ``patients/<patient>/slides/<slide>`` (atomic rename).

        A previous version of the slide is replaced only after the new one is complete.
        """
        validate_id(patient_id, kind="patient_id")
        validate_id(slide_id, kind="slide_id")
        meta = staged.path / "zarr.json"
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop("owner", None)
        _atomic_write(meta, json.dumps(doc, indent=2))
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        _ensure_group(self.path / "patients" / patient_id, known)
        _ensure_group(self.path / "patients" / patient_id / "slides")
        target = self._slide_dir(patient_id, slide_id)
        for attempt in range(5):
            # move any current version aside, then move the new one in; another writer of the same
            # slide may do the same in between, so either step can find the place changed
            old: Path | None = self.path / STAGING / f"replaced-{staged.token}-{attempt}"
            try:
                os.replace(target, old)
            except FileNotFoundError:
                old = None
            try:
                os.replace(staged.path, target)
                return
            except OSError:
                if attempt == 4:
                    raise
            finally:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)

    def stage_features(self, n: int, dim: int, dtype: str = "float32", chunk_rows: int = 4096) -> zarr.Array:
        """A staged ``(n, dim)`` array to fill block by block, then :meth:`commit_features`."""
        staged = self.stage()
        return staged.group.create_array("values", shape=(n, dim), dtype=dtype,
                                         chunks=(max(1, min(chunk_rows, n)), dim), fill_value=0)

    def commit_features(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                        attrs: dict[str, Any], expect_tiles_version: str) -> None:
        """Move a filled staged feature array to ``<slide>/features/<name>`` (atomic rename).

        Refused if the slide was retiled since its tiles were read (``expect_tiles_version``).
        """
        validate_id(name, kind="feature name")
        staged_dir = _array_dir(array)
        current = self.slide_attrs(patient_id, slide_id)
        if current is None or tiles_version(current) != expect_tiles_version:
            shutil.rmtree(staged_dir.parent, ignore_errors=True)
            raise StoreError(f"{patient_id}/{slide_id}: slide changed while its features were computed; rerun")
        array.update_attributes({**attrs, "tiles_version": expect_tiles_version, "complete": True})
        slide_dir = self._slide_dir(patient_id, slide_id)
        _ensure_group(slide_dir / "features")
        target = slide_dir / "features" / name
        old = self.path / STAGING / f"replaced-{staged_dir.parent.name}"
        try:
            os.replace(target, old)
        except FileNotFoundError:
            old = None
        try:
            os.replace(staged_dir, target)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(staged_dir.parent, ignore_errors=True)

    def discard_array(self, array: zarr.Array) -> None:
        """Drop a staged feature array (and its staging group) without committing it."""
        shutil.rmtree(_array_dir(array).parent, ignore_errors=True)

    def discard(self, staged: StagedSlide) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

    def clean_staging(self) -> list[str]:
        """Remove staging groups left by writers that died (same host: pid gone; other hosts: after 24 h)."""
        removed = []
        staging = self.path / STAGING
        host = socket.gethostname()
        for child in staging.iterdir() if staging.exists() else []:
            if not child.is_dir():
                continue
            owner = _read_owner(child)
            if owner is None:
                stale = time.time() - child.stat().st_mtime > 3600 or child.name.startswith("replaced-")
            elif owner.get("host") == host:
                stale = not _pid_alive(int(owner.get("pid", -1)), float(owner.get("started", 0)))
            else:
                stale = time.time() - float(owner.get("started", 0)) > _STALE_FOREIGN_S
            if stale:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        return removed

    def _slide_dir(self, patient_id: str, slide_id: str) -> Path:
        return self.path / "patients" / patient_id / "slides" / slide_id


def _array_dir(array: zarr.Array) -> Path:
    return Path(str(array.store_path.store.root)) / array.store_path.path


def tiles_version(slide_attrs: dict[str, Any]) -> str:
    """Identity of a committed slide's tiles: tiling parameters, source content and tile count."""
    key = [slide_attrs.get("params_hash"), (slide_attrs.get("source") or {}).get("fingerprint"),
           slide_attrs.get("n_tiles")]
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()


def _read_owner(group_dir: Path) -> dict | None:
    try:
        return json.loads((group_dir / "zarr.json").read_text())["attributes"]["owner"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int, started: float) -> bool:
    """Whether the writer that started at ``started`` (epoch s) as ``pid`` still runs.

    Zombies count as dead (a killed writer's parent may never reap it), and so does a process that
    reused the pid after the writer started.
    """
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started + 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def _ensure_group(path: Path, attrs: dict[str, Any] | None = None) -> None:
    """Make ``path`` a Zarr v3 group holding at least ``attrs``, safely against other processes.

    zarr's ``require_group`` checks, then creates, and fails when another process creates the group
    in between; and it rewrites ``zarr.json`` in place, so a concurrent reader can see half a file.
    Here ``zarr.json`` is only ever replaced whole (write a temporary file, rename over).
    """
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except FileNotFoundError:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    current = doc.setdefault("attributes", {})
    if meta.exists() and all(current.get(k) == v for k, v in (attrs or {}).items()):
        return
    current.update(attrs or {})
    _atomic_write(meta, json.dumps(doc, indent=2))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SlideRecord:
    """One committed slide: its ids and attributes."""

    patient_id: str
    slide_id: str
    attrs: dict[str, Any]

    @property
    def status(self) -> str:
        return self.attrs.get("status", "unknown")

    @property
    def n_tiles(self) -> int:
        return int(self.attrs.get("n_tiles", 0))


class SlideStore:
    """Read access to a cohort store.

    >>> store = SlideStore("cohort.zarr")
    >>> for p in store.patients():
    ...     for s in store.slides(p):
    ...         tiles = store.tiles(p, s)   # zarr.Array (N, T, T, 3) uint8; tiles[i] reads one tile
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        _check_store_path(self.path, create=False)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: not an hlss store (no zarr.json)")
        self.root = zarr.open_group(self.path, mode="r")

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.root.attrs["hlss"])

    def patients(self) -> list[str]:
        return sorted(k for k, _ in self.root["patients"].groups())

    def patient_attrs(self, patient_id: str) -> dict[str, Any]:
        return dict(self.root["patients"][patient_id].attrs)

    def slides(self, patient_id: str, status: str | None = "complete") -> list[str]:
        """Slide ids of a patient; only those with ``status`` unless it is None."""
        group = self.root["patients"][patient_id]
        if "slides" not in group:
            return []
        out = []
        for name, g in group["slides"].groups():
            if status is None or g.attrs.get("status") == status:
                out.append(name)
        return sorted(out)

    def records(self, status: str | None = None) -> Iterator[SlideRecord]:
        """Every committed slide (of ``status`` when given), patient by patient."""
        for p in self.patients():
            for s in self.slides(p, status=status):
                yield SlideRecord(p, s, self.slide_attrs(p, s))

    def group(self, patient_id: str, slide_id: str) -> zarr.Group:
        return self.root["patients"][patient_id]["slides"][slide_id]

    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any]:
        return dict(self.group(patient_id, slide_id).attrs)

    def tiles(self, patient_id: str, slide_id: str) -> zarr.Array:
        """``(N, T, T, 3) uint8`` tiles (lazy: index it to read)."""
        return self.group(patient_id, slide_id)["tiles"]

    def coords(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(N, 2) int64`` level-0 (x, y) of each tile's top-left corner."""
        return self.group(patient_id, slide_id)["coords"][:]

    def tissue(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(N,) float32`` tissue fraction of each tile."""
        return self.group(patient_id, slide_id)["tissue"][:]

    def thumbnail(self, patient_id: str, slide_id: str) -> np.ndarray:
        return self.group(patient_id, slide_id)["thumbnail"][:]

    def tissue_mask(self, patient_id: str, slide_id: str) -> np.ndarray:
        return self.group(patient_id, slide_id)["tissue_mask"][:]

    def feature_names(self, patient_id: str, slide_id: str) -> list[str]:
        """Names of the complete feature arrays of a slide."""
        group = self.group(patient_id, slide_id)
        if "features" not in group:
            return []
        return sorted(n for n, a in group["features"].arrays() if a.attrs.get("complete"))

    def features(self, patient_id: str, slide_id: str, name: str) -> zarr.Array:
        """``(N, D)`` features ``name`` of a slide, row i for tile i (KeyError if absent)."""
        arr = self.group(patient_id, slide_id)["features"][name]
        if not arr.attrs.get("complete"):
            raise KeyError(f"{patient_id}/{slide_id}: features {name!r} are incomplete")
        return arr

    def summary(self) -> dict[str, Any]:
        """Patients, slides, tile counts, failures and the distinct tiling parameters, as plain data."""
        rows, params = [], []
        for rec in self.records(status=None):
            a = rec.attrs
            rows.append({
                "patient": rec.patient_id,
                "slide": rec.slide_id,
                "status": rec.status,
                "n_tiles": rec.n_tiles,
                "mpp0": (a.get("mpp0") or [None])[0],
                "mpp_source": a.get("mpp_source"),
                "level": a.get("level"),
                "label": self.patient_attrs(rec.patient_id).get("label"),
                "error": a.get("error"),
            })
            if rec.status == "complete":
                keys = ("target_mpp", "tile_size", "tile_um", "min_tissue", "mask_mpp", "compression", "tissue_params")
                p = {k: a.get(k) for k in keys}
                if p not in params:
                    params.append(p)
        return {
            "store": self.info,
            "n_patients": len(self.patients()),
            "n_slides": len(rows),
            "n_complete": sum(r["status"] == "complete" for r in rows),
            "n_failed": sum(r["status"] == "failed" for r in rows),
            "n_tiles": sum(r["n_tiles"] for r in rows if r["status"] == "complete"),
            "slides": rows,
            "parameters": params,
        }

"""The Zarr cohort store: layout, safe slide commits, and a typed read API.

Layout (the contract other modules and users rely on)::

    <store>/                      attrs["hlss"]: schema_version, created, package_version
      patients/<patient_id>/      attrs: label, split (when known)
        slides/<slide_id>/        attrs: status "complete" | "failed" ("writing" on an object store
                                  while a commit is under way), error, source, reader, mpp0, ...
          tiles       (N, T, T, 3) uint8   one tile per chunk, chunks grouped in shards
          coords      (N, 2) int64         level-0 (x, y) of each tile's top-left corner
          tissue      (N,) float32         tissue fraction of each tile
          thumbnail   (h, w, 3) uint8      attrs["scale"]: level-0 px per thumbnail px (x, y)
          tissue_mask (h, w) bool          same pixels as the thumbnail, attrs["scale"]
          qc          (H, W, 3) uint8      QC picture: thumbnail (longest side <= 2048 px), tissue mask
                                           outline (pure green), kept tiles (magenta rectangles), caption
                                           band below; attrs: scale (level-0 px per px), size, caption_px.
                                           Also on slides failed for content (no tissue, too small).
          tile_qc/<m> (N,) float32         per-tile QC measures aligned with coords, m in focus, pen,
                                           brightness, saturation (see pipeline.qc); attrs["fields"].
                                           Nothing is deleted: filter with pipeline.qc.TileFilter.
          features/<name> (N, D) float    one row per tile, aligned with coords; attrs: model,
                                           weights fingerprint, tiles_version (of the tiles it saw),
                                           complete (True only once every row is written)
          attributes/<run> (N, A) float32  cosine of each tile's HLSS projection to each attribute text
                                           embedding of run <run> (all levels, columns concatenated);
                                           attrs: levels, names (per column), run, weights_fingerprint,
                                           tiles_version, complete (see hlss_model.explain)
      _staging/                   slides being written (never read as results)

The store is a local or shared folder, or an object store (``s3://bucket/prefix`` and other fsspec
URLs, see :mod:`pipeline.location` for credentials). Either way a slide is first written whole into
``_staging/<token>`` by one process, so writers never share a chunk or a shard, and a previous
version of the slide stays readable (and is kept if the new attempt fails) while the new one is
tiled. Then it is committed:

* **Folder**: one atomic rename moves the staged group into place, so a killed run never leaves a
  slide that looks complete, and readers see the old version or the new one, nothing in between.
  Staging groups of dead writers are removed by the next writer.
* **Object store** (no rename; a single PUT of one object is atomic): the slide's ``zarr.json`` is
  replaced FIRST by a ``status: "writing"`` marker (so an old "complete" never describes half-new
  arrays), the older version's other objects are deleted, the staged objects are copied server-side
  under the final prefix, and the final ``zarr.json`` (status "complete" or "failed") is PUT LAST.
  Feature arrays do the same with an array ``zarr.json`` saying ``complete: false`` until the last
  PUT. Guaranteed: nothing is ever listed complete unless all its objects were written; a killed
  writer leaves at worst a "writing" slide (not listed by ``slides(status="complete")``, retiled by
  the next run because :func:`pipeline.tiler.needs_tiling` only skips "complete") or an incomplete
  feature array (not listed, recomputed), and the rest of the store stays readable. Not guaranteed
  (the trade-off of having no rename): during the short copy the slide is unlisted and its old
  version is already gone, so a writer killed right then loses the old version (the next run retiles
  it); copies cost one request per object (shards keep that small); and two processes committing
  the same slide at once are only detected (a writer that finds another's marker gives up), not
  serialised, so two runs must not tile the same slides into one object store at the same time
  (one run never does). Stale staging prefixes are removed like folders (same host: dead pid;
  other hosts: after 24 h; without owner: objects older than an hour).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
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

from .files import atomic_write_bytes, remove_owned
from .ids import validate_id
from .location import ObjectLocation, StoreError, is_remote, local_path

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "StoreError", "StoreWriter", "StagedSlide", "SlideStore", "SlideRecord", "tiles_version"]

SCHEMA_VERSION = 1
STAGING = "_staging"
_ARRAY_GROUPS = ("features", "attributes")  # slide subgroups written by StoreWriter.commit_features
_STALE_FOREIGN_S = 24 * 3600


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
        raise StoreError(f"{path}: is a file, not a store folder" + ("; choose another --store path" if create else ""))
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no such store")
        return
    marker = path / "zarr.json"
    if not marker.exists():
        if not create:
            raise StoreError(f"{path}: is not an hlss store (no zarr.json with hlss attributes)")
        if any(path.iterdir()):
            raise StoreError(f"{path}: folder exists, is not empty and is not an hlss store; refusing to write into it")
        return
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable zarr.json ({e})") from e
    _check_root_doc(path, meta)


def _check_root_doc(where: Path | str, meta: dict) -> None:
    hlss = meta.get("attributes", {}).get("hlss")
    if meta.get("node_type") != "group" or not isinstance(hlss, dict):
        raise StoreError(f"{where}: a Zarr node but not an hlss store (no 'hlss' attributes)")
    if hlss.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where}: store schema version {hlss.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
        )


def _check_remote_root(loc: ObjectLocation, create: bool) -> dict | None:
    """The root ``zarr.json`` of an object-store location (None: no store there yet, and writable)."""
    meta = loc.read_json("zarr.json")  # a missing bucket or an unreachable endpoint raises here
    if meta is None:
        present = loc.children("")
        if present and not create:
            raise StoreError(f"{loc.url}: is not an hlss store (no zarr.json with hlss attributes)")
        if present:
            raise StoreError(f"{loc.url}: prefix exists, is not empty and is not an hlss store; refusing to "
                             "write into it")
        if not create:
            raise StoreError(f"{loc.url}: no such store")
        return None
    _check_root_doc(loc.url, meta)
    return meta


def _group_doc(attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs or {})}


@dataclass
class StagedSlide:
    """A slide group being written under ``_staging``; move it into place with :meth:`StoreWriter.commit`.

    ``path``: its folder (local store), or its key prefix relative to the store root (object store).
    """

    token: str
    group: zarr.Group
    path: Path | str


class StoreWriter:
    """Writes slides into a store (folder or object-store URL). Safe for several processes writing different slides.

    ``path`` is the folder (:class:`~pathlib.Path`) or the URL (``str``, no credentials in it).
    """

    def __init__(self, path: str | Path) -> None:
        self._remote: ObjectLocation | None = None
        if is_remote(path):
            self._init_remote(str(path))
            return
        self.path: Path | str = local_path(path).absolute()
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

    def _init_remote(self, url: str) -> None:
        loc = self._remote = ObjectLocation(url)
        self.path = loc.url
        if _check_remote_root(loc, create=True) is None:
            hlss = {"schema_version": SCHEMA_VERSION, "created": _now(), "package_version": _package_version()}
            loc.write_json("zarr.json", _group_doc({"hlss": hlss}))
        self._ensure_remote_group("patients")
        self._ensure_remote_group(STAGING)
        self._zstore = loc.zarr_store(read_only=False)

    @property
    def is_remote(self) -> bool:
        """Whether the store is on an object store (no atomic rename; see the module docstring)."""
        return self._remote is not None

    def __repr__(self) -> str:
        return f"StoreWriter({str(self.path)!r})"

    # -- reading what is there -------------------------------------------------------------
    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a committed slide group, or None if there is none."""
        if self._remote is not None:
            doc = self._remote.read_json(f"{_slide_key(patient_id, slide_id)}/zarr.json")
            attrs = (doc or {}).get("attributes")
            return dict(attrs) if isinstance(attrs, dict) else None
        marker = self._slide_dir(patient_id, slide_id) / "zarr.json"
        try:
            return dict(json.loads(marker.read_text()).get("attributes", {}))
        except (OSError, ValueError):
            return None

    # -- writing ---------------------------------------------------------------------------
    def stage(self) -> StagedSlide:
        """A new, empty staging group owned by this process."""
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if self._remote is not None:
            key = f"{STAGING}/{token}"
            owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            self._remote.write_json(f"{key}/zarr.json", _group_doc({"owner": owner}))
            with self._remote.errors("opening a staging group"):
                group = zarr.open_group(store=self._zstore, path=key, mode="r+")
            return StagedSlide(token=token, group=group, path=key)
        path = self.path / STAGING / token
        # the owner is in the group's first zarr.json (one atomic write), so a writer killed at any
        # moment leaves either nothing, a bare folder named after it, or a group that names it
        _ensure_group(path, {"owner": {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}})
        return StagedSlide(token=token, group=zarr.open_group(path, mode="r+"), path=path)

    def commit(self, staged: StagedSlide, patient_id: str, slide_id: str, patient_attrs: dict[str, Any]) -> None:
        """Move a fully written staged slide to ``patients/<patient>/slides/<slide>`` (atomic rename).

        A previous version of the slide is replaced only after the new one is complete.
        """
        validate_id(patient_id, kind="patient_id")
        validate_id(slide_id, kind="slide_id")
        if self._remote is not None:
            self._commit_remote(staged, patient_id, slide_id, patient_attrs)
            return
        meta = staged.path / "zarr.json"
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop("owner", None)
        atomic_write_bytes(meta, json.dumps(doc, indent=2).encode())
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

    def stage_features(self, n: int, dim: int, dtype: str = "float32", chunk_rows: int = 4096,
                       fill_value: float = 0) -> zarr.Array:
        """A staged ``(n, dim)`` array to fill block by block, then :meth:`commit_features`.

        ``fill_value``: what rows never written read as (NaN for tiles left out by a tile filter).
        """
        staged = self.stage()
        return staged.group.create_array("values", shape=(n, dim), dtype=dtype,
                                         chunks=(max(1, min(chunk_rows, n)), dim), fill_value=fill_value)

    def commit_features(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                        attrs: dict[str, Any], expect_tiles_version: str, group: str = "features") -> None:
        """Move a filled staged feature array to ``<slide>/<group>/<name>`` (atomic rename).

        ``group``: ``features`` (encoder features) or ``attributes`` (attribute scores of a run).
        Refused if the slide was retiled since its tiles were read (``expect_tiles_version``).
        """
        if group not in _ARRAY_GROUPS:
            raise ValueError(f"group must be one of {_ARRAY_GROUPS}, got {group!r}")
        validate_id(name, kind="feature name" if group == "features" else "attribute run name")
        if self._remote is not None:
            self._commit_features_remote(array, patient_id, slide_id, name, attrs, expect_tiles_version, group)
            return
        staged_dir = _array_dir(array)
        current = self.slide_attrs(patient_id, slide_id)
        if current is None or tiles_version(current) != expect_tiles_version:
            shutil.rmtree(staged_dir.parent, ignore_errors=True)
            raise StoreError(f"{patient_id}/{slide_id}: slide changed while its features were computed; rerun")
        array.update_attributes({**attrs, "tiles_version": expect_tiles_version, "complete": True})
        slide_dir = self._slide_dir(patient_id, slide_id)
        _ensure_group(slide_dir / group)
        target = slide_dir / group / name
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
        if self._remote is not None:
            self._remove_quietly(_array_key(array).rsplit("/", 1)[0])
            return
        shutil.rmtree(_array_dir(array).parent, ignore_errors=True)

    def discard(self, staged: StagedSlide) -> None:
        if self._remote is not None:
            self._remove_quietly(str(staged.path))
            return
        shutil.rmtree(staged.path, ignore_errors=True)

    def clean_staging(self) -> list[str]:
        """Remove staging groups left by writers that died (same host: pid gone; other hosts: after 24 h)."""
        if self._remote is not None:
            return self._clean_staging_remote()
        removed = []
        staging = self.path / STAGING
        host = socket.gethostname()
        for child in staging.iterdir() if staging.exists() else []:
            if not child.is_dir():
                continue
            owner = None if child.name.startswith("replaced-") else _read_owner(child) or _owner_from_token(child)
            if owner is None:
                stale = time.time() - child.stat().st_mtime > 3600 or child.name.startswith("replaced-")
            elif owner.get("host") == host:
                stale = not _pid_alive(int(owner.get("pid", -1)), float(owner.get("started", 0)))
            else:
                stale = time.time() - float(owner.get("started", 0)) > _STALE_FOREIGN_S
            if stale:
                remove_owned(staging, child.name)  # a link planted in _staging goes, never its target
                removed.append(child.name)
        return removed

    def write_evaluation(self, name: str, result: dict[str, Any]) -> None:
        """Record an evaluation (e.g. a kNN report) as the attributes of ``evaluations/<name>``, replacing any before."""
        validate_id(name, kind="evaluation name")
        if self._remote is not None:  # one PUT of the group's zarr.json: atomic there too
            self._ensure_remote_group("evaluations")
            doc = json.loads(json.dumps(_group_doc({"result": result}), default=str))
            self._remote.write_json(f"evaluations/{name}/zarr.json", doc)
            return
        _ensure_group(self.path / "evaluations")
        group = self.path / "evaluations" / name
        group.mkdir(exist_ok=True)
        atomic_write_bytes(group / "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                            "attributes": {"result": result}}, indent=2,
                                                           default=str).encode())

    def _slide_dir(self, patient_id: str, slide_id: str) -> Path:
        return self.path / "patients" / patient_id / "slides" / slide_id

    # -- object stores (see the module docstring for the protocol) ----------------------------
    def _ensure_remote_group(self, key: str, attrs: dict[str, Any] | None = None) -> None:
        """Make ``key`` a group holding at least ``attrs``: one PUT of its ``zarr.json`` when needed."""
        loc = self._remote
        doc = loc.read_json(f"{key}/zarr.json")
        if doc is not None and doc.get("node_type") == "group":
            current = doc.setdefault("attributes", {})
            if all(current.get(k) == v for k, v in (attrs or {}).items()):
                return
            current.update(attrs or {})
        else:
            doc = _group_doc(attrs)
        loc.write_json(f"{key}/zarr.json", doc)

    def _replace_remote(self, src: str, dst: str, pending: dict, final: dict, token: str) -> bool:
        """Put the objects under ``src`` at ``dst`` (replacing what was there) with ``final`` as its
        ``zarr.json``; ``pending`` (marked with ``writer: token``) describes ``dst`` meanwhile.

        False when another writer's marker replaced ours during the copy: that writer finishes.
        """
        loc = self._remote
        loc.write_json(f"{dst}/zarr.json", pending)  # FIRST: the old version's metadata is gone
        dst_meta, src_meta = loc.key(f"{dst}/zarr.json"), loc.key(f"{src}/zarr.json")
        loc.remove([k for k in loc.find(dst) if k != dst_meta])  # objects of the old version
        base_src, base_dst = loc.key(src), loc.key(dst)
        objects = [k for k in loc.find(src) if k != src_meta]
        loc.copy(objects, [base_dst + k[len(base_src):] for k in objects])
        current = loc.read_json(f"{dst}/zarr.json") or {}
        if (current.get("attributes") or {}).get("writer") != token:
            log.warning("%s: %s was taken over by another writer during the commit; leaving it to that writer",
                        self.path, dst)
            return False
        loc.write_json(f"{dst}/zarr.json", final)  # LAST: the one PUT that makes it complete (or failed)
        return True

    def _commit_remote(self, staged: StagedSlide, patient_id: str, slide_id: str,
                       patient_attrs: dict[str, Any]) -> None:
        loc, key = self._remote, str(staged.path)
        doc = loc.read_json(f"{key}/zarr.json")
        if doc is None:
            raise StoreError(f"{self.path}: staged slide {staged.token} is gone (removed as stale?); rerun")
        doc.setdefault("attributes", {}).pop("owner", None)
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        self._ensure_remote_group(f"patients/{patient_id}", known)
        self._ensure_remote_group(f"patients/{patient_id}/slides")
        pending = _group_doc({"status": "writing", "writer": staged.token, "started": _now()})
        try:
            self._replace_remote(key, _slide_key(patient_id, slide_id), pending, doc, staged.token)
        finally:
            self._remove_quietly(key)

    def _commit_features_remote(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                                attrs: dict[str, Any], expect_tiles_version: str,
                                group: str = "features") -> None:
        loc = self._remote
        key = _array_key(array)
        staged_group = key.rsplit("/", 1)[0]
        try:
            current = self.slide_attrs(patient_id, slide_id)
            if current is None or tiles_version(current) != expect_tiles_version:
                raise StoreError(f"{patient_id}/{slide_id}: slide changed while its features were computed; rerun")
            with loc.errors("writing feature attributes"):
                array.update_attributes({**attrs, "tiles_version": expect_tiles_version, "complete": True})
            final = loc.read_json(f"{key}/zarr.json")
            if final is None:
                raise StoreError(f"{self.path}: staged features {key} are gone (removed as stale?); rerun")
            token = staged_group.rsplit("/", 1)[-1]
            pending = json.loads(json.dumps(final))
            pending["attributes"] = {**pending.get("attributes", {}), "complete": False, "writer": token}
            slide = _slide_key(patient_id, slide_id)
            self._ensure_remote_group(f"{slide}/{group}")
            self._replace_remote(key, f"{slide}/{group}/{name}", pending, final, token)
        finally:
            self._remove_quietly(staged_group)

    def _remove_quietly(self, key: str) -> None:
        try:
            self._remote.remove_tree(key)
        except Exception as e:  # clean-up only: the next clean_staging retries
            log.debug("%s: could not remove %s: %s", self.path, key, type(e).__name__)

    def _clean_staging_remote(self) -> list[str]:
        loc, host, removed = self._remote, socket.gethostname(), []
        for name in loc.children(STAGING):
            if name == "zarr.json":
                continue
            key = f"{STAGING}/{name}"
            owner = ((loc.read_json(f"{key}/zarr.json") or {}).get("attributes") or {}).get("owner")
            if not isinstance(owner, dict):
                objects = loc.find(key, detail=True)
                newest = max((_mtime(info) for info in objects.values()), default=0.0)
                stale = time.time() - newest > 3600
            elif owner.get("host") == host:
                stale = not _pid_alive(int(owner.get("pid", -1)), float(owner.get("started", 0)))
            else:
                stale = time.time() - float(owner.get("started", 0)) > _STALE_FOREIGN_S
            if stale:
                loc.remove_tree(key)
                removed.append(name)
        return removed


def _slide_key(patient_id: str, slide_id: str) -> str:
    return f"patients/{patient_id}/slides/{slide_id}"


def _array_dir(array: zarr.Array) -> Path:
    return Path(str(array.store_path.store.root)) / array.store_path.path


def _array_key(array: zarr.Array) -> str:
    """The key prefix of an array, relative to the store root (object stores)."""
    return array.store_path.path.strip("/")


def _mtime(info: dict) -> float:
    """Last modification (epoch s) of an object from an fsspec listing; now when unknown."""
    for k in ("LastModified", "mtime", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return time.time()


def tiles_version(slide_attrs: dict[str, Any]) -> str:
    """Identity of a committed slide's tiles: tiling parameters, source content and tile count."""
    key = [slide_attrs.get("params_hash"), (slide_attrs.get("source") or {}).get("fingerprint"),
           slide_attrs.get("n_tiles")]
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()


def _owner_from_token(group_dir: Path) -> dict | None:
    """The writer a staging folder is named after (``<host>-<pid>-<hex>``), for one killed before its zarr.json."""
    head, _, _ = group_dir.name.rpartition("-")
    host, _, pid = head.rpartition("-")
    if not host or not pid.isdigit():
        return None
    return {"host": host, "pid": int(pid), "started": group_dir.stat().st_mtime}


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
    atomic_write_bytes(meta, json.dumps(doc, indent=2).encode())


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
        self.is_remote = is_remote(path)
        if self.is_remote:
            loc = ObjectLocation(str(path))
            self.path: Path | str = loc.url
            _check_remote_root(loc, create=False)
            with loc.errors("opening the store"):
                self.root = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r")
            return
        self.path = local_path(path)
        _check_store_path(self.path, create=False)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: not an hlss store (no zarr.json)")
        self.root = zarr.open_group(self.path, mode="r")

    def __repr__(self) -> str:
        return f"SlideStore({str(self.path)!r})"

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
        return self.root[_slide_key(patient_id, slide_id)]  # one metadata read, not one per level

    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any]:
        return dict(self.group(patient_id, slide_id).attrs)

    def tiles(self, patient_id: str, slide_id: str) -> zarr.Array:
        """``(N, T, T, 3) uint8`` tiles (lazy: index it to read)."""
        return self.root[f"{_slide_key(patient_id, slide_id)}/tiles"]

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

    def has_qc(self, patient_id: str, slide_id: str) -> bool:
        """Whether the slide has a QC picture (slides tiled before they existed have none)."""
        return "qc" in self.group(patient_id, slide_id)

    def qc_image(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(H, W, 3) uint8`` QC picture (see :mod:`pipeline.qc`); KeyError if the slide has none."""
        group = self.group(patient_id, slide_id)
        if "qc" not in group:
            raise KeyError(f"{patient_id}/{slide_id}: no QC picture (tiled before QC pictures existed? retile)")
        return group["qc"][:]

    def qc_png(self, patient_id: str, slide_id: str) -> bytes:
        """The QC picture encoded as PNG."""
        from .qc import encode_png

        return encode_png(self.qc_image(patient_id, slide_id))

    def tile_qc(self, patient_id: str, slide_id: str) -> dict[str, np.ndarray]:
        """Per-tile QC measures ``{name: (N,) float32}`` (focus, pen, brightness, saturation).

        Raises :class:`StoreError` for a slide tiled before they were recorded.
        """
        group = self.group(patient_id, slide_id)
        if "tile_qc" not in group:
            raise StoreError(f"{patient_id}/{slide_id}: no per-tile QC measures (tiled by an older version); "
                             "retile (hlss tile --force) to filter on them")
        return {name: arr[:] for name, arr in group["tile_qc"].arrays()}

    def tile_keep(self, patient_id: str, slide_id: str, tile_filter=None) -> np.ndarray:
        """``(N,) bool``: the tiles a :class:`pipeline.qc.TileFilter` keeps (all of them when it is None
        or sets no limit, so stores without ``tile_qc`` still work unless a QC limit is asked for)."""
        n = int(self.slide_attrs(patient_id, slide_id).get("n_tiles", 0))
        if tile_filter is None or not tile_filter.active:
            return np.ones(n, bool)
        needs = tile_filter.needs
        qc: dict[str, np.ndarray] = {}
        if any(k != "tissue" for k in needs):
            qc.update(self.tile_qc(patient_id, slide_id))
        if "tissue" in needs:
            qc["tissue"] = self.tissue(patient_id, slide_id)
        return tile_filter.keep(qc)

    def feature_names(self, patient_id: str, slide_id: str) -> list[str]:
        """Names of the complete feature arrays of a slide."""
        return self._complete_names(patient_id, slide_id, "features")

    def features(self, patient_id: str, slide_id: str, name: str) -> zarr.Array:
        """``(N, D)`` features ``name`` of a slide, row i for tile i (KeyError if absent)."""
        return self._complete_array(patient_id, slide_id, "features", name, "features")

    def attribute_runs(self, patient_id: str, slide_id: str) -> list[str]:
        """Names of the runs with complete attribute scores for a slide (see :mod:`hlss_model.explain`)."""
        return self._complete_names(patient_id, slide_id, "attributes")

    def _complete_names(self, patient_id: str, slide_id: str, kind: str) -> list[str]:
        group = self.group(patient_id, slide_id)
        if kind not in group:
            return []
        return sorted(n for n, a in group[kind].arrays() if a.attrs.get("complete"))

    def _complete_array(self, patient_id: str, slide_id: str, kind: str, name: str, what: str) -> zarr.Array:
        arr = self.group(patient_id, slide_id)[kind][name]
        if not arr.attrs.get("complete"):
            raise KeyError(f"{patient_id}/{slide_id}: {what} {name!r} are incomplete")
        return arr

    def attribute_scores(self, patient_id: str, slide_id: str, run_name: str) -> zarr.Array:
        """``(N, A) float32`` attribute scores of run ``run_name``, row i for tile i; attrs ``levels`` and
        ``names`` give each column (KeyError if absent or incomplete)."""
        return self._complete_array(patient_id, slide_id, "attributes", run_name, "attribute scores")

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """Recorded evaluations by name (see :meth:`StoreWriter.write_evaluation`)."""
        if "evaluations" not in self.root:
            return {}
        return {n: dict(g.attrs).get("result", {}) for n, g in self.root["evaluations"].groups()}

    def summary(self) -> dict[str, Any]:
        """Patients, slides, tile counts, failures and the distinct tiling parameters, as plain data."""
        rows, params = [], []
        labels: dict[str, Any] = {}  # one read of each patient's attributes, not one per slide
        for rec in self.records(status=None):
            a = rec.attrs
            if rec.patient_id not in labels:
                labels[rec.patient_id] = self.patient_attrs(rec.patient_id).get("label")
            rows.append({
                "patient": rec.patient_id,
                "slide": rec.slide_id,
                "status": rec.status,
                "n_tiles": rec.n_tiles,
                "mpp0": (a.get("mpp0") or [None])[0],
                "mpp_source": a.get("mpp_source"),
                "level": a.get("level"),
                "label": labels[rec.patient_id],
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

"""The Zarr cohort store: safe slide commits and a typed read API.

The layout (node names, arrays with their dtypes, shapes and units, slide attributes, schema
versions 1 and 2) is described once, in :mod:`pipeline.layout`; this module writes and reads it.

Whatever cannot be read (a ``zarr.json`` that is missing, truncated or invalid; a chunk that fails
its checksum or does not decode) raises :class:`StoreDamageError` from the :class:`SlideStore`
accessors, and :meth:`SlideStore.records` yields such a slide as a damaged record, so store-wide
commands list it and go on with the rest.

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

The folder behaviour is in :class:`StoreWriter` and :class:`SlideStore`, the object-store one in
their subclasses ``_ObjectStoreWriter`` and ``_ObjectSlideStore``, which ``StoreWriter(url)`` and
``SlideStore(url)`` return: this module is the one place that knows which, and callers ask the
writer or reader (e.g. :meth:`StoreWriter.feature_chunk_rows`) rather than branch on it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from . import layout as L
from .files import atomic_write_bytes, remove_owned, utc_now
from .ids import sanitize_id, validate_id
from .layout import READABLE_SCHEMAS, SCHEMA_VERSION, STAGING
from .location import ObjectLocation, StoreError, is_remote, local_path
from .pooling import POOLED, pool

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "READABLE_SCHEMAS", "StoreError", "StoreDamageError", "StoreWriter", "StagedSlide",
           "SlideStore", "SlideRecord", "CheckedArray", "bad_chunks", "chunk_grid", "create_array", "damage_reason",
           "has_checksums", "tiles_version"]

_ARRAY_GROUPS = L.DERIVED_GROUPS  # slide subgroups written by StoreWriter.commit_features
_STALE_FOREIGN_S = 24 * 3600
_ASIDE_SUFFIX = ".aside"  # note beside a version set aside during a commit: where it came from


def _new_store_attrs() -> dict[str, Any]:
    """The root ``hlss`` attributes of a store created now."""
    return {"schema_version": SCHEMA_VERSION, "created": utc_now(), "package_version": _package_version()}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hlss-pipeline")
    except PackageNotFoundError:
        return "0+unknown"




def _check_store_path(path: Path, create: bool) -> None:
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store folder" + ("; choose another --store path" if create else ""))
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no such store")
        return
    marker = path / L.META
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
    hlss = meta.get("attributes", {}).get(L.ROOT_ATTR)
    if meta.get("node_type") != "group" or not isinstance(hlss, dict):
        raise StoreError(f"{where}: a Zarr node but not an hlss store (no 'hlss' attributes)")
    if hlss.get("schema_version") not in READABLE_SCHEMAS:
        raise StoreError(f"{where}: store schema version {hlss.get('schema_version')} is not supported "
                         f"(this version reads {', '.join(map(str, READABLE_SCHEMAS))})")


def _check_remote_root(loc: ObjectLocation, create: bool) -> dict | None:
    """The root ``zarr.json`` of an object-store location (None: no store there yet, and writable)."""
    meta = loc.read_json(L.META)  # a missing bucket or an unreachable endpoint raises here
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


def create_array(group: zarr.Group, name: str, *, shape: tuple[int, ...], dtype: Any,
                 chunks: tuple[int, ...] | None = None, shards: tuple[int, ...] | None = None,
                 fill_value: Any = None, filters: Any = None, serializer: Any = "auto",
                 compressors: Any = "auto", attrs: dict[str, Any] | None = None) -> zarr.Array:
    """Every array of the store is created here, so none misses its checksum.

    ``compressors`` (bytes-to-bytes codecs; ``"auto"``: Zstd level 1, None: none) get
    :class:`zarr.codecs.Crc32cCodec` appended, so it is the last codec on every stored chunk (with
    ``shards``: on every inner chunk, the shard index having its own crc32c). Every chunk is written,
    even one equal to ``fill_value``, so a missing chunk file is damage, not a hole.
    """
    if compressors == "auto":
        # level 1, not zarr's default (0: zstd's 3): half the CPU on a slide's thumbnail and QC
        # picture (about 20 ms a slide) for 2 % more bytes
        compressors = (ZstdCodec(level=1, checksum=False),)
    elif compressors is None:
        compressors = ()
    elif not isinstance(compressors, (list, tuple)):
        compressors = (compressors,)
    # the attributes go into the array's first zarr.json: no second metadata write
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks or "auto", shards=shards,
                              fill_value=fill_value, filters=filters, serializer=serializer,
                              compressors=(*compressors, Crc32cCodec()), config={"write_empty_chunks": True},
                              attributes=attrs or None)


def has_checksums(array: zarr.Array) -> bool:
    """Whether every stored chunk of ``array`` ends in a crc32c checksum (made by :func:`create_array`)."""
    codecs = array.metadata.codecs
    inner = getattr(codecs[0], "codecs", None) if len(codecs) == 1 else None  # sharding_indexed
    return isinstance((inner or codecs)[-1], Crc32cCodec)


class StoreDamageError(StoreError):
    """Part of a committed slide cannot be read: a ``zarr.json`` or a chunk is damaged.

    ``patient_id``, ``slide_id`` (None: the patient's own metadata), ``array`` (None: the slide's or
    patient's metadata; else its path in the slide, e.g. ``tiles`` or ``features/resnet``), ``path``
    (the file or object), ``problem`` (what is wrong).
    """

    def __init__(self, patient_id: str, slide_id: str | None, array: str | None, path: str, problem: str) -> None:
        self.patient_id, self.slide_id, self.array, self.path, self.problem = patient_id, slide_id, array, path, problem
        where = f"patient {patient_id}" + (f", slide {slide_id}" if slide_id else "")
        what = f"array {array!r}" if array else ("slide metadata" if slide_id else "patient metadata")
        super().__init__(f"{where}: {what} is damaged: {problem} ({path})")


def damage_reason(e: BaseException) -> str:
    """A short account of why a node or chunk could not be read."""
    text = str(e)
    if isinstance(e, ValueError) and "checksum do not match" in text:
        return "checksum mismatch (crc32c): the bytes changed after they were written"
    if isinstance(e, json.JSONDecodeError):
        return f"zarr.json is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    if isinstance(e, (KeyError, FileNotFoundError)):
        return "zarr.json is missing"
    return f"{type(e).__name__}: {text[:300]}"


class CheckedArray:
    """A :class:`zarr.Array` of a committed slide whose reads raise :class:`StoreDamageError`
    (naming patient, slide, array, chunk and file) instead of zarr's or a codec's own error.

    Everything else (``shape``, ``dtype``, ``attrs``, ``chunks``...) is the wrapped array's;
    ``.array`` is the plain zarr array.
    """

    _READS = ("get_basic_selection", "get_orthogonal_selection", "get_coordinate_selection",
              "get_mask_selection", "get_block_selection")

    def __init__(self, array: zarr.Array, store: "SlideStore", patient_id: str, slide_id: str, name: str) -> None:
        self.array, self._store, self._ids, self._name = array, store, (patient_id, slide_id), name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("array", "_store", "_ids", "_name"):  # e.g. while unpickling
            raise AttributeError(attr)
        value = getattr(self.array, attr)
        if attr in self._READS:
            return lambda selection, *a, **k: self._read(value, selection, *a, **k)
        return value

    def __getitem__(self, selection: Any) -> Any:
        return self._read(self.array.__getitem__, selection)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    def __repr__(self) -> str:
        return f"CheckedArray({self.array!r})"

    def _read(self, read: Any, selection: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(selection, *args, **kwargs)
        except (IndexError, TypeError):  # a bad selection is the caller's, not damage
            raise
        except Exception as e:
            raise self._damage(e, _rows(selection, self.array.shape[0] if self.array.ndim else 0)) from e

    def _damage(self, error: BaseException, rows: np.ndarray | None) -> StoreDamageError:
        bad = next(iter(bad_chunks(self.array, rows, limit=1)), None)
        p, s = self._ids
        if bad is None:
            return StoreDamageError(p, s, self._name, self._store.where(self.array.path), damage_reason(error))
        chunk, key, err = bad
        return StoreDamageError(p, s, self._name, self._store.where(f"{self.array.path}/{key}"),
                                f"chunk {chunk}: {damage_reason(err)}")


def _rows(selection: Any, n: int) -> np.ndarray | None:
    """The first-axis indices a selection reads (None: all or unknown)."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, (int, np.integer)):
        return np.array([int(first) % n if n else 0])
    if isinstance(first, slice):
        return np.arange(n)[first]
    if isinstance(first, (list, np.ndarray)) and np.asarray(first).dtype.kind in "iu":
        return np.asarray(first) % n if n else None
    return None


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The coordinates of every chunk of an array of ``shape`` cut in ``chunks``, in C order."""
    return itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks)))


def bad_chunks(array: zarr.Array, rows: np.ndarray | None = None,
               limit: int | None = None) -> Iterator[tuple[tuple[int, ...], str, BaseException]]:
    """``(chunk coords, storage key, error)`` of each (inner) chunk of ``array`` that cannot be read,
    reading the chunks one by one; ``rows``: only the chunks holding these first-axis indices.

    The storage key is the file or object, relative to the array, that holds the chunk: the chunk
    itself, or its shard.
    """
    wanted = None if rows is None or not array.ndim else set((np.asarray(rows) // array.chunks[0]).tolist())
    outer = array.shards or array.chunks
    found = 0
    for coords in chunk_grid(array.shape, array.chunks):
        if wanted is not None and coords[0] not in wanted:
            continue
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks))
        try:
            array[box]
        except Exception as e:
            shard = tuple(i * c // o for i, c, o in zip(coords, array.chunks, outer))
            yield coords, array.metadata.encode_chunk_key(shard), e
            found += 1
            if limit is not None and found >= limit:
                return


@dataclass
class StagedSlide:
    """A slide group being written under ``_staging``; move it into place with :meth:`StoreWriter.commit`.

    ``path``: its folder (local store), or its key prefix relative to the store root (object store).
    """

    token: str
    group: zarr.Group
    path: Path | str


def _kind(cls: type, base: type, remote: type, path: Any) -> type:
    """The class a new ``base(path)`` is: ``remote`` for an object-store URL (unpickling passes no path)."""
    return remote if cls is base and path is not None and is_remote(path) else cls


class StoreWriter:
    """Writes slides into a store (folder or object-store URL). Safe for several processes writing different slides.

    ``path`` is the folder (:class:`~pathlib.Path`) or the URL (``str``, no credentials in it). The
    folder behaviour is here; ``StoreWriter(url)`` is an :class:`_ObjectStoreWriter`, which keeps the
    same interface with the object-store protocol (see the module docstring). Callers never need
    to know which: ask the writer (e.g. :meth:`feature_chunk_rows`).
    """

    is_remote = False
    """Whether the store is on an object store (no atomic rename; see the module docstring)."""

    def __new__(cls, path: str | Path | None = None, *args: Any, **kwargs: Any) -> "StoreWriter":
        return super().__new__(_kind(cls, StoreWriter, _ObjectStoreWriter, path))

    def __init__(self, path: str | Path) -> None:
        self.path: Path | str = local_path(path).absolute()
        _check_store_path(self.path, create=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / L.META).exists():
                _ensure_group(self.path, {L.ROOT_ATTR: _new_store_attrs()})
            _ensure_group(self.path / L.PATIENTS)
            _ensure_group(self.path / STAGING)
        except PermissionError as e:
            raise StoreError(f"{self.path}: cannot write the store here ({e.strerror})") from e
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the store ({e.strerror or e})") from e

    def __repr__(self) -> str:
        return f"StoreWriter({str(self.path)!r})"

    # -- reading what is there -------------------------------------------------------------
    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a committed slide group, or None if there is none."""
        marker = self._slide_dir(patient_id, slide_id) / L.META
        try:
            return dict(json.loads(marker.read_text()).get("attributes", {}))
        except (OSError, ValueError):
            return None

    # -- writing ---------------------------------------------------------------------------
    def stage(self) -> StagedSlide:
        """A new, empty staging group owned by this process."""
        token = _staging_token()
        path = self.path / STAGING / token
        # the owner is in the group's first zarr.json (one atomic write), so a writer killed at any
        # moment leaves either nothing, a bare folder named after it, or a group that names it
        _ensure_group(path, {"owner": _owner()})
        return StagedSlide(token=token, group=zarr.open_group(path, mode="r+"), path=path)

    def commit(self, staged: StagedSlide, patient_id: str, slide_id: str, patient_attrs: dict[str, Any]) -> None:
        """Move a fully written staged slide to ``patients/<patient>/slides/<slide>`` (atomic rename).

        A previous version of the slide is replaced only after the new one is complete.
        """
        validate_id(patient_id, kind="patient_id")
        validate_id(slide_id, kind="slide_id")
        self._commit_slide(staged, patient_id, slide_id, patient_attrs)

    def _commit_slide(self, staged: StagedSlide, patient_id: str, slide_id: str,
                      patient_attrs: dict[str, Any]) -> None:
        meta = staged.path / L.META
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop("owner", None)
        atomic_write_bytes(meta, json.dumps(doc, indent=2).encode())
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        _ensure_group(self.path / L.patient_key(patient_id), known)
        _ensure_group(self.path / L.slides_key(patient_id))
        target = self._slide_dir(patient_id, slide_id)
        for attempt in range(5):
            # move any current version aside, then move the new one in; another writer of the same
            # slide may do the same in between, so either step can find the place changed
            old = self._set_aside(target, f"replaced-{staged.token}-{attempt}")
            try:
                os.replace(staged.path, target)
                return
            except OSError:
                if attempt == 4:
                    raise
            finally:
                if old is not None:
                    self._drop_aside(old)

    def feature_chunk_rows(self, batch_size: int) -> int:
        """Rows per chunk of a staged feature array filled ``batch_size`` rows at a time: one batch
        on an object store (where a partial chunk write re-reads and re-uploads the whole chunk),
        4096 in a folder."""
        return 4096

    def stage_features(self, n: int, dim: int, dtype: str = "float32", chunk_rows: int = 4096,
                       fill_value: float = 0) -> zarr.Array:
        """A staged ``(n, dim)`` array to fill block by block, then :meth:`commit_features`.

        ``fill_value``: what rows never written read as (NaN for tiles left out by a tile filter).
        """
        staged = self.stage()
        return create_array(staged.group, "values", shape=(n, dim), dtype=dtype,
                            chunks=(max(1, min(chunk_rows, n)), dim), fill_value=fill_value)

    def commit_features(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                        attrs: dict[str, Any], expect_tiles_version: str, group: str = L.FEATURES) -> None:
        """Move a filled staged feature array to ``<slide>/<group>/<name>`` (atomic rename).

        ``group``: ``features`` (encoder features) or ``attributes`` (attribute scores of a run).
        Refused if the slide was retiled since its tiles were read (``expect_tiles_version``).
        Encoder features get ``attrs["pooled"]``: the slide's mean and max over the committed rows
        (:mod:`pipeline.pooling`), written in the same metadata document as the array.
        """
        if group not in _ARRAY_GROUPS:
            raise ValueError(f"group must be one of {_ARRAY_GROUPS}, got {group!r}")
        validate_id(name, kind="feature name" if group == L.FEATURES else "attribute run name")
        if group == L.FEATURES:
            attrs = {**attrs, POOLED: pool(array).to_attrs()}
        self._commit_array(array, patient_id, slide_id, name, attrs, expect_tiles_version, group)

    def _commit_array(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                      attrs: dict[str, Any], expect_tiles_version: str, group: str) -> None:
        staged_dir = _array_dir(array)
        current = self.slide_attrs(patient_id, slide_id)
        if current is None or tiles_version(current) != expect_tiles_version:
            shutil.rmtree(staged_dir.parent, ignore_errors=True)
            raise StoreError(f"{patient_id}/{slide_id}: slide changed while its features were computed; rerun")
        array.update_attributes({**attrs, L.TILES_VERSION: expect_tiles_version, L.ARRAY_COMPLETE: True})
        slide_dir = self._slide_dir(patient_id, slide_id)
        _ensure_group(slide_dir / group)
        target = slide_dir / group / name
        old = self._set_aside(target, f"replaced-{staged_dir.parent.name}")
        try:
            os.replace(staged_dir, target)
        finally:
            if old is not None:
                self._drop_aside(old)
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
            if child.name.startswith("replaced-") and child.is_dir() and self._restore_aside(child):
                continue
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
        for note in staging.glob(f"replaced-*{_ASIDE_SUFFIX}") if staging.exists() else []:
            if not note.with_suffix("").exists():
                remove_owned(staging, note.name)  # the note of a swap that finished or was undone
        return removed

    # -- replacing a committed node (local store) --------------------------------------------
    def _set_aside(self, target: Path, name: str) -> Path | None:
        """Move ``target`` to ``_staging/<name>`` before its new version moves in; None if absent.

        A note ``<name>.aside`` written first names where it came from, so a writer killed between
        the two renames leaves something :meth:`_restore_aside` puts back, not a lost version.
        """
        old = self.path / STAGING / name
        note = old.with_name(name + _ASIDE_SUFFIX)
        atomic_write_bytes(note, json.dumps({"target": target.relative_to(self.path).as_posix()}).encode())
        try:
            os.replace(target, old)
        except FileNotFoundError:
            note.unlink(missing_ok=True)
            return None
        return old

    def _drop_aside(self, old: Path) -> None:
        """Remove a version set aside once its replacement is in place, then its note."""
        shutil.rmtree(old, ignore_errors=True)
        old.with_name(old.name + _ASIDE_SUFFIX).unlink(missing_ok=True)

    def _restore_aside(self, old: Path) -> bool:
        """Put a version set aside back where it came from if nothing replaced it (a writer killed
        between the renames of a commit); True if it was restored.

        The note's target is trusted only as ids: each part is validated and the path rebuilt here,
        so a planted note can neither restore outside ``patients/`` nor over an existing node.
        """
        try:
            target = json.loads(old.with_name(old.name + _ASIDE_SUFFIX).read_text())["target"]
            parts = target.split("/")
            if len(parts) not in (4, 6) or parts[0] != L.PATIENTS or parts[2] != L.SLIDES or (
                    len(parts) == 6 and parts[4] not in _ARRAY_GROUPS):
                raise ValueError(target)
            for part in parts[1::2] if len(parts) == 4 else (parts[1], parts[3], parts[5]):
                validate_id(part)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        dest = self.path.joinpath(*parts)
        if dest.exists() or not dest.parent.is_dir():
            return False
        os.replace(old, dest)
        old.with_name(old.name + _ASIDE_SUFFIX).unlink(missing_ok=True)
        log.warning("%s: restored %s, set aside by a writer that stopped before its new version moved in",
                    self.path, target)
        return True

    def write_evaluation(self, name: str, result: dict[str, Any]) -> None:
        """Record an evaluation (e.g. a kNN report) as the attributes of ``evaluations/<name>``, replacing any before."""
        validate_id(name, kind="evaluation name")
        _ensure_group(self.path / L.EVALUATIONS)
        group = self.path / L.evaluation_key(name)
        group.mkdir(exist_ok=True)
        atomic_write_bytes(group / L.META, json.dumps({"zarr_format": 3, "node_type": "group",
                                                            "attributes": {"result": result}}, indent=2,
                                                           default=str).encode())

    def _slide_dir(self, patient_id: str, slide_id: str) -> Path:
        return self.path / L.slide_key(patient_id, slide_id)

    # -- following the manifest (labels, splits, patients) without retiling ----------------------
    def slide_index(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Every committed slide group: ``{slide_id: [(patient_id, attrs), ...]}`` (several patients
        when the store holds a slide id twice). On an object store: one listing per patient and one
        GET per slide, 16 at a time."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for (p, s), attrs in self._slide_docs():
            if attrs is not None:
                out.setdefault(s, []).append((p, attrs))
        return out

    def _slide_docs(self) -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
        """``((patient_id, slide_id), attrs or None)`` of every slide group."""
        pairs = [(d.parent.parent.name, d.name) for d in sorted((self.path / L.PATIENTS).glob(f"*/{L.SLIDES}/*"))
                 if d.is_dir()]
        return [(ps, self.slide_attrs(*ps)) for ps in pairs]

    def derived_sets(self, patient_id: str, slide_id: str) -> list[str]:
        """``features/<name>`` and ``attributes/<run>`` arrays stored with a slide (complete or not):
        what retiling it would make invalid."""
        out = []
        for group in _ARRAY_GROUPS:
            names = self._child_names(L.array_key(patient_id, slide_id, group))
            out += [f"{group}/{n}" for n in sorted(names) if n != L.META]
        return out

    def _child_names(self, key: str) -> list[str]:
        """Names of the nodes under ``key`` (relative to the store root); [] when absent."""
        folder = self.path / key
        return [c.name for c in folder.iterdir() if c.is_dir()] if folder.is_dir() else []

    def update_labels(self, patient_id: str, slide_id: str, patient_attrs: dict[str, Any]) -> None:
        """Set the known (not None) ``label``/``split`` of ``patient_attrs`` on the patient group and on
        the slide's own attributes, rewriting each ``zarr.json`` whole (one atomic write or PUT)."""
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        if not known:
            return
        self._set_labels(patient_id, L.slide_key(patient_id, slide_id), known)

    def _set_labels(self, patient_id: str, key: str, known: dict[str, Any]) -> None:
        _ensure_group(self.path / L.patient_key(patient_id), known)
        _ensure_group(self.path / key, known)

    def move_slide(self, old_patient: str, patient_id: str, slide_id: str, patient_attrs: dict[str, Any]) -> None:
        """Move a committed slide group (tiles, features and all) from ``old_patient`` to ``patient_id``.

        Folder: one atomic rename. Object store (see the module docstring): the old ``zarr.json`` is
        replaced FIRST by a ``status: "moving"`` marker naming the new patient and holding the old
        document (so the slide is never listed complete under both), the objects are copied under the
        new patient with the commit protocol, the old objects are removed LAST. A writer killed before
        the last step leaves the marker: the next run moves the slide again from it (killed during the
        copy) or removes what is left (killed after it, :meth:`remove_move_leftover`).
        """
        validate_id(patient_id, kind="patient_id")
        validate_id(slide_id, kind="slide_id")
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        src, dst = L.slide_key(old_patient, slide_id), L.slide_key(patient_id, slide_id)
        self._move(src, dst, patient_id, known)

    def _move(self, src: str, dst: str, patient_id: str, known: dict[str, Any]) -> None:
        _ensure_group(self.path / L.patient_key(patient_id), known)
        _ensure_group(self.path / L.slides_key(patient_id))
        target = self.path / dst
        if target.exists():
            raise StoreError(f"{self.path}: {dst} already exists; not moving {src} over it")
        os.replace(self.path / src, target)

    def remove_move_leftover(self, old_patient: str, slide_id: str) -> None:
        """Remove what a killed :meth:`move_slide` left under ``old_patient`` (a ``moving`` marker and
        the objects it had already copied to their new patient)."""
        shutil.rmtree(self.path / L.slide_key(old_patient, slide_id))


class _ObjectStoreWriter(StoreWriter):
    """:class:`StoreWriter` of an object-store URL: no rename, so every commit follows the object-store
    protocol of the module docstring (marker FIRST, copy, final ``zarr.json`` LAST)."""

    is_remote = True

    def __init__(self, path: str | Path) -> None:
        loc = self._remote = ObjectLocation(str(path))
        self.path = loc.url
        if _check_remote_root(loc, create=True) is None:
            loc.write_json(L.META, _group_doc({L.ROOT_ATTR: _new_store_attrs()}))
        self._ensure_remote_group(L.PATIENTS)
        self._ensure_remote_group(STAGING)
        self._zstore = loc.zarr_store(read_only=False)

    def feature_chunk_rows(self, batch_size: int) -> int:
        return batch_size  # a partial chunk write re-reads and re-uploads the whole object

    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any] | None:
        doc = self._remote.read_json(f"{L.slide_key(patient_id, slide_id)}/{L.META}")
        attrs = (doc or {}).get("attributes")
        return dict(attrs) if isinstance(attrs, dict) else None

    def stage(self) -> StagedSlide:
        token = _staging_token()
        key = f"{STAGING}/{token}"
        self._remote.write_json(f"{key}/{L.META}", _group_doc({"owner": _owner()}))
        with self._remote.errors("opening a staging group"):
            group = zarr.open_group(store=self._zstore, path=key, mode="r+")
        return StagedSlide(token=token, group=group, path=key)

    def discard_array(self, array: zarr.Array) -> None:
        self._remove_quietly(_array_key(array).rsplit("/", 1)[0])

    def discard(self, staged: StagedSlide) -> None:
        self._remove_quietly(str(staged.path))

    def write_evaluation(self, name: str, result: dict[str, Any]) -> None:
        validate_id(name, kind="evaluation name")
        self._ensure_remote_group(L.EVALUATIONS)
        doc = json.loads(json.dumps(_group_doc({"result": result}), default=str))
        self._remote.write_json(f"{L.evaluation_key(name)}/{L.META}", doc)

    def _slide_docs(self) -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
        """One listing per patient and one GET per slide, 16 at a time."""
        loc = self._remote
        patients = [p for p in loc.children(L.PATIENTS) if p != L.META]
        with ThreadPoolExecutor(16, thread_name_prefix="slide-index") as pool:
            slides = pool.map(lambda p: loc.children(L.slides_key(p)), patients)
            pairs = [(p, s) for p, names in zip(patients, slides) for s in names if s != L.META]
            return list(zip(pairs, pool.map(lambda ps: self.slide_attrs(*ps), pairs)))

    def _child_names(self, key: str) -> list[str]:
        return self._remote.children(key)

    def _set_labels(self, patient_id: str, key: str, known: dict[str, Any]) -> None:
        self._ensure_remote_group(L.patient_key(patient_id), known)
        doc = self._remote.read_json(f"{key}/{L.META}")
        if doc is not None and any((doc.get("attributes") or {}).get(k) != v for k, v in known.items()):
            doc.setdefault("attributes", {}).update(known)
            self._remote.write_json(f"{key}/{L.META}", doc)

    def _move(self, src: str, dst: str, patient_id: str, known: dict[str, Any]) -> None:
        loc, token = self._remote, _staging_token()
        doc = loc.read_json(f"{src}/{L.META}")
        if doc is None:
            raise StoreError(f"{self.path}: {src} is gone; rerun")
        doc = moved_doc(doc.get("attributes") or {}) or doc  # a move killed before: the slide as it was
        marker = {L.STATUS: L.MOVING, "moving_to": patient_id, "writer": token, "started": utc_now(), "moved_doc": doc}
        loc.write_json(f"{src}/{L.META}", _group_doc(marker))
        self._ensure_remote_group(L.patient_key(patient_id), known)
        self._ensure_remote_group(L.slides_key(patient_id))
        pending = _group_doc({L.STATUS: L.WRITING, "writer": token, "started": utc_now()})
        if self._replace_remote(src, dst, pending, doc, token):
            loc.remove_tree(src)

    def remove_move_leftover(self, old_patient: str, slide_id: str) -> None:
        self._remote.remove_tree(L.slide_key(old_patient, slide_id))

    def _ensure_remote_group(self, key: str, attrs: dict[str, Any] | None = None) -> None:
        """Make ``key`` a group holding at least ``attrs``: one PUT of its ``zarr.json`` when needed."""
        loc = self._remote
        doc = loc.read_json(f"{key}/{L.META}")
        if doc is not None and doc.get("node_type") == "group":
            current = doc.setdefault("attributes", {})
            if all(current.get(k) == v for k, v in (attrs or {}).items()):
                return
            current.update(attrs or {})
        else:
            doc = _group_doc(attrs)
        loc.write_json(f"{key}/{L.META}", doc)

    def _replace_remote(self, src: str, dst: str, pending: dict, final: dict, token: str) -> bool:
        """Put the objects under ``src`` at ``dst`` (replacing what was there) with ``final`` as its
        ``zarr.json``; ``pending`` (marked with ``writer: token``) describes ``dst`` meanwhile.

        False when another writer's marker replaced ours during the copy: that writer finishes.
        """
        loc = self._remote
        loc.write_json(f"{dst}/{L.META}", pending)  # FIRST: the old version's metadata is gone
        dst_meta, src_meta = loc.key(f"{dst}/{L.META}"), loc.key(f"{src}/{L.META}")
        loc.remove([k for k in loc.find(dst) if k != dst_meta])  # objects of the old version
        base_src, base_dst = loc.key(src), loc.key(dst)
        objects = [k for k in loc.find(src) if k != src_meta]
        loc.copy(objects, [base_dst + k[len(base_src):] for k in objects])
        current = loc.read_json(f"{dst}/{L.META}") or {}
        if (current.get("attributes") or {}).get("writer") != token:
            log.warning("%s: %s was taken over by another writer during the commit; leaving it to that writer",
                        self.path, dst)
            return False
        loc.write_json(f"{dst}/{L.META}", final)  # LAST: the one PUT that makes it complete (or failed)
        return True

    def _commit_slide(self, staged: StagedSlide, patient_id: str, slide_id: str,
                      patient_attrs: dict[str, Any]) -> None:
        loc, key = self._remote, str(staged.path)
        doc = loc.read_json(f"{key}/{L.META}")
        if doc is None:
            raise StoreError(f"{self.path}: staged slide {staged.token} is gone (removed as stale?); rerun")
        doc.setdefault("attributes", {}).pop("owner", None)
        known = {k: v for k, v in patient_attrs.items() if v is not None}
        self._ensure_remote_group(L.patient_key(patient_id), known)
        self._ensure_remote_group(L.slides_key(patient_id))
        pending = _group_doc({L.STATUS: L.WRITING, "writer": staged.token, "started": utc_now()})
        try:
            self._replace_remote(key, L.slide_key(patient_id, slide_id), pending, doc, staged.token)
        finally:
            self._remove_quietly(key)

    def _commit_array(self, array: zarr.Array, patient_id: str, slide_id: str, name: str,
                      attrs: dict[str, Any], expect_tiles_version: str, group: str) -> None:
        loc = self._remote
        key = _array_key(array)
        staged_group = key.rsplit("/", 1)[0]
        try:
            current = self.slide_attrs(patient_id, slide_id)
            if current is None or tiles_version(current) != expect_tiles_version:
                raise StoreError(f"{patient_id}/{slide_id}: slide changed while its features were computed; rerun")
            with loc.errors("writing feature attributes"):
                array.update_attributes({**attrs, L.TILES_VERSION: expect_tiles_version, L.ARRAY_COMPLETE: True})
            final = loc.read_json(f"{key}/{L.META}")
            if final is None:
                raise StoreError(f"{self.path}: staged features {key} are gone (removed as stale?); rerun")
            token = staged_group.rsplit("/", 1)[-1]
            pending = json.loads(json.dumps(final))
            pending["attributes"] = {**pending.get("attributes", {}), L.ARRAY_COMPLETE: False, "writer": token}
            slide = L.slide_key(patient_id, slide_id)
            self._ensure_remote_group(f"{slide}/{group}")
            self._replace_remote(key, f"{slide}/{group}/{name}", pending, final, token)
        finally:
            self._remove_quietly(staged_group)

    def _remove_quietly(self, key: str) -> None:
        try:
            self._remote.remove_tree(key)
        except Exception as e:  # clean-up only: the next clean_staging retries
            log.debug("%s: could not remove %s: %s", self.path, key, type(e).__name__)

    def clean_staging(self) -> list[str]:
        """Remove staging prefixes of dead writers (same host: pid gone; other hosts: after 24 h;
        without owner: objects older than an hour)."""
        loc, host, removed = self._remote, socket.gethostname(), []
        for name in loc.children(STAGING):
            if name == L.META:
                continue
            key = f"{STAGING}/{name}"
            owner = ((loc.read_json(f"{key}/{L.META}") or {}).get("attributes") or {}).get("owner")
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


def moved_doc(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The slide document a ``moving`` marker (a killed :meth:`StoreWriter.move_slide`) holds, else None."""
    doc = attrs.get("moved_doc") if attrs.get(L.STATUS) == L.MOVING else None
    return doc if isinstance(doc, dict) else None


def _owner() -> dict[str, Any]:
    """Who writes a staging group: host, pid and start time (epoch s), to tell dead writers."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _staging_token() -> str:
    """A new ``_staging`` node name, ``<host>-<pid>-<random hex>``: a valid id whatever the host name,
    and never one of the store's own ``replaced-...`` names there (those are removed as stale)."""
    host = sanitize_id(socket.gethostname())
    host = f"h{host}" if host.startswith("replaced") else host
    return validate_id(f"{host[:100]}-{os.getpid()}-{uuid.uuid4().hex[:12]}", kind="staging token")


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
    key = [slide_attrs.get(L.PARAMS_HASH), (slide_attrs.get(L.SOURCE) or {}).get(L.FINGERPRINT),
           slide_attrs.get(L.N_TILES)]
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
        return json.loads((group_dir / L.META).read_text())["attributes"]["owner"]
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
    meta = path / L.META
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
    """One committed slide: its ids and attributes; ``damage`` when its metadata cannot be read
    (then ``attrs`` is empty and ``status`` is ``"damaged"``)."""

    patient_id: str
    slide_id: str
    attrs: dict[str, Any]
    damage: StoreDamageError | None = None

    @property
    def status(self) -> str:
        return L.DAMAGED if self.damage is not None else self.attrs.get(L.STATUS, "unknown")

    @property
    def n_tiles(self) -> int:
        return int(self.attrs.get(L.N_TILES, 0))


class SlideStore:
    """Read access to a cohort store.

    >>> store = SlideStore("cohort.zarr")
    >>> for rec in store.records(status="complete"):   # damaged slides come too, rec.damage set
    ...     tiles = store.tiles(rec.patient_id, rec.slide_id)   # (N, T, T, 3) uint8; tiles[i] reads one tile

    Every accessor raises :class:`StoreDamageError` (patient, slide, array, file) for what cannot
    be read, and KeyError for what is not there. ``SlideStore(url)`` of an object store is an
    :class:`_ObjectSlideStore` (same interface).
    """

    is_remote = False
    """Whether the store is on an object store."""

    def __new__(cls, path: str | Path | None = None, *args: Any, **kwargs: Any) -> "SlideStore":
        return super().__new__(_kind(cls, SlideStore, _ObjectSlideStore, path))

    def __init__(self, path: str | Path) -> None:
        self.path: Path | str = local_path(path)
        _check_store_path(self.path, create=False)
        if not (self.path / L.META).exists():
            raise StoreError(f"{self.path}: not an hlss store (no zarr.json)")
        self.root = zarr.open_group(self.path, mode="r")

    def __repr__(self) -> str:
        return f"SlideStore({str(self.path)!r})"

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.root.attrs[L.ROOT_ATTR])

    def where(self, key: str) -> str:
        """The file (folder store) or URL (object store) of ``key``, a path relative to the store root."""
        return str(Path(self.path) / key.strip("/"))

    def children(self, key: str) -> list[str]:
        """Names of the nodes under ``key`` as the storage lists them, readable metadata or not."""
        folder = Path(self.path) / key
        return sorted(c.name for c in folder.iterdir() if c.is_dir()) if folder.is_dir() else []

    def node(self, key: str, patient_id: str, slide_id: str | None = None, array: str | None = None):
        """The group or array at ``key``; KeyError if absent, :class:`StoreDamageError` if unreadable."""
        try:
            return self.root[key]
        except KeyError:
            if not self._bare_node(key):
                raise
            error: BaseException = FileNotFoundError(key)  # a folder without its zarr.json
        except Exception as e:
            error = e
        raise StoreDamageError(patient_id, slide_id, array, self.where(f"{key}/{L.META}"), damage_reason(error))

    def _bare_node(self, key: str) -> bool:
        """Whether ``key`` is there without its ``zarr.json`` (a folder; objects have no such state)."""
        return (Path(self.path) / key).is_dir()

    def patients(self) -> list[str]:
        """Every patient id, its metadata readable or not (see :meth:`patient_attrs`)."""
        return self.children(L.PATIENTS)

    def patient_attrs(self, patient_id: str) -> dict[str, Any]:
        return dict(self.node(L.patient_key(patient_id), patient_id).attrs)

    def slides(self, patient_id: str, status: str | None = "complete") -> list[str]:
        """Slide ids of a patient; only those with ``status`` unless it is None (which lists damaged
        slides too: use :meth:`records` to tell them)."""
        return [r.slide_id for r in self.patient_records(patient_id, status)
                if status is None or r.damage is None]

    def records(self, status: str | None = None) -> Iterator[SlideRecord]:
        """Every committed slide (of ``status`` when given), patient by patient; a slide whose metadata
        (or its patient's) cannot be read comes whatever ``status`` asks, with ``damage`` set."""
        for p in self.patients():
            yield from self.patient_records(p, status)

    def patient_records(self, patient_id: str, status: str | None = None) -> Iterator[SlideRecord]:
        """The records of one patient's slides, as :meth:`records` gives them."""
        names = self.children(L.slides_key(patient_id))
        try:
            self.patient_attrs(patient_id)
        except StoreDamageError as damage:
            yield from (SlideRecord(patient_id, s, {}, damage) for s in names)  # no slides: nothing lost
            return
        for s in names:
            try:
                attrs = self.slide_attrs(patient_id, s)
            except StoreDamageError as damage:
                yield SlideRecord(patient_id, s, {}, damage)
                continue
            except KeyError:  # listed, so its zarr.json is what is missing
                key = L.slide_key(patient_id, s)
                where = self.where(f"{key}/{L.META}")
                yield SlideRecord(patient_id, s, {}, StoreDamageError(patient_id, s, None, where, "zarr.json is missing"))
                continue
            if status is None or attrs.get(L.STATUS) == status:
                yield SlideRecord(patient_id, s, attrs)

    def group(self, patient_id: str, slide_id: str) -> zarr.Group:
        return self.node(L.slide_key(patient_id, slide_id), patient_id, slide_id)  # one metadata read

    def slide_attrs(self, patient_id: str, slide_id: str) -> dict[str, Any]:
        return dict(self.group(patient_id, slide_id).attrs)

    def array(self, patient_id: str, slide_id: str, name: str) -> CheckedArray:
        """Array ``name`` of a slide (``tiles``, ``features/<set>``...), lazy, its reads checked."""
        arr = self.node(L.array_key(patient_id, slide_id, name), patient_id, slide_id, name)
        return CheckedArray(arr, self, patient_id, slide_id, name)

    def _read(self, patient_id: str, slide_id: str, name: str) -> np.ndarray:
        return self.array(patient_id, slide_id, name)[...]

    def tiles(self, patient_id: str, slide_id: str):
        """``(N, T, T, 3) uint8`` tiles, a :class:`pipeline.tile_reader.TileArray` (lazy: index it to
        read; first-axis reads by byte ranges)."""
        from .tile_reader import TileArray

        return TileArray(self.array(patient_id, slide_id, L.TILES))

    def coords(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(N, 2) int64`` level-0 (x, y) of each tile's top-left corner."""
        return self._read(patient_id, slide_id, L.COORDS)

    def tissue(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(N,) float32`` tissue fraction of each tile."""
        return self._read(patient_id, slide_id, L.TISSUE)

    def thumbnail(self, patient_id: str, slide_id: str) -> np.ndarray:
        return self._read(patient_id, slide_id, L.THUMBNAIL)

    def tissue_mask(self, patient_id: str, slide_id: str) -> np.ndarray:
        return self._read(patient_id, slide_id, L.TISSUE_MASK)

    def has_qc(self, patient_id: str, slide_id: str) -> bool:
        """Whether the slide has a QC picture (slides tiled before they existed have none)."""
        return L.QC in self.children(L.slide_key(patient_id, slide_id))

    def qc_image(self, patient_id: str, slide_id: str) -> np.ndarray:
        """``(H, W, 3) uint8`` QC picture (see :mod:`pipeline.qc`); KeyError if the slide has none."""
        try:
            return self._read(patient_id, slide_id, L.QC)
        except KeyError:
            raise KeyError(f"{patient_id}/{slide_id}: no QC picture (tiled before QC pictures existed? retile)") from None

    def qc_png(self, patient_id: str, slide_id: str) -> bytes:
        """The QC picture encoded as PNG."""
        from .png import encode_png

        return encode_png(self.qc_image(patient_id, slide_id))

    def tile_qc(self, patient_id: str, slide_id: str) -> dict[str, np.ndarray]:
        """Per-tile QC measures ``{name: (N,) float32}`` (focus, pen, brightness, saturation).

        Raises :class:`StoreError` for a slide tiled before they were recorded.
        """
        names = self.children(L.array_key(patient_id, slide_id, L.TILE_QC))
        if not names:
            raise StoreError(f"{patient_id}/{slide_id}: no per-tile QC measures (tiled by an older version); "
                             "retile (hlss tile --force) to filter on them")
        return {name: self._read(patient_id, slide_id, f"{L.TILE_QC}/{name}") for name in names}

    def tile_keep(self, patient_id: str, slide_id: str, tile_filter=None) -> np.ndarray:
        """``(N,) bool``: the tiles a :class:`pipeline.qc.TileFilter` keeps (all of them when it is None
        or sets no limit, so stores without ``tile_qc`` still work unless a QC limit is asked for)."""
        n = int(self.slide_attrs(patient_id, slide_id).get(L.N_TILES, 0))
        if tile_filter is None or not tile_filter.active:
            return np.ones(n, bool)
        needs = tile_filter.needs
        qc: dict[str, np.ndarray] = {}
        if any(k != L.TISSUE for k in needs):
            qc.update(self.tile_qc(patient_id, slide_id))
        if L.TISSUE in needs:
            qc[L.TISSUE] = self.tissue(patient_id, slide_id)
        return tile_filter.keep(qc)

    def feature_names(self, patient_id: str, slide_id: str) -> list[str]:
        """Names of the complete feature arrays of a slide (a damaged one is left out with a warning;
        :meth:`features` names its damage)."""
        return self._complete_names(patient_id, slide_id, L.FEATURES)

    def features(self, patient_id: str, slide_id: str, name: str) -> CheckedArray:
        """``(N, D)`` features ``name`` of a slide, row i for tile i (KeyError if absent)."""
        return self._complete_array(patient_id, slide_id, L.FEATURES, name, "features")

    def attribute_runs(self, patient_id: str, slide_id: str) -> list[str]:
        """Names of the runs with complete attribute scores for a slide (see :mod:`hlss_model.explain`)."""
        return self._complete_names(patient_id, slide_id, L.ATTRIBUTES)

    def _complete_names(self, patient_id: str, slide_id: str, kind: str) -> list[str]:
        out = []
        for name in self.children(L.array_key(patient_id, slide_id, kind)):
            try:
                if self.array(patient_id, slide_id, f"{kind}/{name}").attrs.get(L.ARRAY_COMPLETE):
                    out.append(name)
            except StoreDamageError as e:  # recomputed by the next extract/explain; verify lists it
                log.warning("%s", e)
            except KeyError:
                continue
        return out

    def _complete_array(self, patient_id: str, slide_id: str, kind: str, name: str, what: str) -> CheckedArray:
        arr = self.array(patient_id, slide_id, f"{kind}/{name}")
        if not arr.attrs.get(L.ARRAY_COMPLETE):
            raise KeyError(f"{patient_id}/{slide_id}: {what} {name!r} are incomplete")
        return arr

    def attribute_scores(self, patient_id: str, slide_id: str, run_name: str) -> CheckedArray:
        """``(N, A) float32`` attribute scores of run ``run_name``, row i for tile i; attrs ``levels`` and
        ``names`` give each column (KeyError if absent or incomplete)."""
        return self._complete_array(patient_id, slide_id, L.ATTRIBUTES, run_name, "attribute scores")

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """Recorded evaluations by name (see :meth:`StoreWriter.write_evaluation`); one whose ``zarr.json``
        cannot be read is left out with a warning naming its file."""
        out = {}
        for name in self.children(L.EVALUATIONS):
            try:
                out[name] = dict(self.root[L.evaluation_key(name)].attrs).get("result", {})
            except Exception as e:  # a record of a past run: never a reason to fail the reader
                log.warning("evaluation %s is unreadable: %s (%s)", name, damage_reason(e),
                            self.where(f"{L.evaluation_key(name)}/{L.META}"))
        return out

    def summary(self) -> dict[str, Any]:
        """Patients, slides, tile counts, failures, damaged slides and the distinct tiling parameters,
        as plain data (a damaged slide's row: status "damaged", its damage as ``error``)."""
        rows, params = [], []
        labels: dict[str, Any] = {}  # one read of each patient's attributes, not one per slide
        features: dict[str, dict[str, Any]] = {}
        attribute_runs: dict[str, int] = {}
        for rec in self.records(status=None):
            a = rec.attrs
            if rec.patient_id not in labels:
                try:
                    labels[rec.patient_id] = self.patient_attrs(rec.patient_id).get("label")
                except StoreDamageError:
                    labels[rec.patient_id] = None
            rows.append({
                "patient": rec.patient_id,
                "slide": rec.slide_id,
                "status": rec.status,
                "n_tiles": rec.n_tiles,
                "mpp0": (a.get("mpp0") or [None])[0],
                "mpp_source": a.get("mpp_source"),
                "level": a.get("level"),
                "label": labels[rec.patient_id],
                "error": str(rec.damage) if rec.damage is not None else a.get("error"),
            })
            if rec.status == "complete" and rec.damage is None:
                self._count_derived(rec.patient_id, rec.slide_id, features, attribute_runs)
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
            "n_damaged": sum(r["status"] == "damaged" for r in rows),
            "n_tiles": sum(r["n_tiles"] for r in rows if r["status"] == "complete"),
            "slides": rows,
            "parameters": params,
            "features": features,
            "attribute_runs": attribute_runs,
            "evaluations": {name: _evaluation_line(r) for name, r in self.evaluations().items()},
        }

    def _count_derived(self, patient_id: str, slide_id: str, features: dict[str, dict[str, Any]],
                       attribute_runs: dict[str, int]) -> None:
        """Add a slide's complete feature sets (slides, dim, model) and attribute runs to the tallies."""
        for name in self.feature_names(patient_id, slide_id):
            entry = features.setdefault(name, {"slides": 0, "dim": None, "model": None})
            entry["slides"] += 1
            try:
                a = self.features(patient_id, slide_id, name).attrs
                entry["dim"], entry["model"] = entry["dim"] or a.get("dim"), entry["model"] or a.get("model")
            except (KeyError, StoreDamageError):
                pass
        for name in self.attribute_runs(patient_id, slide_id):
            attribute_runs[name] = attribute_runs.get(name, 0) + 1


def _evaluation_line(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of a recorded evaluation: features, when, and accuracy / MCA per level."""
    levels = result.get("levels") or {}
    return {"feature": result.get("feature"), "evaluated": result.get("evaluated"),
            **{level: {k: v.get(k) for k in ("accuracy", "mean_class_accuracy", "n")}
               for level, v in levels.items() if isinstance(v, dict)}}


class _ObjectSlideStore(SlideStore):
    """:class:`SlideStore` of an object-store URL: reads through zarr's ``FsspecStore``."""

    is_remote = True

    def __init__(self, path: str | Path) -> None:
        loc = ObjectLocation(str(path))
        self.path = loc.url
        _check_remote_root(loc, create=False)
        with loc.errors("opening the store"):
            self.root = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r")

    def where(self, key: str) -> str:
        return f"{self.path}/{key.strip('/')}"

    def children(self, key: str) -> list[str]:
        async def listing() -> list[str]:
            return [n async for n in self.root.store.list_dir(key.strip("/"))]

        return sorted(n for n in sync(listing()) if n != L.META)

    def _bare_node(self, key: str) -> bool:
        return False

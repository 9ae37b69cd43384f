"""``hlss verify``: read every chunk of every array of every slide, report what is damaged, and with
``--repair`` retile damaged slides from their source.

A slide is damaged when its metadata (or its patient's) cannot be read, an array's ``zarr.json``
cannot be read, a chunk fails its checksum or does not decode, a chunk file of an array written
with checksums is missing (schema 2 writes every chunk, see :mod:`pipeline.store`), an array the
slide's status requires is absent, or a shape or dtype disagrees with the slide's ``n_tiles``.
Arrays without checksums (schema-1 stores) are read too, but a flipped byte in them may decode to
other pixels unseen: they are listed as unchecked.

Repair retiles a damaged slide from ``attrs.source.path`` with the parameters it was tiled with,
through :func:`pipeline.tiler.tile_slide`, only when that file is there with the same fingerprint;
else it says why and leaves the slide as it is. The retiled slide replaces the damaged one only
once it is complete (a failed retile keeps it), and its feature sets and attribute runs, gone with
the old version, are named for re-extraction. Nothing else is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from zarr.core.sync import sync

from . import layout as L
from .store import (CheckedArray, SlideRecord, SlideStore, StoreDamageError, StoreError, bad_chunks, chunk_grid,
                    damage_reason, has_checksums, tiles_version)

__all__ = ["SlideCheck", "VerifyReport", "verify_store", "verify_slide"]

_REQUIRED = {L.COMPLETE: L.REQUIRED_DTYPES}
_PER_TILE = L.PER_TILE  # first axis: one row per tile
_DERIVED = L.DERIVED_GROUPS  # made from the tiles; gone when the slide is retiled
_MAX_PER_ARRAY = 5  # damaged chunks named per array (the rest are counted)


@dataclass
class SlideCheck:
    """What ``verify`` found in one slide. ``damage``: each problem (patient, slide, array, file);
    ``unchecked``: arrays without checksums; ``derived``: its feature sets and attribute runs
    (``features/<name>``, ``attributes/<run>``); ``repair``: what ``--repair`` did, when asked."""

    patient_id: str
    slide_id: str
    status: str
    damage: list[StoreDamageError] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    repair: str | None = None
    repaired: bool = False

    @property
    def damaged(self) -> bool:
        return bool(self.damage)


@dataclass
class VerifyReport:
    store: str
    schema_version: Any
    slides: list[SlideCheck] = field(default_factory=list)

    @property
    def damaged(self) -> list[SlideCheck]:
        return [c for c in self.slides if c.damaged]

    @property
    def exit_code(self) -> int:
        """0 when no slide is damaged (or every damaged one was repaired), else 1."""
        return 1 if any(not c.repaired for c in self.damaged) else 0

    def table(self) -> str:
        """Plain text: one line per problem, then what repair did, then the unchecked arrays."""
        lines = [f"verified {len(self.slides)} slides of {self.store} (schema {self.schema_version}): "
                 f"{len(self.slides) - len(self.damaged)} intact, {len(self.damaged)} damaged"]
        for c in self.damaged:
            lines += [f"  DAMAGED {e}" for e in c.damage]
        for c in self.damaged:
            if c.repair:
                lines.append(f"  {'REPAIRED' if c.repaired else 'NOT REPAIRED'} patient {c.patient_id}, "
                             f"slide {c.slide_id}: {c.repair}")
            elif c.derived:
                lines.append(f"  patient {c.patient_id}, slide {c.slide_id}: retiling it drops "
                             f"{', '.join(c.derived)} (re-extract them after)")
        unchecked = [c for c in self.slides if c.unchecked]
        if unchecked:
            n = sum(len(c.unchecked) for c in unchecked)
            lines.append(f"  note: {n} arrays of {len(unchecked)} slides carry no checksums (written before schema 2): "
                         "a flipped byte in them can go unseen; retile (hlss tile --force) to add them")
        if self.damaged and not any(c.repair for c in self.damaged):
            lines.append(f"  run `hlss verify {self.store} --repair` to retile the damaged slides from their sources")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def problem(e: StoreDamageError) -> dict[str, Any]:
            return {"patient": e.patient_id, "slide": e.slide_id, "array": e.array, "path": e.path,
                    "problem": e.problem}

        return {"store": self.store, "schema_version": self.schema_version, "n_slides": len(self.slides),
                "n_damaged": len(self.damaged),
                "slides": [{"patient": c.patient_id, "slide": c.slide_id, "status": c.status,
                            "damage": [problem(e) for e in c.damage], "unchecked": c.unchecked,
                            "derived": c.derived, "repair": c.repair, "repaired": c.repaired} for c in self.slides]}


def verify_store(store: str | Path | SlideStore, *, repair: bool = False,
                 on_slide: Callable[[SlideCheck], None] | None = None) -> VerifyReport:
    """Check every slide of ``store`` (see the module docstring); ``repair``: retile the damaged ones."""
    st = store if isinstance(store, SlideStore) else SlideStore(store)
    report = VerifyReport(str(st.path), st.info.get("schema_version"))
    for rec in st.records(status=None):
        check = verify_slide(st, rec)
        if repair and check.damaged:
            repair_slide(st, rec, check)
        report.slides.append(check)
        if on_slide:
            on_slide(check)
    return report


def verify_slide(st: SlideStore, rec: SlideRecord) -> SlideCheck:
    """Read every chunk of every array of one slide and check its metadata, shapes and dtypes."""
    check = SlideCheck(rec.patient_id, rec.slide_id, rec.status)
    if rec.damage is not None:
        check.damage.append(rec.damage)
        return check
    p, s = rec.patient_id, rec.slide_id
    present: set[str] = set()
    for name, arr in _arrays(st, p, s, check):
        present.add(name)
        if name.split("/")[0] in _DERIVED:
            check.derived.append(name)
        if not has_checksums(arr.array):
            check.unchecked.append(name)
        check.damage += _layout_problems(st, rec, name, arr)
        check.damage += _chunk_problems(st, p, s, name, arr)
    slide_dir = L.slide_key(p, s)
    for name in sorted(set(_REQUIRED.get(rec.status, {})) - present):
        if not any(e.array == name for e in check.damage):
            check.damage.append(StoreDamageError(p, s, name, st.where(f"{slide_dir}/{name}"),
                                                 f"missing (a {rec.status} slide has one)"))
    return check


def _arrays(st: SlideStore, p: str, s: str, check: SlideCheck) -> Iterator[tuple[str, CheckedArray]]:
    """Every array of a slide, one group level down (``tile_qc/<m>``, ``features/<name>``...);
    what cannot be opened goes to ``check.damage``."""
    base = L.slide_key(p, s)
    for child in st.children(base):
        try:
            node = st.node(f"{base}/{child}", p, s, child)
        except StoreDamageError as e:
            check.damage.append(e)
            continue
        except KeyError:
            check.damage.append(StoreDamageError(p, s, child, st.where(f"{base}/{child}/{L.META}"),
                                                 "zarr.json is missing"))
            continue
        if not hasattr(node, "shape"):  # a group: its arrays
            for sub in st.children(f"{base}/{child}"):
                try:
                    yield f"{child}/{sub}", st.array(p, s, f"{child}/{sub}")
                except StoreDamageError as e:
                    check.damage.append(e)
                except KeyError:
                    check.damage.append(StoreDamageError(p, s, f"{child}/{sub}",
                                                         st.where(f"{base}/{child}/{sub}/{L.META}"),
                                                         "zarr.json is missing"))
            continue
        yield child, CheckedArray(node, st, p, s, child)


def _layout_problems(st: SlideStore, rec: SlideRecord, name: str, arr: CheckedArray) -> list[StoreDamageError]:
    """Shape and dtype against the slide's attributes (derived arrays: only when made from these tiles)."""
    n, out = rec.n_tiles, []
    where = st.where(f"{arr.array.path}/{L.META}")

    def bad(problem: str) -> None:
        out.append(StoreDamageError(rec.patient_id, rec.slide_id, name, where, problem))

    want = _REQUIRED.get(rec.status, {}).get(name)
    if want is not None and np.dtype(arr.dtype) != np.dtype(want):
        bad(f"dtype {arr.dtype}, expected {want}")
    per_tile = name in _PER_TILE or name.startswith(f"{L.TILE_QC}/") or (
        name.split("/")[0] in _DERIVED and arr.attrs.get(L.TILES_VERSION) == tiles_version(rec.attrs))
    if rec.status == L.COMPLETE and per_tile and (not arr.ndim or arr.shape[0] != n):
        bad(f"shape {tuple(arr.shape)}, but the slide has n_tiles {n}")
    tile_size = rec.attrs.get(L.TILE_SIZE)
    if rec.status == L.COMPLETE and name == L.TILES and tuple(arr.shape[1:]) != (tile_size,) * 2 + (3,):
        bad(f"shape {tuple(arr.shape)}, but tiles are {tile_size} px RGB")
    if rec.status == L.COMPLETE and name == L.COORDS and arr.shape[1:] != (2,):
        bad(f"shape {tuple(arr.shape)}, expected (n_tiles, 2)")
    return out


def _expects_every_chunk(name: str, arr: CheckedArray) -> bool:
    """Whether a missing chunk file is damage: arrays written with checksums have every chunk, except
    feature arrays made with a tile filter (chunks of filtered tiles only are never written)."""
    return has_checksums(arr.array) and not (name.split("/")[0] in _DERIVED and arr.attrs.get("tile_filter"))


def _chunk_problems(st: SlideStore, p: str, s: str, name: str, arr: CheckedArray) -> list[StoreDamageError]:
    """Read the array one storage chunk (shard) at a time; name each chunk that fails or is missing."""
    a = arr.array
    if not a.ndim or a.size == 0:
        return []
    outer = a.shards or a.chunks
    every = _expects_every_chunk(name, arr)
    out: list[StoreDamageError] = []
    for coords in chunk_grid(a.shape, outer):
        key = a.metadata.encode_chunk_key(coords)
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, outer, a.shape))
        if every and not sync(st.root.store.exists(f"{a.path}/{key}")):
            out.append(StoreDamageError(p, s, name, st.where(f"{a.path}/{key}"), f"chunk file {key} is missing"))
            continue
        try:
            a[box]
            continue
        except Exception as e:
            first = e
        rows = np.arange(box[0].start, box[0].stop)
        found = [StoreDamageError(p, s, name, st.where(f"{a.path}/{k}"), f"chunk {c}: {damage_reason(err)}")
                 for c, k, err in bad_chunks(a, rows, limit=_MAX_PER_ARRAY - len(out))]
        out += found or [StoreDamageError(p, s, name, st.where(f"{a.path}/{key}"), damage_reason(first))]
        if len(out) >= _MAX_PER_ARRAY:
            break
    return out


# -- repair ---------------------------------------------------------------------------------------


def repair_slide(st: SlideStore, rec: SlideRecord, check: SlideCheck) -> None:
    """Retile a damaged slide from its source, if it is there unchanged; record the outcome in ``check``."""
    from .cohort import SlideSpec
    from .source import same_source, source_info
    from .store import StoreWriter
    from .tiler import tile_slide

    if rec.damage is not None:
        check.repair = ("its metadata cannot be read, so its source is unknown; left as is: rerun "
                        "`hlss tile MANIFEST --store STORE` (it retiles this slide)")
        return
    src = rec.attrs.get("source") or {}
    path = src.get("path")
    if not path or not Path(path).is_file():
        check.repair = f"its source {path or '(not recorded)'} is missing; left as is"
        return
    try:
        now = source_info(path)
    except OSError as e:
        check.repair = f"its source {path} cannot be read ({e.strerror or e}); left as is"
        return
    if not same_source(src, now):
        check.repair = (f"its source {path} changed since it was tiled (size or fingerprint); left as is: "
                        "retile it from the manifest with `hlss tile`")
        return
    try:
        params, mpp = _tiling_params(st, rec)
    except (KeyError, TypeError, ValueError) as e:
        check.repair = f"its tiling parameters cannot be recovered ({e}); left as is"
        return
    try:
        pattrs = st.patient_attrs(rec.patient_id)
    except StoreDamageError:
        pattrs = {}
    spec = SlideSpec(Path(path), rec.patient_id, rec.slide_id, pattrs.get("label"), pattrs.get("split"), mpp)
    result = tile_slide(spec, StoreWriter(st.path), params)
    if result.status != "complete":
        check.repair = f"retiling from {path} failed ({result.error}); the damaged version is kept"
        return
    check.repaired = True
    redo = f"; re-extract {', '.join(check.derived)} (dropped with the damaged version)" if check.derived else ""
    check.repair = f"retiled from {path} ({result.n_tiles} tiles){redo}"


def _tiling_params(st: SlideStore, rec: SlideRecord):
    """The :class:`~pipeline.config.TilingParams` (and manifest mpp) a slide was tiled with, checked
    against its ``params_hash``."""
    from .codecs import TileCompression
    from .config import TilingParams
    from .tissue import TissueParams

    a = rec.attrs
    shard = a.get("n_tiles") or 1
    try:
        shards = st.tiles(rec.patient_id, rec.slide_id).array.shards
        shard = shards[0] if shards else shard
    except (KeyError, StoreError):
        pass
    params = TilingParams(target_mpp=a["target_mpp"], tile_size=a["tile_size"], min_tissue=a["min_tissue"],
                          mask_mpp=a["mask_mpp"], shard_tiles=max(1, min(int(shard), 4096)),
                          compression=TileCompression.from_dict(a["compression"]),
                          tissue=TissueParams(**a["tissue_params"]))
    mpp = a["mpp0"][0] if a.get("mpp_source") == "manifest" else None
    if params.params_hash(mpp) != a.get("params_hash"):
        raise ValueError("they do not reproduce the slide's params_hash")
    return params, mpp

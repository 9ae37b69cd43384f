"""Export stored features as the per-slide bags, slide lists, splits and pooled embeddings that
CLAM and TRIDENT read unchanged.

Bags are named by the slide file's stem (``<name>``: the file name of the slide attrs'
``source.path`` without its extension; ``x.ome.tiff`` gives ``x``, as TRIDENT's ``WSI.name``), so
CLAM's ``create_heatmaps.py`` (``data_dir/<slide_id><slide_ext>``) and TRIDENT's ``Processor``
(``<job_dir>/.../<wsi.name>.h5``) match them to the slide files. A slide without a usable stem
(no source path, a stem shared by two slides of the export, or one a spreadsheet would alter) is
named by its store slide id instead, and listed in the report.

Layout written under ``out``::

    out/
      dataset.csv            case_id,slide_id,label[,split],slide_path,store_slide_id: one row per
                             exported slide; slide_id is <name> (CLAM's Generic_MIL_Dataset finds
                             h5_files/<slide_id>.h5 and pt_files/<slide_id>.pt by it); case_id the
                             patient id; slide_path the source file; also a process list for CLAM's
                             create_heatmaps.py (slide_id, label)
      splits_0.csv           CLAM's split file (",train,val,test": row index, then slide ids per
                             column) from the store's split, when any exported slide has one
      slide_embeddings.h5    mean, max (S, D) float32; tiles (S,) int64; slide_id, store_slide_id,
                             case_id, label, split (S,) UTF-8 strings; row order of dataset.csv
      patient_embeddings.h5  mean, max (P, D) float32; tiles (P,); case_id, label, split (P,)
      h5_files/<name>.h5     layout "clam" (format clam-h5 or both): features (n, D) float32,
                             coords (n, 2) int64 level-0 (x, y), tile_index (n,) int64 (the store row
                             of each bag row); coords attrs patch_size (px at patch_level, CLAM's
                             meaning), patch_level, downsample, tile_size, level_dim,
                             patch_size_level0, footprint_px, target_mpp, mpp0, name, save_path
      pt_files/<name>.pt     layout "clam" (format pt or both): torch.save of the (n, D) tensor
      <mag>x_<T>px_0px_overlap/          layout "trident": TRIDENT's coords_dir for magnification
                                         10 / target_mpp and tile side T (its job_dir layout)
        patches/<name>_patches.h5        coords (n, 2) with TRIDENT's attrs (patch_size = T,
                                         patch_size_level0, level0_magnification = 10 / mpp0,
                                         target_magnification, overlap 0, name, savetodir,
                                         level0_width, level0_height)
        features_<encoder>/<name>.h5     features (n, D), coords (n, 2) (same attrs), tile_index
        slide_features_mean-<encoder>/<name>.h5   features (D,) (the slide's mean), coords

``n`` is the number of the slide's tiles with features: rows that are NaN in the store (tiles a
tile filter left out at extraction) are not in the bags, so no MIL model sees them. Pooled vectors
are the store's (:mod:`pipeline.pooling`), computed for older stores.

Every file is written to a temporary name and renamed into place, so a reader (or a killed run)
never sees half a file, and a rerun replaces the previous export. Files an earlier export wrote
for the slides looked at now that this run does not write again (skipped now, or named otherwise)
are removed and listed, so the folders written agree with ``dataset.csv``; h5 files not marked as
ours (``exported_by``, with ``patient_id``/``slide_id``) are never removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from . import layout as L
from .escape import terminal
from .files import atomic_write, remove_owned, remove_temporaries, spreadsheet_safe, write_csv
from .ids import InvalidIdError, validate_id
from .pooling import POOLED, Pooled, combine, slide_pooled

__all__ = ["FORMATS", "LAYOUTS", "ExportError", "ExportReport", "export_mil", "file_stem", "trident_dir",
           "clam_split"]

FORMATS = ("clam-h5", "pt", "both")
LAYOUTS = ("clam", "trident", "both")
H5_DIR, PT_DIR, CSV_NAME, SPLITS_NAME = "h5_files", "pt_files", "dataset.csv", "splits_0.csv"
SLIDE_EMBEDDINGS, PATIENT_EMBEDDINGS = "slide_embeddings.h5", "patient_embeddings.h5"
EXPORTED_BY = "hlss-pipeline export-mil"
# TRIDENT's compound extensions (trident/IO.py COMPOUND_EXTENSIONS), lower case
_COMPOUND = (".ome.tif", ".ome.tiff", ".ome.zarr")
# the store's split values (pipeline.cohort TRAIN_SPLITS / TEST_SPLITS) as CLAM's three columns
_CLAM_SPLIT = {"train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "heldout": "test", "held_out": "test"}


class ExportError(ValueError):
    """The export cannot be made at all (unknown format, no slide with the features, bad ``out``)."""


@dataclass
class ExportReport:
    """What :func:`export_mil` wrote.

    ``written``: (patient_id, slide_id) exported; ``skipped``: (patient_id, slide_id, reason);
    ``renamed``: (patient_id, slide_id, reason) of slides whose bags are named by slide id, not by
    file stem; ``notes``: facts about the splits; ``removed``: stale files of an earlier export.
    """

    store: str
    feature_name: str
    fmt: str
    out: Path
    written: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    csv_path: Path | None = None
    tiles: int = 0

    @property
    def exit_code(self) -> int:
        """1 when some slides were skipped, else 0 (the status of ``hlss export-mil``)."""
        return 1 if self.skipped else 0

    def table(self) -> str:
        lines = [f"exported features {self.feature_name!r} of {len(self.written)} slides ({self.tiles} tiles) "
                 f"from {self.store} as {self.fmt} to {self.out}; {len(self.skipped)} skipped",
                 f"  slide list: {self.csv_path}"]
        lines += [f"  NOTE {n}" for n in self.notes]
        lines += [f"  NAMED BY SLIDE ID {p}/{s}: {why}" for p, s, why in self.renamed]
        lines += [f"  removed stale {path}" for path in self.removed]
        lines += [f"  SKIPPED {p}/{s}: {why}" for p, s, why in self.skipped]
        return "\n".join(terminal(line) for line in lines)


def _check_trident_name(encoder: str) -> None:
    try:
        validate_id(encoder, kind="TRIDENT encoder name")
    except InvalidIdError as e:
        raise ExportError(str(e)) from e


def _recorded_trident_name(st: Any, candidates: list["_Slide"], features: str) -> str | None:
    """The ``trident_name`` the extraction recorded on the first exported slide's features, if any."""
    for sl in candidates[:1]:
        try:
            return st.features(*sl.key, features).attrs.get("trident_name")
        except Exception:  # a damaged array is reported when its bag is read
            return None
    return None


@dataclass
class _Slide:
    """One slide to export: store keys, slide attrs and the bag name."""

    patient_id: str
    slide_id: str
    attrs: dict[str, Any]
    name: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.patient_id, self.slide_id

    @property
    def source_path(self) -> str:
        return str((self.attrs.get(L.SOURCE) or {}).get("path") or "")


def file_stem(path: str) -> str:
    """A slide file's stem as TRIDENT's ``WSI.name`` has it (trident/IO.py ``splitext``: the last
    extension, or a compound ``.ome.tif(f)``/``.ome.zarr``); ``""`` for no path. URLs work too."""
    name = PurePosixPath(path.replace("\\", "/")).name if path else ""
    for ext in _COMPOUND:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


def trident_dir(attrs: dict[str, Any]) -> str:
    """TRIDENT's coords_dir for a slide: ``<mag>x_<T>px_0px_overlap`` with mag = 10 / target_mpp
    (TRIDENT's WSIPatcher: pixel size = 10 / mag) written as its ``_fmt_mag`` does."""
    return f"{_fmt_mag(10.0 / float(attrs['target_mpp']))}x_{int(attrs[L.TILE_SIZE])}px_0px_overlap"


def _fmt_mag(mag: float) -> str:
    """trident/Processor.py ``run_patching_job._fmt_mag``: integers bare, else ``%g``."""
    return str(int(round(mag))) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"


def _mag_value(mag: float) -> int | float:
    return int(round(mag)) if abs(mag - round(mag)) < 1e-9 else mag


def clam_split(value: Any) -> str | None:
    """The CLAM column (train, val or test) of a store split value (any case), None when unknown."""
    return _CLAM_SPLIT.get(str(value).lower()) if value not in (None, "") else None


def export_mil(store: str | Path, features: str, fmt: str, out: str | Path, *,
               slides: Iterable[tuple[str, str]] | None = None, layout: str = "clam",
               encoder: str | None = None) -> ExportReport:
    """Write the features ``features`` of every slide of ``store`` as MIL bags under ``out``.

    Args:
        store: store folder or URL (read only).
        features: a stored feature name (``<slide>/features/<name>``, (N, D), one row per tile).
        fmt: with the clam layout, ``"clam-h5"`` (``h5_files/<name>.h5``), ``"pt"``
            (``pt_files/<name>.pt``) or ``"both"``.
        out: output folder (created; earlier exports there are replaced slide by slide).
        slides: only these (patient_id, slide_id); default every slide of the store.
        layout: ``"clam"``, ``"trident"`` (TRIDENT's job_dir: ``out`` is the job_dir) or ``"both"``.
        encoder: the encoder name in TRIDENT's folder names (``features_<encoder>``, e.g. ``uni_v1``);
            default: the ``trident_name`` the extraction recorded (registered encoders: TRIDENT's name
            for them), else ``features``, the feature name.

    ``dataset.csv``, ``splits_0.csv`` (when the store has splits) and the slide and patient
    embeddings are always written (see the module docstring). Slides that are not complete, lack
    complete features ``features``, have no tile with features, disagree in row count with their
    coords or in dimension with the other slides, or whose name clashes, are skipped and reported.
    Raises :class:`ExportError` when no slide at all has the features (naming the store, the
    feature name and the names that exist), and :class:`pipeline.store.StoreError` for an
    unreadable store.
    """
    from .store import SlideStore

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if encoder is not None:
        _check_trident_name(encoder)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: is a file, not a folder; choose another --out")
    st = SlideStore(store)
    report = ExportReport(store=str(st.path), feature_name=features, fmt=fmt, out=out)
    clam = layout in ("clam", "both")
    dirs = ([H5_DIR] if clam and fmt in ("clam-h5", "both") else []) + \
           ([PT_DIR] if clam and fmt in ("pt", "both") else [])

    candidates, considered = _candidates(st, features, slides, report)
    _name_bags(candidates, report)
    if encoder is None:  # TRIDENT's own name for a registered encoder (uni -> uni_v1), else the feature name
        encoder = _recorded_trident_name(st, candidates, features) or features
        _check_trident_name(encoder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            (out / d).mkdir(exist_ok=True)
            remove_temporaries(out / d)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export here ({e.strerror or e})") from e

    rows: list[dict[str, str]] = []
    pooled: list[Pooled] = []
    dim: int | None = None
    for sl in candidates:
        bag = _read_bag(st, sl, features, report)
        if bag is None:
            continue
        feats, coords, index, feat_attrs, vectors = bag
        if dim is not None and feats.shape[1] != dim:
            report.skipped.append((*sl.key, f"features {features!r} have {feats.shape[1]} columns, the other "
                                            f"slides {dim}; re-extract"))
            continue
        dim = int(feats.shape[1])
        pattrs = st.patient_attrs(sl.patient_id)
        file_attrs = {"feature_name": features, "patient_id": sl.patient_id, "slide_id": sl.slide_id,
                      **feat_attrs, "source_path": sl.source_path or None, "exported_by": EXPORTED_BY}
        if H5_DIR in dirs:
            path = out / H5_DIR / f"{sl.name}.h5"
            _write_h5(path, {"features": feats, "coords": coords, "tile_index": index},
                      {"coords": _coords_attrs(sl.attrs, sl.name, out), "features": file_attrs}, file_attrs)
            report.files.append(path)
        if PT_DIR in dirs:
            path = out / PT_DIR / f"{sl.name}.pt"
            _write_pt(path, feats)
            report.files.append(path)
        if layout in ("trident", "both"):
            report.files += _write_trident(out, sl, encoder, feats, coords, index, vectors, file_attrs)
        label = pattrs.get("label", sl.attrs.get("label"))
        split = pattrs.get("split", sl.attrs.get("split"))
        rows.append({"case_id": sl.patient_id, "slide_id": sl.name, "label": "" if label is None else str(label),
                     "split": "" if split is None else str(split), "slide_path": sl.source_path,
                     "store_slide_id": sl.slide_id})
        pooled.append(vectors)
        report.written.append(sl.key)
        report.tiles += int(feats.shape[0])

    _remove_stale(out, considered, report, dirs, layout in ("trident", "both"), encoder)
    columns = ["case_id", "slide_id", "label"] + (["split"] if any(r["split"] for r in rows) else []) + \
              ["slide_path", "store_slide_id"]
    report.csv_path = out / CSV_NAME
    write_csv(report.csv_path, columns, ([r[c] for c in columns] for r in rows))
    _write_splits(out, rows, report)
    if rows:
        _write_embeddings(out, rows, pooled, features, dim or 0)
    else:  # an earlier export's vectors would disagree with the empty dataset.csv
        report.removed += [out / n for n in (SLIDE_EMBEDDINGS, PATIENT_EMBEDDINGS) if remove_owned(out, n)]
    return report


def _candidates(st: Any, features: str, slides: Iterable[tuple[str, str]] | None,
                report: ExportReport) -> tuple[list[_Slide], list[_Slide]]:
    """The complete slides with complete features ``features`` (the others are skipped in
    ``report``), and every store slide looked at (for the removal of stale files)."""
    wanted = None if slides is None else {(str(p), str(s)) for p, s in slides}
    candidates: list[_Slide] = []
    considered: list[_Slide] = []
    seen_names: set[str] = set()
    for rec in st.records(status=None):
        key = (rec.patient_id, rec.slide_id)
        if wanted is not None and key not in wanted:
            continue
        considered.append(_Slide(*key, rec.attrs if rec.damage is None else {}))
        if rec.damage is not None:
            report.skipped.append((*key, str(rec.damage)))
            continue
        if rec.status != "complete":
            err = rec.attrs.get("error")
            report.skipped.append((*key, f"slide status {rec.status!r}" + (f": {err}" if err else "")))
            continue
        names = st.feature_names(*key)
        seen_names.update(names)
        if features not in names:
            report.skipped.append((*key, f"no complete features {features!r}"
                                         + (f" (has {', '.join(names)})" if names else " (no features)")))
            continue
        candidates.append(considered[-1])
    if wanted is not None:
        found = {s.key for s in considered}
        report.skipped += [(p, s, "not in the store") for p, s in sorted(wanted - found)]
    if not candidates:
        known = ", ".join(sorted(seen_names)) or "none"
        raise ExportError(f"{st.path}: no slide has complete features {features!r} (feature names in the "
                          f"store: {known}); run `hlss extract --store {st.path} ...` first")
    return candidates, considered


def _usable_stem(stem: str) -> bool:
    """A stem that can name files and stay the same in a CSV cell (no path or control characters)."""
    return bool(stem) and stem not in (".", "..") and spreadsheet_safe(stem) == stem and \
        not any(c in stem for c in "/\\\0\r\n\t")


def _name_bags(candidates: list[_Slide], report: ExportReport) -> None:
    """Set each slide's bag name: its file stem, else (no source path, a stem shared with another
    slide of the export, compared case-insensitively as on macOS/Windows file systems, or a stem a
    spreadsheet alters) its store slide id, recorded in ``report.renamed``; a slide whose name
    still clashes with another slide's is dropped from ``candidates`` and skipped."""
    stems = {sl.key: file_stem(sl.source_path) for sl in candidates}
    owners: dict[str, list[_Slide]] = {}
    for sl in candidates:
        owners.setdefault(stems[sl.key].lower(), []).append(sl)
    for sl in candidates:
        stem = stems[sl.key]
        if not sl.source_path:
            why = "no source path in the slide's attributes"
        elif not _usable_stem(stem):
            why = f"file stem {stem!r} cannot name a file and a CSV cell unchanged"
        elif len(owners[stem.lower()]) > 1:
            others = ", ".join(f"{o.patient_id}/{o.slide_id}" for o in owners[stem.lower()] if o is not sl)
            why = f"file stem {stem!r} is also the stem of {others} (file names would clash)"
        else:
            sl.name = stem
            continue
        sl.name = sl.slide_id
        report.renamed.append((*sl.key, why))
    taken: dict[str, _Slide] = {}
    kept = []
    for sl in candidates:
        other = taken.get(sl.name.lower())
        if other is not None:
            report.skipped.append((*sl.key, f"bag name {sl.name!r} is already used by {other.patient_id}/"
                                            f"{other.slide_id} (file names would clash)"))
            continue
        taken[sl.name.lower()] = sl
        kept.append(sl)
    candidates[:] = kept


def _read_bag(st: Any, sl: _Slide, features: str, report: ExportReport
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], Pooled] | None:
    """A slide's bag: features (n, D) float32 and coords (n, 2) int64 of its tiles with features,
    their store rows (n,), the feature array's attributes and its pooled vectors; None (skipped in
    ``report``) when damaged, empty or misaligned."""
    from .store import StoreDamageError

    try:
        arr = st.features(sl.patient_id, sl.slide_id, features)
        coords = np.asarray(st.coords(sl.patient_id, sl.slide_id), dtype=np.int64)
        values = np.asarray(arr[:])
    except StoreDamageError as e:  # this slide only; the message names patient, slide, array, file
        report.skipped.append((*sl.key, str(e)))
        return None
    n = int(coords.shape[0])
    if n == 0:
        report.skipped.append((*sl.key, "no tiles"))
        return None
    if values.ndim != 2 or values.shape[0] != n:
        report.skipped.append((*sl.key, f"features {features!r} have shape {tuple(values.shape)}, "
                                        f"coords ({n}, 2): not aligned; re-extract"))
        return None
    index = np.flatnonzero(~np.isnan(values).any(axis=1)).astype(np.int64)
    if len(index) == 0:
        report.skipped.append((*sl.key, f"every row of features {features!r} is NaN (all {n} tiles left out "
                                        f"by the extraction's tile filter)"))
        return None
    feats = np.ascontiguousarray(values[index], dtype=np.float32)
    feat_attrs = {k: v for k, v in dict(arr.attrs).items() if k not in (L.ARRAY_COMPLETE, POOLED)}
    return feats, coords[index], index, feat_attrs, slide_pooled(arr, values)


def _coords_attrs(attrs: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    """CLAM's attributes of ``coords`` (patch_size, patch_level, downsample, level_dim, name,
    save_path) plus TRIDENT's patch_size_level0 and the store's resolution facts."""
    level = int(attrs.get("level") or 0)
    down = [float(v) for v in (attrs.get("downsample") or [1.0, 1.0])]
    footprint = [float(v) for v in (attrs.get("footprint_px") or [])]
    tile_size = int(attrs["tile_size"])
    # CLAM's patch_size is the side read at patch_level (its extract_features_fp reads
    # read_region(coord, patch_level, (patch_size, patch_size)) and heatmaps take patch_size *
    # level downsample as the level-0 extent): the tile's footprint at the level it was read from.
    # It equals tile_size unless the tiles were resampled to target_mpp (then tile_size says the
    # stored side, patch_size_level0 the level-0 side).
    at_level = int(round(footprint[0] / down[0])) if footprint else tile_size
    out_attrs: dict[str, Any] = {
        "patch_size": at_level,
        "tile_size": tile_size,
        "patch_level": level,
        "downsample": down,
        "name": name,
        "save_path": str(out / H5_DIR),
        "target_mpp": attrs.get("target_mpp"),
        "mpp0": attrs.get("mpp0"),
    }
    if footprint:
        out_attrs["patch_size_level0"] = int(round(footprint[0]))
        out_attrs["footprint_px"] = footprint
    dims = attrs.get("dimensions")
    if dims:
        out_attrs["level_dim"] = [int(round(d / f)) for d, f in zip(dims, down)]
    return out_attrs


def _trident_coords_attrs(attrs: dict[str, Any], name: str, coords_dir: Path) -> dict[str, Any]:
    """The ``coords`` attributes TRIDENT's coords_to_h5 (trident/IO.py) writes and its
    extract_patch_features reads: patch_size at target_magnification, level-0 facts, overlap 0.
    Magnifications are 10 / mpp (TRIDENT's rule), so its WSIPatcher re-reads exactly our tiles'
    level-0 footprint (round(patch_size * level0_magnification / target_magnification))."""
    tile_size = int(attrs[L.TILE_SIZE])
    src_mag = 10.0 / float(attrs["mpp0"][0])
    footprint = attrs.get("footprint_px") or [tile_size * float(attrs["target_mpp"]) / float(attrs["mpp0"][0])]
    width, height = (int(v) for v in attrs["dimensions"])
    return {"patch_size": tile_size, "patch_size_level0": int(round(float(footprint[0]))),
            "level0_magnification": _mag_value(src_mag),
            "target_magnification": _mag_value(10.0 / float(attrs["target_mpp"])),
            "overlap": 0, "name": name, "savetodir": str(coords_dir),
            "level0_width": width, "level0_height": height}


def _trident_paths(out: Path, attrs: dict[str, Any], name: str, encoder: str) -> list[Path]:
    """The files of TRIDENT's layout for a bag ``name``: patches, patch features, mean slide features."""
    base = out / trident_dir(attrs)
    return [base / "patches" / f"{name}_patches.h5", base / f"features_{encoder}" / f"{name}.h5",
            base / f"slide_features_mean-{encoder}" / f"{name}.h5"]


def _write_trident(out: Path, sl: _Slide, encoder: str, feats: np.ndarray, coords: np.ndarray,
                   index: np.ndarray, vectors: Pooled, file_attrs: dict[str, Any]) -> list[Path]:
    """A slide's files in TRIDENT's job_dir layout (see the module docstring)."""
    patches, patch_feats, slide_feats = _trident_paths(out, sl.attrs, sl.name, encoder)
    cattrs = _trident_coords_attrs(sl.attrs, sl.name, patches.parent.parent)
    for path in (patches, patch_feats, slide_feats):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(path.parent)
    _write_h5(patches, {"coords": coords}, {"coords": cattrs}, file_attrs)
    _write_h5(patch_feats, {"features": feats, "coords": coords, "tile_index": index},
              {"coords": cattrs, "features": {"name": sl.name, "savetodir": str(patch_feats.parent),
                                              "encoder": encoder}}, file_attrs)
    _write_h5(slide_feats, {"features": vectors.mean, "coords": coords},
              {"coords": cattrs, "features": {"name": sl.name, "savetodir": str(slide_feats.parent)}}, file_attrs)
    return [patches, patch_feats, slide_feats]


def _remove_stale(out: Path, considered: list[_Slide], report: ExportReport, dirs: list[str],
                  trident: bool, encoder: str) -> None:
    """Remove what an earlier export wrote for the slides looked at now and this run did not write
    again (skipped now, named otherwise, or retiled to another TRIDENT coords_dir), in the folders
    of the layout written now: h5 files marked as ours whose ``patient_id``/``slide_id`` attributes
    name such a slide, and ``pt_files/<name>.pt`` of their names, stems and slide ids."""
    keys = {sl.key for sl in considered}
    written = set(report.files)
    folders = [out / H5_DIR] if H5_DIR in dirs else []
    if trident:
        for base in sorted(out.glob("*x_*px_*px_overlap")):
            folders += [base / "patches", base / f"features_{encoder}", base / f"slide_features_mean-{encoder}"]
    stale_names = {n for sl in considered for n in (file_stem(sl.source_path), sl.slide_id)}
    for folder in folders:
        for path in sorted(folder.glob("*.h5")):
            if path not in written and _owner(path) in keys and remove_owned(out, path.relative_to(out)):
                report.removed.append(path)
                stale_names.add(path.stem)
    if PT_DIR in dirs:
        for name in sorted(stale_names - {p.stem for p in written if p.suffix == ".pt"} - {""}):
            path = out / PT_DIR / f"{name}.pt"
            if remove_owned(out, path.relative_to(out)):
                report.removed.append(path)


def _owner(path: Path) -> tuple[str, str] | None:
    """(patient_id, slide_id) of an h5 file this export wrote (``exported_by``), else None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("exported_by") != EXPORTED_BY:
                return None
            return str(f.attrs.get("patient_id")), str(f.attrs.get("slide_id"))
    except OSError:
        return None


def _write_splits(out: Path, rows: list[dict[str, str]], report: ExportReport) -> None:
    """CLAM's ``splits_0.csv`` from the store's split (when any exported slide has one): columns
    train, val, test of slide ids after a row index, as create_splits_seq.py's save_splits writes
    and Generic_MIL_Dataset.return_splits(from_id=False) reads (shorter columns padded empty)."""
    path = out / SPLITS_NAME
    if not any(r["split"] for r in rows):
        if path.exists() and remove_owned(out, SPLITS_NAME):
            report.removed.append(path)
        return
    columns: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    unsplit = 0
    for r in rows:
        col = clam_split(r["split"])
        if col is None:
            unsplit += 1
        else:
            columns[col].append(r["slide_id"])
    if unsplit:
        report.notes.append(f"{unsplit} exported slides have no split: they are in dataset.csv but in no "
                            f"column of {SPLITS_NAME}")
    if not columns["val"]:
        report.notes.append(f"no slide has split val: the val column of {SPLITS_NAME} is empty (CLAM's main.py "
                            "needs a validation set; give some patients split=val in the manifest)")
    length = max(len(v) for v in columns.values())
    table = ([str(i)] + [v[i] if i < len(v) else "" for v in columns.values()] for i in range(length))
    write_csv(path, ["", *columns], table)


def _write_embeddings(out: Path, rows: list[dict[str, str]], pooled: list[Pooled], features: str,
                      dim: int) -> None:
    """``slide_embeddings.h5`` (rows of dataset.csv) and ``patient_embeddings.h5`` (each patient's
    slides combined: tile-weighted mean, max)."""
    meta = {"feature_name": features, "dim": dim, "exported_by": EXPORTED_BY,
            "pooling": "mean and max over the tiles with features (no NaN row)"}
    _write_table(out / SLIDE_EMBEDDINGS, pooled,
                 {k: [r[k] for r in rows] for k in ("slide_id", "store_slide_id", "case_id", "label", "split")},
                 meta)
    patients: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        patients.setdefault(r["case_id"], []).append(i)
    combined = [combine([pooled[i] for i in idx]) for idx in patients.values()]
    first = [rows[idx[0]] for idx in patients.values()]
    _write_table(out / PATIENT_EMBEDDINGS, combined,
                 {"case_id": list(patients), "label": [r["label"] for r in first],
                  "split": [r["split"] for r in first]},
                 {**meta, "pooling": "tiles-weighted mean of the patient's slide means, max of their maxes"})


def _write_table(path: Path, pooled: list[Pooled], columns: dict[str, list[str]], meta: dict[str, Any]) -> None:
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("mean", data=np.stack([p.mean for p in pooled]).astype(np.float32))
            f.create_dataset("max", data=np.stack([p.max for p in pooled]).astype(np.float32))
            f.create_dataset("tiles", data=np.asarray([p.rows for p in pooled], dtype=np.int64))
            for name, values in columns.items():
                f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=h5py.string_dtype())
            _set_attrs(f, meta)

    atomic_write(path, write)


def _h5_value(v: Any) -> Any:
    """An attribute value HDF5 can hold (None: leave it out)."""
    if v is None:
        return None
    if isinstance(v, (bool, int, float, str, np.generic)):
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v)
    return json.dumps(v, default=str)


def _set_attrs(obj: Any, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        v = _h5_value(v)
        if v is not None:
            obj.attrs[k] = v


def _write_h5(path: Path, datasets: dict[str, np.ndarray], dataset_attrs: dict[str, dict[str, Any]],
              file_attrs: dict[str, Any]) -> None:
    """``datasets`` (name -> array) with their attributes, and file attributes, atomically."""
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                _set_attrs(f.create_dataset(name, data=data), dataset_attrs.get(name, {}))
            _set_attrs(f, file_attrs)

    atomic_write(path, write)


def _write_pt(path: Path, feats: np.ndarray) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(torch.from_numpy(feats), tmp))

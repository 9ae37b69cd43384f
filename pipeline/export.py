"""Export stored features as the per-slide bags that CLAM- and TRIDENT-style MIL tools read.

Layout written under ``out`` (the one CLAM's ``extract_features_fp.py`` writes and its
``Generic_MIL_Dataset`` reads, and TRIDENT's per-slide feature files)::

    out/
      h5_files/<slide_id>.h5      format "clam-h5" (or "both")
          features  (N, D) float32   row i: the features of tile i
          coords    (N, 2) int64     level-0 pixel (x, y) of tile i's top-left corner
                    attrs: patch_size (tile side in px at patch_level, CLAM's meaning), patch_level
                    (pyramid level the tiles were read from), downsample (x, y) of that level,
                    tile_size (tile side in px as stored, at target_mpp; differs from patch_size
                    only when the tiles were resampled),
                    level_dim (w, h) of that level, patch_size_level0 (tile side in level-0 px),
                    footprint_px (x, y level-0 px), target_mpp (µm/px of the tiles), mpp0, name,
                    save_path
          file attrs (and on ``features``): feature_name, patient_id, slide_id, model,
                    weights_fingerprint, dim, ... (the feature array's attributes)
      pt_files/<slide_id>.pt      format "pt" (or "both"): ``torch.save`` of the (N, D) float32 tensor
      dataset.csv                 case_id,slide_id,label[,split] - one row per exported slide

``dataset.csv`` uses CLAM's column names (``case_id`` is the patient id); CLAM maps ``label``
strings to class indices through its ``label_dict``. Slide ids name the files, so they must be
unique across the cohort (a clash is skipped and reported).

Every file is written to a temporary name and renamed into place, so a reader (or a killed run)
never sees half a file, and a rerun replaces the previous export. Files of slides that are skipped
on a rerun (e.g. retiled since, so their features are gone) are removed, so the folder always
agrees with ``dataset.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import layout
from .escape import terminal
from .files import atomic_write, remove_owned, remove_temporaries, write_csv

__all__ = ["FORMATS", "ExportError", "ExportReport", "export_mil"]

FORMATS = ("clam-h5", "pt", "both")
H5_DIR, PT_DIR, CSV_NAME = "h5_files", "pt_files", "dataset.csv"


class ExportError(ValueError):
    """The export cannot be made at all (unknown format, no slide with the features, bad ``out``)."""


@dataclass
class ExportReport:
    """What :func:`export_mil` wrote.

    ``written``: (patient_id, slide_id) exported; ``skipped``: (patient_id, slide_id, reason).
    """

    store: str
    feature_name: str
    fmt: str
    out: Path
    written: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
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
        lines += [f"  SKIPPED {p}/{s}: {why}" for p, s, why in self.skipped]
        return "\n".join(terminal(line) for line in lines)


def export_mil(store: str | Path, features: str, fmt: str, out: str | Path, *,
               slides: Iterable[tuple[str, str]] | None = None) -> ExportReport:
    """Write the features ``features`` of every slide of ``store`` as MIL bags under ``out``.

    Args:
        store: store folder or URL (read only).
        features: a stored feature name (``<slide>/features/<name>``, (N, D), one row per tile).
        fmt: ``"clam-h5"`` (``h5_files/<slide_id>.h5``: ``features`` (N, D) float32 and ``coords``
            (N, 2) int64 level-0 px), ``"pt"`` (``pt_files/<slide_id>.pt``: a (N, D) float32
            tensor) or ``"both"``. ``dataset.csv`` (``case_id,slide_id,label[,split]``) always.
        out: output folder (created; earlier exports there are replaced slide by slide).
        slides: only these (patient_id, slide_id); default every slide of the store.

    Slides that are not complete, lack complete features ``features``, have no tiles, disagree in
    row count with their coords, or share a slide id with an earlier patient are skipped and
    reported. Raises :class:`ExportError` when no slide at all has the features (naming the store,
    the feature name and the names that exist), and :class:`pipeline.store.StoreError` for an
    unreadable store.
    """
    from .store import SlideStore, StoreDamageError

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: is a file, not a folder; choose another --out")
    st = SlideStore(store)
    report = ExportReport(store=str(st.path), feature_name=features, fmt=fmt, out=out)
    dirs = ([H5_DIR] if fmt in ("clam-h5", "both") else []) + ([PT_DIR] if fmt in ("pt", "both") else [])

    wanted = None if slides is None else {(str(p), str(s)) for p, s in slides}
    candidates: list[tuple[str, str, dict[str, Any]]] = []
    seen_names: set[str] = set()
    for rec in st.records(status=None):
        key = (rec.patient_id, rec.slide_id)
        if wanted is not None and key not in wanted:
            continue
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
        candidates.append((*key, rec.attrs))
    if wanted is not None:
        found = {(p, s) for p, s, _ in candidates} | {(p, s) for p, s, _ in report.skipped}
        report.skipped += [(p, s, "not in the store") for p, s in sorted(wanted - found)]
    if not candidates:
        known = ", ".join(sorted(seen_names)) or "none"
        raise ExportError(f"{st.path}: no slide has complete features {features!r} (feature names in the "
                          f"store: {known}); run `hlss extract --store {st.path} ...` first")

    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            (out / d).mkdir(exist_ok=True)
            remove_temporaries(out / d)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export here ({e.strerror or e})") from e

    owner: dict[str, str] = {}
    rows: list[dict[str, str]] = []
    for p, s, attrs in candidates:
        if s in owner:
            report.skipped.append((p, s, f"slide id also used by patient {owner[s]!r} (file names would clash)"))
            continue
        owner[s] = p
        try:
            feats_arr = st.features(p, s, features)
            coords = np.asarray(st.coords(p, s), dtype=np.int64)
            feats = np.ascontiguousarray(feats_arr[:], dtype=np.float32)
        except StoreDamageError as e:  # this slide only; the message names patient, slide, array, file
            report.skipped.append((p, s, str(e)))
            continue
        n = int(coords.shape[0])
        if n == 0:
            report.skipped.append((p, s, "no tiles"))
            continue
        if feats_arr.ndim != 2 or feats_arr.shape[0] != n:
            report.skipped.append((p, s, f"features {features!r} have shape {tuple(feats_arr.shape)}, "
                                         f"coords ({n}, 2): not aligned; re-extract"))
            continue
        feat_attrs = {k: v for k, v in dict(feats_arr.attrs).items() if k != layout.ARRAY_COMPLETE}
        pattrs = st.patient_attrs(p)
        if fmt in ("clam-h5", "both"):
            path = out / H5_DIR / f"{s}.h5"
            _write_h5(path, feats, coords, _coords_attrs(attrs, s, out),
                      {"feature_name": features, "patient_id": p, "slide_id": s, **feat_attrs,
                       "source_path": (attrs.get("source") or {}).get("path"),
                       "exported_by": "hlss-pipeline export-mil"})
            report.files.append(path)
        if fmt in ("pt", "both"):
            path = out / PT_DIR / f"{s}.pt"
            _write_pt(path, feats)
            report.files.append(path)
        label = pattrs.get("label", attrs.get("label"))
        split = pattrs.get("split", attrs.get("split"))
        rows.append({"case_id": p, "slide_id": s, "label": "" if label is None else str(label),
                     "split": "" if split is None else str(split)})
        report.written.append((p, s))
        report.tiles += n

    exported = set(owner)
    for p, s, why in report.skipped:
        # a previous export of a store slide skipped now would disagree with dataset.csv
        if s not in exported and why != "not in the store":
            for d, ext in ((H5_DIR, ".h5"), (PT_DIR, ".pt")):
                if d in dirs:
                    remove_owned(out / d, f"{s}{ext}")
    columns = ["case_id", "slide_id", "label"] + (["split"] if any(r["split"] for r in rows) else [])
    report.csv_path = out / CSV_NAME
    write_csv(report.csv_path, columns, ([r[c] for c in columns] for r in rows))
    return report


def _coords_attrs(attrs: dict[str, Any], slide_id: str, out: Path) -> dict[str, Any]:
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
        "name": slide_id,
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


def _write_h5(path: Path, feats: np.ndarray, coords: np.ndarray, coords_attrs: dict[str, Any],
              file_attrs: dict[str, Any]) -> None:
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            fd = f.create_dataset("features", data=feats)
            cd = f.create_dataset("coords", data=coords)
            _set_attrs(cd, coords_attrs)
            _set_attrs(fd, file_attrs)
            _set_attrs(f, file_attrs)

    atomic_write(path, write)


def _write_pt(path: Path, feats: np.ndarray) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(torch.from_numpy(feats), tmp))

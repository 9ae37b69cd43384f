"""Cohort discovery: which slide files belong to which patient.

Three sources:

* a folder, searched recursively for slide files (:data:`SLIDE_SUFFIXES`); ids come from the file
  name (TCGA barcodes understood, see :func:`pipeline.ids.ids_from_filename`). The DICOM files of
  one folder are one slide (a DICOM WSI is a series of files, one per level).
* a single slide file;
* a manifest CSV with columns ``slide_path, patient_id`` and optional ``slide_id, label, split, mpp``;
  relative paths are relative to the manifest's folder.

Rows that cannot be used (invalid or duplicate ids, a patient with two labels, a bad mpp) do not stop
the cohort: they are returned as :class:`CohortProblem` and reported as failed slides.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .ids import InvalidIdError, ids_from_filename, sanitize_id, validate_id
from .reader import MPP_RANGE

__all__ = ["SLIDE_SUFFIXES", "SlideSpec", "CohortProblem", "Cohort", "ManifestError", "discover_cohort"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".dcm")
MANIFEST_REQUIRED = ("slide_path", "patient_id")
MANIFEST_OPTIONAL = ("slide_id", "label", "split", "mpp")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file or required columns)."""


@dataclass(frozen=True)
class SlideSpec:
    """One slide to tile: where it is and where it goes in the store."""

    path: Path
    patient_id: str
    slide_id: str
    label: str | None = None
    split: str | None = None
    mpp: float | None = None  # µm per level-0 pixel; overrides the slide's metadata when set


@dataclass(frozen=True)
class CohortProblem:
    """A slide (or manifest row) that was rejected before tiling, with the reason."""

    source: str
    slide_id: str | None
    patient_id: str | None
    error: str


@dataclass
class Cohort:
    slides: list[SlideSpec] = field(default_factory=list)
    problems: list[CohortProblem] = field(default_factory=list)

    def patients(self) -> dict[str, list[SlideSpec]]:
        out: dict[str, list[SlideSpec]] = defaultdict(list)
        for s in self.slides:
            out[s.patient_id].append(s)
        return dict(out)


def discover_cohort(source: str | Path) -> Cohort:
    """Cohort from a folder of slides, one slide file, or a manifest CSV (``*.csv``)."""
    source = Path(source)
    if source.is_dir():
        cohort = _from_folder(source)
    elif source.suffix.lower() == ".csv":
        cohort = _from_manifest(source)
    elif source.suffix.lower() in SLIDE_SUFFIXES and source.exists():
        patient, slide = ids_from_filename(source)
        cohort = Cohort([SlideSpec(path=source, patient_id=patient, slide_id=slide)])
    elif source.exists():
        raise ManifestError(f"{source}: not a folder, a slide file or a .csv manifest")
    else:
        raise ManifestError(f"{source}: no such folder or manifest")
    _reject_duplicates(cohort)
    _check_patient_labels(cohort)
    return cohort


def _from_folder(folder: Path) -> Cohort:
    cohort = Cohort()
    dicom_dirs: dict[Path, list[Path]] = defaultdict(list)
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in SLIDE_SUFFIXES or path.is_dir():
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # hidden folders (e.g. a store's own files, editor droppings)
        if path.suffix.lower() == ".dcm":
            dicom_dirs[path.parent].append(path)
            continue
        patient, slide = ids_from_filename(path)
        cohort.slides.append(SlideSpec(path=path, patient_id=patient, slide_id=slide))
    for directory, files in sorted(dicom_dirs.items()):
        slide = sanitize_id(directory.name)
        cohort.slides.append(SlideSpec(path=files[0], patient_id=slide, slide_id=slide))
    return cohort


def _from_manifest(manifest: Path) -> Cohort:
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot read manifest ({e.strerror or e})") from e
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in MANIFEST_REQUIRED if c not in columns]
    if missing:
        raise ManifestError(
            f"{manifest}: missing column(s) {', '.join(missing)}; need {', '.join(MANIFEST_REQUIRED)} "
            f"and optionally {', '.join(MANIFEST_OPTIONAL)} (found: {', '.join(columns) or 'none'})"
        )
    cohort = Cohort()
    for line_no, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{manifest}:{line_no}"
        if not row.get("slide_path"):
            cohort.problems.append(CohortProblem(where, None, row.get("patient_id") or None, "empty slide_path"))
            continue
        path = Path(row["slide_path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        slide_id = row.get("slide_id") or ids_from_filename(path)[1]
        try:
            patient_id = validate_id(row.get("patient_id", ""), kind="patient_id")
            slide_id = validate_id(slide_id, kind="slide_id")
            mpp = _parse_mpp(row.get("mpp", ""))
        except (InvalidIdError, ValueError) as e:
            cohort.problems.append(CohortProblem(where, row.get("slide_id") or None, row.get("patient_id") or None, str(e)))
            continue
        cohort.slides.append(
            SlideSpec(
                path=path,
                patient_id=patient_id,
                slide_id=slide_id,
                label=row.get("label") or None,
                split=row.get("split") or None,
                mpp=mpp,
            )
        )
    return cohort


def _parse_mpp(text: str) -> float | None:
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        raise ValueError(f"mpp {text!r} is not a number (µm per pixel, e.g. 0.25)") from None
    if not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise ValueError(f"mpp {text!r} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} µm per pixel")
    return mpp


def _reject_duplicates(cohort: Cohort) -> None:
    """Slide ids must be unique in a cohort: every slide sharing an id is rejected (none is picked silently)."""
    by_id: dict[str, list[SlideSpec]] = defaultdict(list)
    for s in cohort.slides:
        by_id[s.slide_id].append(s)
    keep = []
    for s in cohort.slides:
        same = by_id[s.slide_id]
        if len(same) == 1:
            keep.append(s)
            continue
        others = ", ".join(str(o.path) for o in same if o is not s)
        cohort.problems.append(
            CohortProblem(str(s.path), s.slide_id, s.patient_id, f"duplicate slide id {s.slide_id!r} (also used by {others})")
        )
    cohort.slides = keep


def _check_patient_labels(cohort: Cohort) -> None:
    """A patient has one label and one split; slides that disagree with each other are rejected."""
    for patient, slides in cohort.patients().items():
        for attr in ("label", "split"):
            values = {getattr(s, attr) for s in slides if getattr(s, attr) is not None}
            if len(values) > 1:
                bad = set(slides)
                cohort.slides = [s for s in cohort.slides if s not in bad]
                for s in slides:
                    cohort.problems.append(
                        CohortProblem(str(s.path), s.slide_id, patient, f"patient {patient!r} has conflicting {attr}s {sorted(values)}")
                    )
                break

"""Cohort discovery: which slide files belong to which patient.

Three sources:

* a folder, searched recursively for slide files (:data:`SLIDE_SUFFIXES`); ids come from the file
  name (TCGA barcodes understood, see :func:`pipeline.ids.ids_from_filename`). The DICOM files of
  one folder are one slide (a DICOM WSI is a series of files, one per level).
* a single slide file;
* a manifest CSV with columns ``slide_path, patient_id`` and optional ``slide_id, label, split, mpp``;
  relative paths are relative to the manifest's folder.

The manifest is a contract: a file that is not UTF-8 or not CSV, and a missing, unknown (misspelt:
the closest allowed name is suggested) or repeated column make it unusable (:class:`ManifestError`,
naming the file and line). Rows that cannot be used (invalid, duplicate or case-clashing ids, a
patient with two labels, a bad mpp, split or label, too many fields) do not stop the cohort: they are
returned as :class:`CohortProblem` naming the line and the column, and reported as failed slides.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .ids import ids_from_filename, sanitize_id, validate_id
from .reader import MPP_RANGE

__all__ = ["SLIDE_SUFFIXES", "SlideSpec", "CohortProblem", "Cohort", "ManifestError", "discover_cohort",
           "TRAIN_SPLITS", "TEST_SPLITS"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".dcm")
MANIFEST_REQUIRED = ("slide_path", "patient_id")
MANIFEST_OPTIONAL = ("slide_id", "label", "split", "mpp")
# split values (any case): what hlss_model.knn.split_patients sends to training or holds out
TRAIN_SPLITS = frozenset({"train"})
TEST_SPLITS = frozenset({"test", "val", "valid", "validation", "heldout", "held_out"})


class ManifestError(ValueError):
    """The manifest as a whole is unusable: missing or unreadable file, not UTF-8, not CSV, a missing,
    unknown or repeated column. The message names the file and the line (and column)."""


@dataclass(frozen=True)
class SlideSpec:
    """One slide to tile: where it is and where it goes in the store."""

    path: Path
    patient_id: str
    slide_id: str
    label: str | None = None
    split: str | None = None
    mpp: float | None = None  # µm per level-0 pixel; overrides the slide's metadata when set
    row: str | None = None  # "<manifest>:<line>" of a manifest row, for messages

    def patient_attrs(self) -> dict[str, str | None]:
        """The patient attributes this row carries (None: not given, the store's value stays)."""
        return {"label": self.label, "split": self.split}


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
    if not cohort.slides and not cohort.problems:
        # an empty store made from a mistyped folder would look like success
        what = ("no slide files in this folder or its subfolders (looked for "
                + ", ".join(SLIDE_SUFFIXES) + ")") if source.is_dir() else "the manifest has no slide rows"
        raise ManifestError(f"{source}: {what}")
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
    """Rows of a manifest; whole-file faults raise :class:`ManifestError`, bad rows become problems."""
    rows = csv.reader(io.StringIO(_manifest_text(manifest), newline=""))
    try:
        header = [c.strip() for c in next(rows, [])]
        columns = _check_header(manifest, header)
        cohort = Cohort()
        start = rows.line_num + 1
        for cells in rows:
            line, start = start, rows.line_num + 1
            if any(c.strip() for c in cells):
                _add_row(cohort, manifest, line, columns, cells)
    except csv.Error as e:
        raise ManifestError(f"{manifest}:{rows.line_num}: not a readable CSV line ({e})") from None
    return cohort


def _manifest_text(manifest: Path) -> str:
    """The manifest as text; not UTF-8 is an error naming the line and column of the first bad byte."""
    try:
        data = manifest.read_bytes()
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot read manifest ({e.strerror or e})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ManifestError(
            f"{manifest}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at character {column}); "
            "save the manifest as UTF-8 (CSV UTF-8 in a spreadsheet)"
        ) from None


def _check_header(manifest: Path, header: list[str]) -> list[str]:
    """The header's column names, or one ManifestError naming every missing, unknown or repeated one."""
    allowed = MANIFEST_REQUIRED + MANIFEST_OPTIONAL
    faults, seen = [], {}
    for number, name in enumerate(header, start=1):
        if name in seen:
            faults.append(f"column {name!r} appears twice (columns {seen[name]} and {number})")
        elif name not in allowed:
            close = difflib.get_close_matches(name.lower(), allowed, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            faults.append(f"column {number} has no name" if not name else
                          f"column {number} {name!r} is not a manifest column{hint}")
        seen.setdefault(name, number)
    missing = [c for c in MANIFEST_REQUIRED if c not in seen]
    if missing:
        faults.insert(0, f"missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})")
    if faults:
        raise ManifestError(f"{manifest}:1: {'; '.join(faults)}; allowed columns: {', '.join(MANIFEST_REQUIRED)} "
                            f"(required) and {', '.join(MANIFEST_OPTIONAL)} (optional)")
    return header


def _add_row(cohort: Cohort, manifest: Path, line: int, columns: list[str], cells: list[str]) -> None:
    """One data line (``line``: its number in the file) as a slide, or as a problem naming the column."""
    where = f"{manifest}:{line}"
    row = dict(zip(columns, (c.strip() for c in cells)))
    patient_raw, slide_raw = row.get("patient_id") or None, row.get("slide_id") or None
    if any(c.strip() for c in cells[len(columns):]):  # empty trailing cells (a spreadsheet's commas) are fine
        cohort.problems.append(CohortProblem(where, slide_raw, patient_raw, (
            f"{len(cells)} fields but the header has {len(columns)} columns "
            "(an unquoted comma in a value? quote it)")))
        return
    column = "slide_path"
    try:
        if not row.get("slide_path"):
            raise ValueError("empty slide_path")
        path = Path(row["slide_path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        column = "patient_id"
        patient_id = validate_id(row.get("patient_id", ""), kind="patient_id")
        column = "slide_id"
        slide_id = validate_id(row.get("slide_id") or ids_from_filename(path)[1], kind="slide_id")
        column = "mpp"
        mpp = _parse_mpp(row.get("mpp", ""))
        column = "label"
        label = _parse_label(row.get("label", ""))
        column = "split"
        split = _parse_split(row.get("split", ""))
    except ValueError as e:  # InvalidIdError included
        cohort.problems.append(CohortProblem(where, slide_raw, patient_raw, f"column {column}: {e}"))
        return
    cohort.slides.append(SlideSpec(path=path, patient_id=patient_id, slide_id=slide_id, label=label,
                                   split=split, mpp=mpp, row=where))


def _parse_label(text: str) -> str | None:
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise ValueError(f"label {text!r} has control or invisible characters; use printable text")
    if len(text) > 128:
        raise ValueError(f"label is {len(text)} characters long; at most 128 are allowed")
    return text or None


def _parse_split(text: str) -> str | None:
    if text and text.lower() not in TRAIN_SPLITS | TEST_SPLITS:
        raise ValueError(f"split {text!r} is not one of {', '.join(sorted(TRAIN_SPLITS))} (training) or "
                         f"{', '.join(sorted(TEST_SPLITS))} (held out); any case")
    return text or None


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
    """Slide ids must be unique in a cohort, also ignoring case, and patient ids must not differ only
    by case (one folder on a case-insensitive file system): every slide involved is rejected, naming
    the others (none is picked silently)."""
    by_slide = _clashes(cohort.slides, lambda s: s.slide_id, same_ok=False)
    by_patient = _clashes(cohort.slides, lambda s: s.patient_id, same_ok=True)
    keep = []
    for s in cohort.slides:
        if s in by_slide:
            same = by_slide[s]
            kind = f"duplicate slide id {s.slide_id!r}" if all(o.slide_id == s.slide_id for o in same) else \
                f"slide id {s.slide_id!r} differs only by case from another (one folder on macOS/Windows file systems)"
        elif s in by_patient:
            same = by_patient[s]
            kind = (f"patient id {s.patient_id!r} differs only by case from another "
                    "(one folder on macOS/Windows file systems)")
        else:
            keep.append(s)
            continue
        others = ", ".join(f"{o.patient_id}/{o.slide_id} ({o.path}" + (f", {o.row})" if o.row else ")") for o in same)
        cohort.problems.append(CohortProblem(_where(s), s.slide_id, s.patient_id,
                                             f"{kind}: also {others}"))
    cohort.slides = keep


def _clashes(slides: list[SlideSpec], key: Callable[[SlideSpec], str], same_ok: bool
             ) -> dict[SlideSpec, list[SlideSpec]]:
    """``{slide: the other slides}`` for slides whose ``key`` equals another's ignoring case;
    ``same_ok``: identical spellings do not clash (a patient's slides share its id), case variants do."""
    groups: dict[str, list[SlideSpec]] = defaultdict(list)
    for s in slides:
        groups[key(s).lower()].append(s)
    out = {}
    for same in groups.values():
        if len(same) < 2 or (same_ok and len({key(o) for o in same}) == 1):
            continue
        for s in same:
            out[s] = [o for o in same if o is not s and not (same_ok and key(o) == key(s))]
    return out


def _where(spec: SlideSpec) -> str:
    """Where a slide came from, for messages: its manifest line, else its file."""
    return spec.row or str(spec.path)


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
                        CohortProblem(_where(s), s.slide_id, patient,
                                      f"column {attr}: patient {patient!r} has conflicting {attr}s {sorted(values)}")
                    )
                break

"""Patient, slide, feature-set, run and evaluation names, and how they become Zarr keys.

A name is used as one Zarr node name (``patients/<patient_id>/slides/<slide_id>``,
``features/<name>``, ``evaluations/<name>``, ``_staging/<token>``), so it must be a single, safe path
component: 1-128 letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a digit (so never
``.``/``..``, a hidden file, Zarr's reserved ``__`` prefix, or something a command line or a
spreadsheet reads as an option or a formula), not ending with ``.`` (Windows shares drop it), no
``..`` anywhere, and not a metadata file name of Zarr v2 or v3 (``zarr.json``, ``.zgroup``, ...): a
slide named ``zarr.json`` would replace the metadata of its patient's ``slides`` group and hide every
other slide of that patient. Names that differ only by case are one folder on case-insensitive
file systems (macOS, Windows shares, some object-store gateways): a cohort refuses such pairs
(:mod:`pipeline.cohort`). Nothing is silently rewritten: an invalid name is an error unless the caller asks for
:func:`sanitize_id`, whose mapping is explicit and reported.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["InvalidIdError", "validate_id", "sanitize_id", "ids_from_filename", "RESERVED_NAMES", "TCGA_BARCODE"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALLOWED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"

# metadata file names of Zarr v3 and v2 (and consolidated metadata): a node of one of these names
# would replace its parent's metadata. Compared case-insensitively (see case_collisions).
RESERVED_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})

# TCGA slide barcode: TCGA-<TSS>-<participant>-<sample><vial>-<portion><analyte>-<slide type><order>,
# e.g. TCGA-02-0001-01Z-00-DX1. Diagnostic slide files append ".<uuid>.svs".
TCGA_BARCODE = re.compile(
    r"^(?P<slide>(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-\d{2}[A-Z]-\d{2}[A-Z0-9]?-(?:DX|TS|BS|MS)[A-Z0-9]+)"
    r"(?:\.[0-9A-Fa-f-]{36})?$"
)


class InvalidIdError(ValueError):
    """A name that cannot be used as a Zarr key."""


def validate_id(value: str, *, kind: str = "id") -> str:
    """Return ``value`` unchanged if it is a safe single Zarr node name, else raise InvalidIdError.

    ``kind`` names what the value is (``"slide_id"``, ``"feature name"``...) in the message.
    """
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    if value.lower() in RESERVED_NAMES:
        raise InvalidIdError(f"{kind} {value!r} is not allowed: it is a Zarr metadata file name "
                             f"({', '.join(sorted(RESERVED_NAMES))} are reserved)")
    if value.startswith("__"):
        raise InvalidIdError(f"{kind} {value!r} is not allowed: names starting with '__' are reserved by Zarr")
    if not _ID_RE.match(value):
        raise InvalidIdError(f"{kind} {value!r} is not allowed: use {_ALLOWED} (no slashes or spaces)")
    if ".." in value:
        raise InvalidIdError(f"{kind} {value!r} is not allowed: it contains '..'")
    if value.endswith("."):
        raise InvalidIdError(f"{kind} {value!r} is not allowed: it ends with '.' (dropped on Windows shares)")
    return value


def sanitize_id(value: str) -> str:
    """Map an arbitrary string to a valid id: disallowed characters become ``_``, ``..`` runs become ``_``.

    Used only where the caller opted in (folder discovery of non-TCGA file names); the mapping is
    deterministic, and collisions are caught later as duplicate ids.
    """
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", value.strip())
    out = re.sub(r"\.{2,}", "_", out)
    out = re.sub(r"^[._-]+", "", out)[:128].rstrip(".") or "slide"
    if out.lower() in RESERVED_NAMES:
        out = "x" + out[:127]
    return validate_id(out)


def ids_from_filename(path: str | Path) -> tuple[str, str]:
    """``(patient_id, slide_id)`` for a slide file found in a folder.

    TCGA names give the barcode ids: ``TCGA-02-0001-01Z-00-DX1.<uuid>.svs`` is patient
    ``TCGA-02-0001``, slide ``TCGA-02-0001-01Z-00-DX1``. Any other name: slide id = file stem
    (sanitised; ``x.ome.tiff`` gives ``x``), patient id = slide id.
    """
    stem = Path(path).name
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    if stem.lower().endswith(".ome"):  # x.ome.tif(f): OME-TIFF's double suffix is not part of the id
        stem = stem[:-4] or stem
    m = TCGA_BARCODE.match(stem)
    if m:
        return m.group("patient"), m.group("slide")
    slide = sanitize_id(stem)
    return slide, slide

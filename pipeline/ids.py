"""Patient and slide identifiers, and how they become Zarr keys.

An id is used as one Zarr node name (``patients/<patient_id>/slides/<slide_id>``), so it must be a
single, safe path component: letters, digits, ``.``, ``_`` and ``-``; not empty, not ``.``/``..``,
no ``..`` anywhere, not starting with ``__`` (reserved by the Zarr v3 spec) and at most 128 chars.
Nothing is silently rewritten: an invalid id is an error unless the caller asks for
:func:`sanitize_id`, whose mapping is explicit and reported.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["InvalidIdError", "validate_id", "sanitize_id", "ids_from_filename", "TCGA_BARCODE"]

_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# TCGA slide barcode: TCGA-<TSS>-<participant>-<sample><vial>-<portion><analyte>-<slide type><order>,
# e.g. TCGA-02-0001-01Z-00-DX1. Diagnostic slide files append ".<uuid>.svs".
TCGA_BARCODE = re.compile(
    r"^(?P<slide>(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-\d{2}[A-Z]-\d{2}[A-Z0-9]?-(?:DX|TS|BS|MS)[A-Z0-9]+)"
    r"(?:\.[0-9A-Fa-f-]{36})?$"
)


class InvalidIdError(ValueError):
    """An id that cannot be used as a Zarr key."""


def validate_id(value: str, *, kind: str = "id") -> str:
    """Return ``value`` unchanged if it is a safe single Zarr node name, else raise InvalidIdError."""
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    if not _ID_RE.match(value):
        raise InvalidIdError(
            f"{kind} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-' (no slashes or spaces)"
        )
    if value in (".", "..") or ".." in value:
        raise InvalidIdError(f"{kind} {value!r} is not allowed: it contains '..'")
    if value.startswith("__"):
        raise InvalidIdError(f"{kind} {value!r} is not allowed: names starting with '__' are reserved by Zarr")
    return value


def sanitize_id(value: str) -> str:
    """Map an arbitrary string to a valid id: disallowed characters become ``_``, ``..`` runs become ``_``.

    Used only where the caller opted in (folder discovery of non-TCGA file names); the mapping is
    deterministic, and collisions are caught later as duplicate ids.
    """
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", value.strip())
    out = re.sub(r"\.{2,}", "_", out)
    out = out.lstrip("_").strip(".")[:128] or "slide"
    return validate_id(out)


def ids_from_filename(path: str | Path) -> tuple[str, str]:
    """``(patient_id, slide_id)`` for a slide file found in a folder.

    TCGA names give the barcode ids: ``TCGA-02-0001-01Z-00-DX1.<uuid>.svs`` is patient
    ``TCGA-02-0001``, slide ``TCGA-02-0001-01Z-00-DX1``. Any other name: slide id = file stem
    (sanitised), patient id = slide id.
    """
    stem = Path(path).name
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    m = TCGA_BARCODE.match(stem)
    if m:
        return m.group("patient"), m.group("slide")
    slide = sanitize_id(stem)
    return slide, slide

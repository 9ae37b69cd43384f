"""Files written whole or not at all (a temporary file in the same folder, renamed over the target),
and removed only inside the folder that owns them (:func:`remove_owned`)."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["TMP_TAG", "OutsideOwnerError", "atomic_write", "atomic_write_bytes", "owned_path", "remove_owned",
           "remove_temporaries", "replace_folder", "spreadsheet_safe", "utc_now", "write_csv"]

TMP_TAG = ".hlss-tmp-"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{TMP_TAG}{uuid.uuid4().hex[:12]}-{path.name}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def replace_folder(owner: Path, tmp: Path, final: Path) -> None:
    """Put the folder ``tmp``, written whole beside ``final``, in its place (both inside ``owner``):
    the old ``final`` is removed first, so a kill between the two steps leaves ``tmp`` complete."""
    remove_owned(owner, final)
    os.replace(tmp, final)


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second with the offset: ``2026-12-01T22:41:24+00:00``.

    The one format of every timestamp the project writes (older files may hold local times with a
    ``+HHMM`` offset; :func:`datetime.datetime.fromisoformat` reads both)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def remove_temporaries(folder: Path) -> None:
    """Temporary files a killed writer left in ``folder`` (renamed into place otherwise)."""
    for p in Path(folder).glob(f"{TMP_TAG}*.tmp"):
        remove_owned(folder, p)


# what a spreadsheet may run as a formula when a cell starts with it (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def spreadsheet_safe(value: Any) -> str:
    """``value`` as a CSV cell a spreadsheet shows as text: one starting with ``= + - @``, a tab or a
    carriage return gets a leading ``'`` (as OWASP recommends); plain numbers such as ``-1`` are kept."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.match(text):
        return "'" + text
    return text


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file with header ``columns`` and ``rows``, every cell :func:`spreadsheet_safe`, atomically.

    The one way the project writes CSV files, so none of them can carry a formula into a spreadsheet.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([spreadsheet_safe(c) for c in columns])
    writer.writerows([spreadsheet_safe(c) for c in row] for row in rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


class OutsideOwnerError(ValueError):
    """A path to delete or overwrite that lies outside the folder that owns it."""


def owned_path(owner: str | Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to ``owner``) with its folders resolved, refused with
    :class:`OutsideOwnerError` unless it lies strictly inside ``owner`` (resolved too).

    The last component is not followed: a symlink inside ``owner`` is the link itself (removing or
    replacing it never touches its target), while a symlinked folder on the way that leads out of
    ``owner``, ``..`` components and absolute paths elsewhere are refused.
    """
    root = Path(owner).resolve()
    p = Path(owner) / path  # an absolute ``path`` replaces ``owner`` here; it is checked like any other
    if p.name in ("", ".", ".."):
        raise OutsideOwnerError(f"{path}: not a file or folder inside {root}; refusing to remove or replace it")
    target = p.parent.resolve() / p.name
    if not target.is_relative_to(root) or target == root:
        raise OutsideOwnerError(f"{path}: resolves to {target}, outside {root}; refusing to remove or replace it")
    return target


def remove_owned(owner: str | Path, path: str | Path) -> bool:
    """Remove the file, link or folder ``path`` inside ``owner`` (see :func:`owned_path`, which refuses
    anything else). A symlink is removed as a link. Returns whether anything was there."""
    target = owned_path(owner, path)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
        return True
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True

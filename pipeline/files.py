"""Files written whole or not at all: a temporary file in the same folder, renamed over the target."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["TMP_TAG", "atomic_write", "atomic_write_bytes", "remove_temporaries"]

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


def remove_temporaries(folder: Path) -> None:
    """Temporary files a killed writer left in ``folder`` (renamed into place otherwise)."""
    for p in Path(folder).glob(f"{TMP_TAG}*.tmp"):
        p.unlink(missing_ok=True)

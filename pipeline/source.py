"""What a slide file is, for provenance and change detection (size, mtime, content fingerprint)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["source_info", "same_source", "FINGERPRINT_SAMPLES"]

FINGERPRINT_SAMPLES = 16
_PIECE = 64 * 1024


def source_info(path: str | Path) -> dict:
    """``{path, bytes, mtime, fingerprint}`` of a slide file.

    The fingerprint is a BLAKE2b hash of the size and of 16 pieces of 64 KiB spread evenly over the
    file (first and last included): it reads about 1 MiB whatever the slide's size, yet changes when
    a file is replaced, re-scanned, truncated or appended to. A change confined to bytes between
    the sampled pieces of a same-size file is not seen; mtime is kept beside it for that reason.
    """
    path = Path(path)
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= FINGERPRINT_SAMPLES * _PIECE:
            h.update(f.read())
        else:
            span = st.st_size - _PIECE
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(span * k // (FINGERPRINT_SAMPLES - 1))
                h.update(f.read(_PIECE))
    return {
        "path": str(path.absolute()),
        "bytes": int(st.st_size),
        "mtime": float(st.st_mtime),
        "fingerprint": h.hexdigest(),
    }


def same_source(a: dict | None, b: dict) -> bool:
    """Whether two :func:`source_info` results describe the same content (size and fingerprint)."""
    return bool(a) and a.get("bytes") == b["bytes"] and a.get("fingerprint") == b["fingerprint"]


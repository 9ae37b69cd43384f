"""What a store holds, file by file, so a fault test can assert that nothing else changed.

>>> before = snapshot(store)
>>> ...  # the faulty operation
>>> assert_unchanged(before, snapshot(store), allow=("patients/P1/slides/S1/",))
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["snapshot", "assert_unchanged"]


def snapshot(store: str | Path, *, skip: tuple[str, ...] = ("_staging/",)) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under a local store (``skip``: prefixes left out)."""
    root = Path(store)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(skip):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str], after: dict[str, str], *, allow: tuple[str, ...] = ()) -> None:
    """Fail naming every file added, removed or changed outside the ``allow`` prefixes."""
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not k.startswith(allow))
    assert not changed, f"files changed outside {allow or 'nothing'}: {changed[:20]}"

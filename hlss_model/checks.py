"""Checks of the values that name a device or a local weights file, shared by the training config
and the command line (:mod:`hlss.argtypes` turns their ``ValueError`` into a refused option).

Spelling and file checks only: nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.escape import terminal

__all__ = ["DEVICES", "WEIGHT_SUFFIXES", "check_device_name", "check_readable_file", "check_weights_file"]

DEVICES = "auto, cpu, cuda, cuda:N or mps"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".tar")


def check_device_name(name: str) -> str:
    """``name`` if it is one of auto, cpu, cuda, cuda:N, mps (spelling only); ValueError otherwise."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name.strip()):
        raise ValueError(f"device {name!r} is not one of {DEVICES}")
    return name.strip()


def check_readable_file(text: str | Path) -> Path:
    """An existing, readable file; ValueError naming it otherwise."""
    path, shown = Path(text).expanduser(), terminal(str(text))
    if not path.exists():
        raise ValueError(f"{shown} not found (no such file)")
    if not path.is_file():
        raise ValueError(f"{shown}: not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{shown}: not readable (permission denied)")
    return path


def _weights_format(path: Path) -> str | None:
    """``safetensors`` or ``torch`` from a file's first bytes (None: neither)."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return "torch"
    return None


def check_weights_file(text: str | Path, *, what: str = "", error: type[ValueError] = ValueError) -> Path:
    """A local weights file we load: safetensors (``.safetensors``) or a torch checkpoint (.pt, .pth,
    .bin, .tar), its first bytes matching its suffix; ``error`` (a ValueError) naming it otherwise,
    its message after ``what`` (e.g. ``"model.weights: "``)."""
    try:
        return _weights_file(text)
    except ValueError as e:
        if not what and error is ValueError:
            raise
        raise error(f"{what}{e}") from None


def _weights_file(text: str | Path) -> Path:
    path, shown = check_readable_file(text), terminal(str(text))
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"{shown}: not a weights file; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        kind = _weights_format(path)
    except OSError as e:
        raise ValueError(f"{shown}: cannot read it ({e.strerror or e})") from None
    expected = "safetensors" if path.suffix.lower() == ".safetensors" else "torch"
    if kind != expected:
        raise ValueError(f"{shown}: not a {expected} file (its first bytes are not a {expected} header)")
    return path

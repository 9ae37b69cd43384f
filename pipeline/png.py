"""PNG encoding of the pictures the store keeps (QC pictures, report figures)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["encode_png"]


def encode_png(image: np.ndarray) -> bytes:
    """``image`` ``(H, W, 3)`` or ``(H, W)`` (cast to uint8) as PNG bytes (zlib level 6)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()

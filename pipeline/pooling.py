"""Slide and patient vectors pooled from tile features: for a linear probe without MIL.

A slide's vectors are the mean and the element-wise max over the rows of its ``(N, D)`` features
``features/<name>`` that hold no NaN (NaN rows are tiles a tile filter left out at extraction).
They are computed by :meth:`pipeline.store.StoreWriter.commit_features` from the very rows it
commits and stored in the same metadata document as the array (``attrs["pooled"]``, see
:func:`Pooled.to_attrs`), so a store never holds pooled vectors that disagree with its features;
arrays committed before (older stores) have none and are pooled on the fly by :func:`slide_pooled`.

A patient's vectors combine its slides' (:func:`combine`): the mean weighted by each slide's pooled
tile count (the mean over all the patient's tiles) and the element-wise max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["POOLED", "BLOCK_ROWS", "Pooled", "pool", "combine", "slide_pooled"]

POOLED = "pooled"
"""Attribute of ``features/<name>`` holding its :meth:`Pooled.to_attrs`."""
BLOCK_ROWS = 4096
"""Rows read at a time while pooling (bounded memory for big slides)."""


@dataclass(frozen=True)
class Pooled:
    """Pooled vectors of a set of tiles.

    ``mean``, ``max``: ``(D,)`` float32 (all NaN when ``rows`` is 0); ``rows``: tiles pooled.
    """

    mean: np.ndarray
    max: np.ndarray
    rows: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready: ``{"rows", "mean", "max"}`` (lists of floats; ``None`` when no row was pooled).
        Each float32 is written as its shortest decimal (``str``), which reads back as the same
        float32, so the vectors survive the JSON round trip exactly at about half the text."""
        if self.rows == 0:
            return {"rows": 0, "mean": None, "max": None}
        return {"rows": self.rows, "mean": _decimals(self.mean), "max": _decimals(self.max)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], dim: int) -> "Pooled | None":
        """The vectors stored by :meth:`to_attrs`; ``None`` when ``attrs`` do not hold ``dim`` of them."""
        try:
            rows = int(attrs["rows"])
            if rows == 0:
                return _empty(dim)
            mean = np.asarray(attrs["mean"], dtype=np.float32)
            mx = np.asarray(attrs["max"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return None
        if rows < 0 or mean.shape != (dim,) or mx.shape != (dim,):
            return None
        return cls(mean, mx, rows)


def _decimals(values: np.ndarray) -> list[float]:
    return [float(str(v)) for v in values.astype(np.float32)]


def _empty(dim: int) -> Pooled:
    nan = np.full(dim, np.nan, dtype=np.float32)
    return Pooled(nan, nan.copy(), 0)


def pool(features: Any, block_rows: int = BLOCK_ROWS) -> Pooled:
    """Mean and max over the rows of ``features`` ((N, D), any float dtype; a numpy or zarr array,
    read ``block_rows`` rows at a time) that hold no NaN. The sum runs in float64."""
    n, dim = (int(v) for v in features.shape)
    total = np.zeros(dim, dtype=np.float64)
    mx = np.full(dim, -np.inf, dtype=np.float64)
    rows = 0
    for start in range(0, n, block_rows):
        block = np.asarray(features[start:start + block_rows], dtype=np.float64)
        block = block[~np.isnan(block).any(axis=1)]
        if len(block):
            rows += len(block)
            total += block.sum(axis=0)
            np.maximum(mx, block.max(axis=0), out=mx)
    if rows == 0:
        return _empty(dim)
    return Pooled((total / rows).astype(np.float32), mx.astype(np.float32), rows)


def combine(parts: Sequence[Pooled]) -> Pooled:
    """The vectors of the union of the tiles of ``parts`` (e.g. a patient's slides): the mean of the
    parts' means weighted by their ``rows`` (in float64; the mean over all their tiles up to float32
    rounding) and the element-wise max."""
    if not parts:
        raise ValueError("nothing to combine")
    dim = parts[0].dim
    if any(p.dim != dim for p in parts):
        raise ValueError(f"pooled vectors of different dimensions: {sorted({p.dim for p in parts})}")
    used = [p for p in parts if p.rows]
    if not used:
        return _empty(dim)
    rows = sum(p.rows for p in used)
    total = np.sum([p.mean.astype(np.float64) * p.rows for p in used], axis=0)
    mx = np.max([p.max for p in used], axis=0)
    return Pooled((total / rows).astype(np.float32), mx.astype(np.float32), rows)


def slide_pooled(array: Any, values: np.ndarray | None = None) -> Pooled:
    """A stored feature array's pooled vectors: its ``attrs["pooled"]`` when present (written with the
    array), else computed from its rows (arrays committed before pooling existed); ``values``: the
    array's rows when the caller has read them already (not read again)."""
    dim = int(array.shape[1])
    stored = dict(array.attrs).get(POOLED)
    found = Pooled.from_attrs(stored, dim) if isinstance(stored, dict) else None
    if found is not None:
        return found
    return pool(array if values is None else values)

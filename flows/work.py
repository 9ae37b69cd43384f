"""The units of work the flows hand to worker processes (a local pool or a Dask cluster).

Plain, picklable functions of plain values: a worker needs the package installed and the slides,
store and run folders reachable at the same paths (or URLs), nothing else. A slide's tiling is
:func:`pipeline.runner.tile_one`, the same work as ``hlss tile``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hlss_model.settings import EncoderSpec

if TYPE_CHECKING:  # torch stays out of tiling workers (it adds seconds to every worker's start)
    from hlss_model.extract import ExtractReport

__all__ = ["EncoderSpec", "extract_slides"]


def extract_slides(store: str, encoders: list[EncoderSpec], slides: list[tuple[str, str]] | None,
                   batch_size: int, device: str, dtype: str,
                   tile_filter: dict[str, float] | None = None, clean_staging: bool = True) -> "ExtractReport":
    """Extract features of ``slides`` (all complete slides if None) with each encoder; skips finished work.

    ``tile_filter``: QC limits (:class:`pipeline.qc.TileFilter` fields); tiles outside them get NaN rows.
    ``clean_staging``: False when other extractions of this store run beside this one (see
    :func:`hlss_model.extract.extract_features`).
    """
    from hlss_model.extract import extract_features
    from pipeline.qc import TileFilter

    return extract_features(store, [e.build() for e in encoders], batch_size=batch_size, device=device,
                            dtype=dtype, slides=slides, tile_filter=TileFilter.from_dict(tile_filter),
                            clean_staging=clean_staging)

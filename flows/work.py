"""The units of work the flows hand to worker processes (a local pool or a Dask cluster).

Plain, picklable functions of plain values: a worker needs the package installed and the slides,
store and run folders reachable at the same paths (or URLs), nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hlss_model.settings import EncoderSpec
from pipeline.cohort import SlideSpec
from pipeline.config import TilingParams
from pipeline.runner import limit_worker_threads
from pipeline.store import StoreWriter
from pipeline.tiler import SlideResult, tile_slide

if TYPE_CHECKING:  # torch stays out of tiling workers (it adds seconds to every worker's start)
    from pipeline.features import ExtractReport

__all__ = ["EncoderSpec", "tile_one", "extract_slides"]


def tile_one(spec: SlideSpec, store: str, params: TilingParams, threads: int = 1) -> SlideResult:
    """Tile one slide into ``store`` using ``threads`` cores (see :func:`pipeline.tiler.tile_slide`)."""
    limit_worker_threads(threads)
    return tile_slide(spec, StoreWriter(store), params, overlap=threads > 1)


def extract_slides(store: str, encoders: list[EncoderSpec], slides: list[tuple[str, str]] | None,
                   batch_size: int, device: str, dtype: str,
                   tile_filter: dict[str, float] | None = None) -> "ExtractReport":
    """Extract features of ``slides`` (all complete slides if None) with each encoder; skips finished work.

    ``tile_filter``: QC limits (:class:`pipeline.qc.TileFilter` fields); tiles outside them get NaN rows.
    """
    from pipeline.features import extract_features
    from pipeline.qc import TileFilter

    return extract_features(store, [e.build() for e in encoders], batch_size=batch_size, device=device,
                            dtype=dtype, slides=slides, tile_filter=TileFilter.from_dict(tile_filter))

"""The units of work the flows hand to worker processes (a local pool or a Dask cluster).

Plain, picklable functions of plain values: a worker needs the package installed and the slides,
store and run folders reachable at the same paths (or URLs), nothing else. A slide's tiling is
:func:`pipeline.runner.tile_one`, the same work as ``hlss tile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch stays out of tiling workers (it adds seconds to every worker's start)
    from hlss_model.encoders import Encoder
    from hlss_model.extract import ExtractReport

__all__ = ["EncoderSpec", "extract_slides"]


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder described by value, so a worker can build it: a training run or a timm model."""

    kind: Literal["run", "timm"]
    ref: str  # run folder, or timm model name
    weights: str | None = None  # timm only: a local weights file
    name: str | None = None  # feature name; default from the model

    @classmethod
    def parse(cls, spec: str, name: str | None = None) -> "EncoderSpec":
        """``timm:NAME[:WEIGHTS_FILE]`` or ``run:FOLDER``."""
        kind, _, rest = spec.partition(":")
        if kind == "run" and rest:
            return cls("run", rest, None, name)
        if kind == "timm" and rest:
            model, _, weights = rest.partition(":")
            if weights and not Path(weights).expanduser().is_file():
                raise ValueError(f"encoder {spec!r}: weights file {weights} not found")
            return cls("timm", model, weights or None, name)
        raise ValueError(f"encoder {spec!r}: expected timm:NAME[:WEIGHTS_FILE] or run:FOLDER")

    def build(self) -> "Encoder":
        if self.kind == "run":
            from hlss_model.runs import run_encoder

            return run_encoder(self.ref, self.name)
        from hlss_model.encoders import timm_encoder

        return timm_encoder(self.ref, self.weights, self.name)


def extract_slides(store: str, encoders: list[EncoderSpec], slides: list[tuple[str, str]] | None,
                   batch_size: int, device: str, dtype: str,
                   tile_filter: dict[str, float] | None = None) -> "ExtractReport":
    """Extract features of ``slides`` (all complete slides if None) with each encoder; skips finished work.

    ``tile_filter``: QC limits (:class:`pipeline.qc.TileFilter` fields); tiles outside them get NaN rows.
    """
    from hlss_model.extract import extract_features
    from pipeline.qc import TileFilter

    return extract_features(store, [e.build() for e in encoders], batch_size=batch_size, device=device,
                            dtype=dtype, slides=slides, tile_filter=TileFilter.from_dict(tile_filter))

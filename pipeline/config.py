"""Tiling parameters: one typed, validated object built at the edge (CLI, flows, Python).

Also the one config mechanism of the project's settings: frozen dataclasses whose own checks live in
``__post_init__`` (so a constructor raises a plain ``ValueError`` with a clear message), read from
mappings (YAML, flow parameters) by pydantic (``pydantic.TypeAdapter``), which checks types and,
with :data:`STRICT`, refuses unknown keys. Prefect's parameter models are pydantic models whose
defaults come from these classes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

from pydantic import ConfigDict

from .codecs import TileCompression
from .reader import READERS
from .tissue import TissueParams

__all__ = ["TilingParams", "STRICT"]

STRICT = ConfigDict(extra="forbid")  # a typo in a settings key is an error, never a silent default


@dataclass(frozen=True)
class TilingParams:
    """How slides become tiles.

    target_mpp:   µm per pixel of the stored tiles (0.5 ≈ 20x).
    tile_size:    tile side in px at ``target_mpp``; a tile covers ``tile_size * target_mpp`` µm.
    min_tissue:   keep tiles whose tissue fraction (from the mask) is at least this, in [0, 1].
    mask_mpp:     µm per pixel of the thumbnail the tissue mask is computed on.
    reader:       "auto" (tiffslide, then openslide), "tiffslide" or "openslide".
    shard_tiles:  tiles per Zarr shard (one file per shard on disk; one tile per chunk).
    slide_timeout_s: wall-clock seconds one slide may take (open, thumbnail, tiles, write) before it
                  fails alone; 0 disables the budget. Does not change what is written.
    """

    __pydantic_config__ = STRICT

    target_mpp: float = 0.5
    tile_size: int = 256
    min_tissue: float = 0.5
    mask_mpp: float = 8.0
    reader: str = "auto"
    shard_tiles: int = 256
    slide_timeout_s: float = 1800.0
    compression: TileCompression = field(default_factory=TileCompression)
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if not 0.01 <= self.target_mpp <= 100:
            raise ValueError(f"target_mpp {self.target_mpp} is outside 0.01-100 µm/px")
        if not 16 <= self.tile_size <= 4096:
            raise ValueError(f"tile_size {self.tile_size} is outside 16-4096 px")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue {self.min_tissue} must be between 0 and 1")
        if not 0.5 <= self.mask_mpp <= 64:
            raise ValueError(f"mask_mpp {self.mask_mpp} is outside 0.5-64 µm/px")
        if self.reader not in READERS:
            raise ValueError(f"reader {self.reader!r} is not one of {', '.join(READERS)}")
        if not 1 <= self.shard_tiles <= 4096:
            raise ValueError(f"shard_tiles {self.shard_tiles} is outside 1-4096")
        if not (math.isfinite(self.slide_timeout_s) and self.slide_timeout_s >= 0):
            raise ValueError(f"slide timeout {self.slide_timeout_s} s must be a number of seconds >= 0 (0: no limit)")

    def output_params(self) -> dict:
        """The parameters that decide what is written (the reader, shard layout and time budget do not)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_size": self.tile_size,
            "min_tissue": self.min_tissue,
            "mask_mpp": self.mask_mpp,
            "compression": self.compression.to_dict(),
            "tissue": self.tissue.to_dict(),
        }

    def params_hash(self, mpp_override: float | None = None) -> str:
        """Hash of :meth:`output_params` (and a manifest mpp override), to tell when a slide must be redone."""
        doc = {**self.output_params(), "mpp_override": mpp_override}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def params_hashes(self, mpp_override: float | None = None) -> tuple[str, ...]:
        """:meth:`params_hash`, then the hashes a stored slide may carry and still be current: with
        ``"auto"`` JPEG chroma subsampling, also these parameters at 4:4:4 (the default before
        ``"auto"``: such tiles keep at least the colour auto keeps, so a default change retiles nothing)."""
        hashes = [self.params_hash(mpp_override)]
        c = self.compression
        if c.kind == "jpeg" and c.subsampling == "auto":
            hashes.append(replace(self, compression=replace(c, subsampling="444")).params_hash(mpp_override))
        return tuple(hashes)

"""Tile compression for the zarr 3 tile store.

Two things live here:

* :class:`JpegCodec`, a zarr 3 *array-to-bytes* codec (name ``"hlss.jpeg"``) that stores a uint8
  chunk of RGB (or grayscale) tiles as one baseline JPEG image, encoded with libjpeg-turbo through
  :func:`imagecodecs.jpeg8_encode` (which releases the GIL). With the store's chunk shape
  ``(1, T, T, 3)`` every chunk is exactly one tile and its bytes are a plain ``.jpg`` file, followed
  in the store by the 4 bytes of the ``crc32c`` codec that :func:`pipeline.store.create_array` puts
  after it (JPEG decoders stop at the end-of-image marker, so the chunk still opens as a ``.jpg``;
  zarr checks the checksum before this codec decodes, so a damaged tile is an error, not other
  pixels). A chunk
  ``(n, T, T, 3)`` is encoded as one ``(n*T, T, 3)`` image (tiles stacked vertically, the layout
  neuroglancer uses for JPEG chunks); with ``T % 16 == 0`` no 8x8/16x16 JPEG block straddles two
  tiles, so each tile is coded independently.
  Neither imagecodecs (2026.3.6) nor numcodecs/zarr (0.16 / 3.1) ship a JPEG codec for zarr
  *format 3*: imagecodecs' ``imagecodecs.numcodecs.Jpeg8`` is a numcodecs (format 2) codec and
  ``zarr.codecs.numcodecs`` has no image codecs, so this module provides one.
* :class:`TileCompression`, the small typed choice the store and the CLI use:
  ``"jpeg"``, ``"jpeg:95"``, ``"lossless"``, ``"lossless:zstd5"``, ``"none"``...

Registration: importing this module registers the codec with zarr (``zarr.registry``). Installed
packages also register it through the entry point
``[project.entry-points."zarr.codecs"] "hlss.jpeg" = "pipeline.codecs:JpegCodec"`` so plain zarr
can read the arrays without importing :mod:`pipeline` first.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType

__all__ = [
    "JPEG_CODEC_NAME",
    "JpegCodec",
    "TileCompression",
    "psnr",
    "register",
]

JPEG_CODEC_NAME = "hlss.jpeg"
"""The ``name`` of :class:`JpegCodec` in ``zarr.json``."""

Subsampling = Literal["444", "422", "420"]
_SUBSAMPLINGS: tuple[str, ...] = ("444", "422", "420")
_TILE_SUBSAMPLINGS: tuple[str, ...] = ("auto", *_SUBSAMPLINGS)  # TileCompression: auto settles per slide
_JPEG_MAX_DIM = 65535


def _parse_quality(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"JPEG quality must be an int in 1..100, got {value!r}")
    if not 1 <= int(value) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {value}")
    return int(value)


def _parse_subsampling(value: Any) -> str:
    value = str(value).replace(":", "")
    if value not in _SUBSAMPLINGS:
        raise ValueError(f"JPEG subsampling must be one of {_SUBSAMPLINGS}, got {value!r}")
    return value


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Array-to-bytes zarr 3 codec storing uint8 image chunks as baseline JPEG.

    The chunk's last axis is the channel axis (1 or 3 channels; 3 = RGB, stored as YCbCr), the
    two axes before it are height and width, and any leading axes are stacked vertically.
    Lossy: use it for RGB tiles only, never for labels or masks.

    Parameters
    ----------
    quality:
        libjpeg quality, 1..100 (default 90).
    subsampling:
        Chroma subsampling for RGB: ``"420"`` (default, smallest and fastest), ``"422"`` or
        ``"444"`` (full-resolution chroma: on an RGB-JPEG Aperio slide at q90, 40 dB PSNR instead
        of 29.5 dB, with luma near 48 dB either way; 1.5x larger, encode 0.52 vs 0.38 ms per 256 px
        tile).
    """

    is_fixed_size = False

    quality: int
    subsampling: str

    def __init__(self, *, quality: int = 90, subsampling: Subsampling | str = "420") -> None:
        object.__setattr__(self, "quality", _parse_quality(quality))
        object.__setattr__(self, "subsampling", _parse_subsampling(subsampling))

    # -- metadata -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, configuration = parse_named_configuration(
            data, JPEG_CODEC_NAME, require_configuration=False
        )
        configuration = dict(configuration or {})
        unknown = set(configuration) - {"quality", "subsampling"}
        if unknown:
            raise ValueError(f"unknown {JPEG_CODEC_NAME} configuration keys: {sorted(unknown)}")
        return cls(**configuration)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {
            "name": JPEG_CODEC_NAME,
            "configuration": {"quality": self.quality, "subsampling": self.subsampling},
        }

    def validate(
        self,
        *,
        shape: tuple[int, ...],
        dtype: ZDType[TBaseDType, TBaseScalar],
        chunk_grid: ChunkGrid,
    ) -> None:
        # Called for the outer chunk grid of unsharded arrays only (the sharding codec does not
        # validate its inner codecs); the encoder re-checks the actual chunk shape.
        if dtype.to_native_dtype() != np.dtype("uint8"):
            raise ValueError(f"{JPEG_CODEC_NAME} needs a uint8 array, got {dtype}")
        chunk_shape = getattr(chunk_grid, "chunk_shape", None)
        if chunk_shape is not None:
            _image_shape(tuple(chunk_shape))

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size

    # -- encode / decode ----------------------------------------------------------------------
    def encode_array(self, arr: np.ndarray) -> bytes:
        """The JPEG stream of one chunk ``arr`` (uint8, see the module docstring for its shapes)."""
        if arr.dtype != np.uint8:
            raise ValueError(f"{JPEG_CODEC_NAME} encodes uint8 only, got {arr.dtype}")
        image = np.ascontiguousarray(arr).reshape(_image_shape(arr.shape))
        encoded = imagecodecs.jpeg8_encode(
            image,
            level=self.quality,
            subsampling=self.subsampling if image.ndim == 3 else None,
            out=_encode_buffer(image.nbytes),
        )
        return bytes(encoded)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return chunk_spec.prototype.buffer.from_bytes(self.encode_array(chunk_array.as_numpy_array()))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        decoded = imagecodecs.jpeg8_decode(chunk_bytes.as_numpy_array())
        out = decoded.reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        # libjpeg-turbo runs without the GIL: worker threads encode the chunks of a shard in
        # parallel, as zarr's own Blosc/Zstd codecs do.
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


_scratch = threading.local()


_SCRATCH_MAX = 4 << 20  # bytes: larger images (rare; not tiles) get a buffer of their own


def _encode_buffer(nbytes: int) -> bytearray | None:
    """This thread's output buffer for encoding ``nbytes`` of pixels: room for the image's own size
    plus headers. libjpeg-turbo writes into it instead of a buffer it grows from 4 KiB by doubling
    and copying, and imagecodecs then copies once more into new bytes (together about a fifth of a
    256 px tile's encode). A stream that does not fit comes back in bytes of its own. None (let
    libjpeg-turbo allocate) for images over ``_SCRATCH_MAX``."""
    size = nbytes + 4096
    if size > _SCRATCH_MAX:
        return None
    buf = getattr(_scratch, "out", None)
    if buf is None or len(buf) < size:
        buf = _scratch.out = bytearray(size)
    return buf


def _image_shape(chunk_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 2-D (grayscale) or 3-D (RGB) image shape a chunk is encoded as."""
    if len(chunk_shape) < 2:
        raise ValueError(f"{JPEG_CODEC_NAME} needs chunks of >= 2 dimensions, got {chunk_shape}")
    if len(chunk_shape) >= 3 and chunk_shape[-1] in (1, 3):
        *lead, h, w, c = chunk_shape
    else:  # (..., H, W) grayscale
        *lead, h, w = chunk_shape
        c = 1
    height = math.prod(lead) * h
    if height > _JPEG_MAX_DIM or w > _JPEG_MAX_DIM:
        raise ValueError(
            f"{JPEG_CODEC_NAME}: chunk {chunk_shape} makes a {height}x{w} JPEG image, over the "
            f"{_JPEG_MAX_DIM} px limit; use smaller (inner) chunks such as (1, T, T, 3)"
        )
    return (height, w, 3) if c == 3 else (height, w)


def register() -> None:
    """Register :class:`JpegCodec` with zarr's codec registry (idempotent)."""
    register_codec(JPEG_CODEC_NAME, JpegCodec)


register()


# ---------------------------------------------------------------------------------------------
# The user-facing choice
# ---------------------------------------------------------------------------------------------

Kind = Literal["jpeg", "lossless", "none"]
Cname = Literal["lz4", "zstd"]
Shuffle = Literal["noshuffle", "shuffle", "bitshuffle"]
_KINDS: tuple[str, ...] = ("jpeg", "lossless", "none")
_CNAMES: tuple[str, ...] = ("lz4", "zstd")
_SHUFFLES: tuple[str, ...] = ("noshuffle", "shuffle", "bitshuffle")

_FORMS = (
    "'jpeg', 'jpeg:Q' (Q = quality 1..100), 'jpeg:Q:auto' (the default chroma subsampling: the "
    "source's where tiles are crops on its JPEG grid, else 444), 'jpeg:Q:444' (or 422/420), "
    "'lossless', 'lossless:lz4', 'lossless:zstd3' or 'lossless:zstd-3' (codec + optional Blosc level "
    "1..9), "
    "'lossless:zstd3:bitshuffle' (or noshuffle/shuffle), 'none'"
)


@dataclass(frozen=True)
class TileCompression:
    """How RGB tiles are compressed in the tile store.

    ``kind``:
        ``"jpeg"``: :class:`JpegCodec` (lossy, per tile, ``quality`` and ``subsampling``);
        ``"lossless"``: :class:`zarr.codecs.BloscCodec` with ``cname``/``level``/``shuffle``;
        ``"none"``: raw bytes.
    Parse CLI strings with :meth:`from_name`; :meth:`for_source` settles ``"auto"`` for one slide;
    :meth:`codecs_for` gives the ``create_array`` keywords.

    ``subsampling`` ``"auto"`` (the default) stores a slide's tiles at its source's chroma
    subsampling when they are plain crops on the source's JPEG coding-unit grid (a YCbCr 4:2:0
    level read at its own resolution, tile corners on multiples of 16 px:
    :func:`pipeline.tiles.source_chroma`), and at 4:4:4 otherwise (resampled tiles, RGB-JPEG, JPEG
    2000 or uncompressed sources): the stored tiles never hold less colour resolution than the
    source. On such a 4:2:0 source (``benchmarks/README.md``, "Chroma subsampling that follows the
    source") 4:2:0 tiles are within 0.5-0.7 dB of 4:4:4 ones in every YCbCr channel against the
    source pixels, 18 % smaller and a third cheaper to encode, since 4:4:4 would spend bits on the
    decoder's chroma interpolation; off the grid they lose 4.7 dB of chroma, so auto keeps 4:4:4 there.

    Defaults (``benchmarks/compression.py``, 1000 real H&E tissue tiles of 256 px, 2-core VM):
    JPEG q90 with full-resolution colour (4:4:4) stores a tile in about 38 KB (5.2x smaller than
    raw) at 40 dB PSNR, encoding in about 0.5 ms and decoding in about 0.6 ms. Forced 4:2:0 on
    those tiles (an RGB-JPEG scan: full-resolution chroma) is 1.5x smaller and a little faster
    but, at 29.5 dB, loses stain colour detail (luma 48 dB, chroma 32 dB), which a training store
    should keep. Blosc on dense tissue saves only 7 to 16 % (lz4:
    0.1 ms per tile; zstd: 0.6 to 4 ms), so the lossless default is the cheap one, lz4 without
    shuffle (Blosc byte shuffle is a no-op on uint8, bit shuffle costs 2x for under 1 %).
    """

    kind: Kind = "jpeg"
    quality: int = 90
    level: int = 5
    cname: Cname = "lz4"
    shuffle: Shuffle = "noshuffle"
    subsampling: Subsampling | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"compression kind must be one of {_KINDS}, got {self.kind!r}")
        _parse_quality(self.quality)
        if self.subsampling != "auto":
            _parse_subsampling(self.subsampling)
        if self.cname not in _CNAMES:
            raise ValueError(f"lossless codec must be one of {_CNAMES}, got {self.cname!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not 0 <= self.level <= 9:
            raise ValueError(f"lossless level must be an int in 0..9, got {self.level!r}")
        if self.shuffle not in _SHUFFLES:
            raise ValueError(f"shuffle must be one of {_SHUFFLES}, got {self.shuffle!r}")

    def for_source(self, chroma: str | None) -> TileCompression:
        """This choice for a slide whose tiles are crops on the coding-unit grid of source JPEG tiles
        with chroma subsampling ``chroma`` (None: not such crops, see
        :func:`pipeline.tiles.source_chroma`): ``"auto"`` becomes ``chroma``, or ``"444"`` for None;
        anything else is returned as it is."""
        if self.kind != "jpeg" or self.subsampling != "auto":
            return self
        return replace(self, subsampling=_parse_subsampling(chroma) if chroma is not None else "444")

    # -- zarr ---------------------------------------------------------------------------------
    def codecs_for(self) -> dict[str, Any]:
        """Keyword arguments for ``group.create_array(...)`` (the inner-chunk codecs when
        ``shards=`` is given): ``filters``, ``serializer`` and ``compressors``. ``"auto"``
        subsampling, not settled for a source (:meth:`for_source`), is 4:4:4."""
        if self.kind == "jpeg":
            return {
                "filters": None,
                "serializer": JpegCodec(quality=self.quality, subsampling=self.for_source(None).subsampling),
                "compressors": None,
            }
        if self.kind == "lossless":
            return {
                "filters": None,
                "serializer": BytesCodec(),
                "compressors": (
                    BloscCodec(
                        cname=self.cname, clevel=self.level, shuffle=self.shuffle, typesize=1
                    ),
                ),
            }
        return {"filters": None, "serializer": BytesCodec(), "compressors": None}

    @property
    def lossy(self) -> bool:
        return self.kind == "jpeg"

    # -- names and dicts ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Canonical CLI string; ``from_name(c.name) == c`` up to irrelevant fields."""
        if self.kind == "jpeg":
            return f"jpeg:{self.quality}:{self.subsampling}"
        if self.kind == "lossless":
            return f"lossless:{self.cname}-{self.level}:{self.shuffle}"
        return "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description with only the fields that matter for ``kind``
        (so changing an unused field does not change a params hash)."""
        if self.kind == "jpeg":
            return {"kind": "jpeg", "quality": self.quality, "subsampling": self.subsampling}
        if self.kind == "lossless":
            return {
                "kind": "lossless",
                "cname": self.cname,
                "level": self.level,
                "shuffle": self.shuffle,
            }
        return {"kind": "none"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileCompression:
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> TileCompression:
        """Parse ``"jpeg"``, ``"jpeg:95"``, ``"jpeg:95:444"``, ``"jpeg:90:auto"``, ``"lossless"``, ``"lossless:zstd5"``,
        ``"lossless:lz4:noshuffle"``, ``"none"`` (case-insensitive)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"empty compression name; expected one of {_FORMS}")
        parts = [p.strip() for p in name.strip().lower().split(":")]
        kind, args = parts[0], parts[1:]
        if kind in ("raw", "uncompressed"):
            kind = "none"
        if kind == "none":
            if args:
                raise ValueError(f"'none' takes no options, got {name!r}")
            return cls(kind="none")
        if kind in ("jpeg", "jpg"):
            if len(args) > 2:
                raise ValueError(f"too many options in {name!r}; expected {_FORMS}")
            quality = 90
            subsampling = cls.subsampling
            if args:
                if not args[0].isdigit():
                    raise ValueError(
                        f"JPEG quality must be an integer 1..100, got {args[0]!r} in {name!r}"
                    )
                quality = int(args[0])
                if not 1 <= quality <= 100:
                    raise ValueError(f"JPEG quality must be in 1..100, got {quality} in {name!r}")
            if len(args) == 2:
                subsampling = args[1].replace(":", "")
                if subsampling not in _TILE_SUBSAMPLINGS:
                    raise ValueError(
                        f"JPEG subsampling must be one of {_TILE_SUBSAMPLINGS}, got {args[1]!r} in {name!r}"
                    )
            return cls(kind="jpeg", quality=quality, subsampling=subsampling)  # type: ignore[arg-type]
        if kind == "lossless":
            if len(args) > 2:
                raise ValueError(f"too many options in {name!r}; expected {_FORMS}")
            default = cls(kind="lossless")
            cname, level, shuffle = default.cname, default.level, default.shuffle
            if args:
                m = re.fullmatch(r"(lz4|zstd)[-_]?(\d*)", args[0])
                if m is None:
                    raise ValueError(
                        f"lossless codec must be lz4 or zstd with an optional level 1..9 "
                        f"(e.g. 'zstd5'), got {args[0]!r} in {name!r}"
                    )
                cname = m.group(1)
                if m.group(2):
                    level = int(m.group(2))
                    if not 1 <= level <= 9:
                        raise ValueError(f"Blosc level must be in 1..9, got {level} in {name!r}")
                else:  # measured (benchmarks/compression.py): zstd-3/5 cost 4-6x zstd-1 for ~1-4 %
                    level = 1 if cname == "zstd" else default.level
                # lz4: shuffles only cost time; zstd (chosen for size): bitshuffle is smallest
                shuffle = "noshuffle" if cname == "lz4" else "bitshuffle"
            if len(args) == 2:
                shuffle = args[1]
                if shuffle not in _SHUFFLES:
                    raise ValueError(
                        f"shuffle must be one of {_SHUFFLES}, got {args[1]!r} in {name!r}"
                    )
            return cls(kind="lossless", cname=cname, level=level, shuffle=shuffle)  # type: ignore[arg-type]
        raise ValueError(f"unknown compression {name!r}; expected {_FORMS}")

    def __str__(self) -> str:
        return self.name


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images ``b`` vs ``a`` (``inf`` if equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(255.0**2 / mse))

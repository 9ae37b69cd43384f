"""One slide, end to end: open, resolve mpp, detect tissue, grid, read tiles, write, commit.

:func:`tile_slide` never raises for a bad slide: it returns a :class:`SlideResult` with status
"failed" and a message naming the file and the problem, and records the failure in the store
(unless a complete earlier version of the slide is there, which is kept as it was).
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, TypeVar

import numpy as np
import zarr

from .cohort import SlideSpec
from .config import TilingParams
from .files import utc_now
from .grid import TileGrid, pick_level, tile_grid
from .qc import QC_FIELDS, qc_caption, render_qc, tile_measures
from .location import scrub
from .reader import MppInfo, SlideError, SlideReader, TimeBudget, open_slide, read_thumbnail, resolve_mpp
from .source import same_source, source_info
from . import layout as L
from ._shards import ShardLayout, codec_pool, write_shard
from .store import StagedSlide, StoreWriter, create_array
from .tiles import ReadPlan, iter_tile_blocks, plan_reads, source_chroma
from .tissue import TissueMask, detect_tissue

__all__ = ["SlideResult", "SlidePlan", "plan_slide", "tile_slide", "needs_tiling", "change_reason", "record_failure"]

log = logging.getLogger(__name__)

_MAX_THUMB_PX = 4096
_QUEUE_BATCHES = 2
_T = TypeVar("_T")


@dataclass
class SlideResult:
    patient_id: str | None
    slide_id: str | None
    path: str
    status: Literal["complete", "failed", "skipped"]
    n_tiles: int = 0
    error: str | None = None
    warning: str | None = None
    seconds: float = 0.0


class _SlideFailure(Exception):
    """A problem with this slide's content (no tissue, too small): recorded, not a crash."""


def needs_tiling(writer: StoreWriter, spec: SlideSpec, params: TilingParams) -> bool:
    """Whether the slide must be (re)tiled: not complete, unreadable, or its source or parameters changed."""
    return change_reason(writer, spec, params) is not None


def change_reason(writer: StoreWriter, spec: SlideSpec, params: TilingParams, *,
                  attrs: dict | None = None, src: dict | OSError | None = None) -> str | None:
    """Why ``spec`` must be (re)tiled, or None when its stored version is current.

    ``attrs``: the stored slide's attributes (read from ``writer`` when not given); ``src``: its
    :func:`~pipeline.source.source_info`, or the OSError that computing it raised (computed when not
    given). Label, split and patient are not tiling reasons (see :mod:`pipeline.runner`).
    A changed mtime alone is not a reason (a copy or ``touch`` keeps the content); the content
    fingerprint decides, and it is computed for every slide anyway (about 1 MiB read).
    """
    attrs = writer.slide_attrs(spec.patient_id, spec.slide_id) if attrs is None else attrs
    if attrs is None:
        return "new"
    if attrs.get(L.STATUS) != L.COMPLETE:
        return f"previous attempt {attrs.get('status', 'unfinished')}"
    if src is None:
        try:
            src = source_info(spec.path)
        except OSError as e:
            src = e
    if isinstance(src, OSError):
        return f"source unreadable ({src.strerror or src})"
    old = attrs.get(L.SOURCE) or {}
    if old.get("bytes") != src["bytes"]:
        return f"source size changed ({old.get('bytes')} -> {src['bytes']} bytes)"
    if not same_source(old, src):
        return "source content changed (fingerprint)"
    if attrs.get(L.PARAMS_HASH) not in params.params_hashes(spec.mpp):
        return "tiling parameters changed"
    return None


def tile_slide(
    spec: SlideSpec,
    writer: StoreWriter,
    params: TilingParams,
    *,
    progress: Callable[[int], None] | None = None,
    overlap: bool = False,
) -> SlideResult:
    """Tile one slide into the store. See the module docstring for the failure contract.

    ``overlap``: read the next tiles in a thread while the current shard is encoded and written
    (the runner turns it on for workers with more than one thread).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    budget = TimeBudget(spec.path, params.slide_timeout_s)
    result = SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "failed")
    staged: StagedSlide | None = None
    keep_staged = False  # a content failure keeps the thumbnail and mask already staged, for QC
    try:
        src = source_info(spec.path) if spec.path.exists() else None
        timings: dict[str, float] = {}
        with open_slide(spec.path, params.reader) as slide:  # type: ignore[arg-type]
            timings["open_s"] = time.perf_counter() - t0
            staged = writer.stage()
            attrs = _write_slide(slide, spec, params, staged.group, timings, progress, overlap, budget)
        attrs.update(status="complete", source=src)
        result.n_tiles = attrs["n_tiles"]
        result.warning = attrs.get("mpp_warning")
        result.status = "complete"
    except SlideError as e:
        result.error = str(e)
    except _SlideFailure as e:
        result.error = f"{spec.path}: {e}"
        keep_staged = True
    except OSError as e:
        result.error = f"{spec.path}: {_os_error(e)}"
        log.debug("tiling %s failed", spec.path, exc_info=True)
    except Exception as e:  # a decoder or I/O error deep in a backend: still this slide's problem only
        result.error = f"{spec.path}: {type(e).__name__}: {e}"
        log.debug("tiling %s failed", spec.path, exc_info=True)
    result.seconds = time.perf_counter() - t0
    if result.error:
        result.error = scrub(result.error)  # it is stored and printed: never a credential
    if result.status == "complete":
        attrs["timings"]["total_s"] = round(result.seconds, 3)
        attrs["timings"]["cpu_s"] = round(time.process_time() - cpu0, 3)  # all threads of the worker
        staged.group.update_attributes(attrs)
        writer.commit(staged, spec.patient_id, spec.slide_id, _patient_attrs(spec))
        return result
    try:
        _record_failure(writer, spec, params, result, staged, keep_staged)
    except OSError as e:  # e.g. the disk is still full: report the failure all the same
        result.error += f" (the failure could not be recorded in the store either: {_os_error(e)})"
        if staged is not None:
            writer.discard(staged)
    return result


_STORE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error(e: OSError) -> str:
    """An I/O error in words; a full disk, quota or file size limit says what to do."""
    if e.errno in _STORE_FULL:
        return (f"writing failed: {e.strerror} ({errno.errorcode[e.errno]}): the disk is full or a quota or "
                "file size limit was hit; nothing of this slide was committed: free space and rerun")
    return f"{type(e).__name__}: {e}"


def record_failure(writer: StoreWriter, spec: SlideSpec, params: TilingParams, error: str) -> SlideResult:
    """Report a slide that failed outside :func:`tile_slide` (its worker died), and record it in the store."""
    result = SlideResult(spec.patient_id, spec.slide_id, str(spec.path), "failed", error=scrub(error))
    _record_failure(writer, spec, params, result, None, False)
    return result


def _patient_attrs(spec: SlideSpec) -> dict:
    return spec.patient_attrs()


def _record_failure(
    writer: StoreWriter,
    spec: SlideSpec,
    params: TilingParams,
    result: SlideResult,
    staged: StagedSlide | None,
    keep_staged: bool,
) -> None:
    """Write a 'failed' slide group, unless a complete version exists (nothing written is ever lost)."""
    old = writer.slide_attrs(spec.patient_id, spec.slide_id)
    if staged is not None and (not keep_staged or (old or {}).get("status") == "complete"):
        writer.discard(staged)
        staged = None
    if old is not None and old.get("status") == "complete":
        return
    try:
        src = source_info(spec.path)
    except OSError:
        src = {"path": str(spec.path)}
    staged = staged or writer.stage()
    staged.group.attrs.update(
        status="failed",
        error=result.error,
        source=src,
        params_hash=params.params_hash(spec.mpp),
        failed_at=utc_now(),
    )
    writer.commit(staged, spec.patient_id, spec.slide_id, _patient_attrs(spec))


@dataclass
class SlidePlan:
    """Everything decided about a slide before its tiles are read.

    ``tissue_idx`` indexes ``grid.coords``: the tissue tiles, ascending; ``reads`` reads them in
    its own order, and :attr:`keep` is that order (how tiles are stored).
    """

    mpp: MppInfo
    thumbnail: np.ndarray  # (h, w, 3) uint8
    mask: TissueMask
    grid: TileGrid
    fractions: np.ndarray  # (len(grid.coords),) float32
    tissue_idx: np.ndarray  # (N,) int64
    level: int
    level_mpps: list[float]
    reads: ReadPlan | None

    @property
    def keep(self) -> np.ndarray:
        return self.tissue_idx[self.reads.order] if self.reads is not None else self.tissue_idx


def plan_slide(slide: SlideReader, params: TilingParams, mpp_override: float | None = None,
               budget: TimeBudget | None = None) -> SlidePlan:
    """Resolve mpp, detect tissue on a thumbnail at about ``mask_mpp`` µm/px, lay the grid, pick the
    tissue tiles and the pyramid level to read them from. Reads only the thumbnail (checking
    ``budget`` between its block reads)."""
    mpp = resolve_mpp(slide, mpp_override)
    if mpp.warning:
        log.warning("%s: %s", slide.path, mpp.warning)
    mpp0 = (mpp.x, mpp.y)
    w0, h0 = slide.dimensions
    thumb, tscale = read_thumbnail(slide, max(params.mask_mpp / min(mpp0), max(w0, h0) / _MAX_THUMB_PX, 1.0),
                                   budget=budget)
    mask = detect_tissue(thumb, tscale, mpp0, params.tissue)
    grid = tile_grid(slide.dimensions, mpp0, params.target_mpp, params.tile_size)
    fractions = mask.tile_fractions(grid.coords, grid.footprint) if len(grid.coords) else np.zeros(0, np.float32)
    tissue_idx = np.flatnonzero(fractions >= params.min_tissue)
    level_mpps = [mpp.x * slide.level_scale(lv)[0] for lv in range(slide.level_count)]
    level = pick_level(level_mpps, params.target_mpp)
    reads = None
    if len(tissue_idx):
        reads = plan_reads(grid.coords[tissue_idx], grid.footprint, level, slide.level_scale(level), params.tile_size)
    return SlidePlan(mpp, thumb, mask, grid, fractions, tissue_idx, level, level_mpps, reads)


def _write_slide(
    slide: SlideReader,
    spec: SlideSpec,
    params: TilingParams,
    group: zarr.Group,
    timings: dict[str, float],
    progress: Callable[[int], None] | None,
    overlap: bool,
    budget: TimeBudget | None = None,
) -> dict:
    t = time.perf_counter()
    p = plan_slide(slide, params, spec.mpp, budget)
    timings["tissue_s"] = time.perf_counter() - t
    mpp, grid = p.mpp, p.grid
    w0, h0 = slide.dimensions
    _write_small(group, L.THUMBNAIL, p.thumbnail, {L.SCALE: list(p.mask.scale)})
    _write_small(group, L.TISSUE_MASK, p.mask.mask, {L.SCALE: list(p.mask.scale)})
    qc_attrs = {"mpp0": [mpp.x, mpp.y], "mpp_source": mpp.source, "target_mpp": params.target_mpp,
                "tile_size": params.tile_size, "min_tissue": params.min_tissue, "mask_mpp": params.mask_mpp,
                "tissue_params": params.tissue.to_dict()}
    if len(grid.coords) == 0 or len(p.keep) == 0:  # a failure on content: still a QC picture, without tiles
        _write_qc(group, spec, p, qc_attrs, np.zeros((0, 2), np.int64), len(grid.coords),
                  "no tissue tiles" if len(grid.coords) else "slide smaller than one tile")
    if len(grid.coords) == 0:
        tile_um = params.tile_size * params.target_mpp
        raise _SlideFailure(
            f"slide is smaller than one tile: {w0}x{h0} px = {w0 * mpp.x:.0f}x{h0 * mpp.y:.0f} µm, "
            f"a tile is {params.tile_size} px at {params.target_mpp} µm/px = {tile_um:g} µm"
        )
    if len(p.keep) == 0:
        raise _SlideFailure(
            f"no tissue tiles: none of the {len(grid.coords)} grid tiles has tissue fraction >= {params.min_tissue} "
            f"(tissue covers {100 * p.mask.mask.mean():.1f}% of the thumbnail)"
        )
    level, plan, order = p.level, p.reads, p.keep
    n = len(order)
    T = params.tile_size

    t = time.perf_counter()
    _write_small(group, L.COORDS, grid.coords[order].astype(np.int64), {L.UNITS: L.spec(L.COORDS).unit})
    _write_small(group, L.TISSUE, p.fractions[order].astype(np.float32), {L.UNITS: L.spec(L.TISSUE).unit})
    shard = min(params.shard_tiles, n)
    # "auto" chroma subsampling: the source's, where the tiles are crops on its JPEG grid
    tissue_coords = grid.coords[p.tissue_idx]
    compression = params.compression.for_source(source_chroma(slide, tissue_coords, plan))
    # create_array writes every chunk: every tile holds tissue, and skipping zarr's per-chunk "is it
    # all fill value?" scan saves a third of the write time
    tiles = create_array(group, L.TILES, shape=(n, T, T, 3), dtype="uint8", chunks=(1, T, T, 3),
                         shards=(shard, T, T, 3), fill_value=0, **compression.codecs_for())
    qc = {k: np.zeros(n, np.float32) for k in QC_FIELDS}
    _pump_tiles(slide, tissue_coords, plan, tiles, shard, progress, overlap,
                qc=qc, ink_hues=params.tissue.ink_hues, dark_value=params.tissue.dark_value, budget=budget)
    timings["tiles_s"] = time.perf_counter() - t
    t = time.perf_counter()
    qc_group = group.create_group(L.TILE_QC)
    for k, v in qc.items():
        _write_small(qc_group, k, v, {L.UNITS: L.TILE_QC_UNITS[k]})
    # version 2: colour measures on every 6th pixel (version 1: every 4th)
    qc_group.update_attributes({"fields": list(QC_FIELDS), "version": 2,
                                "ink_hues": [list(h) for h in params.tissue.ink_hues],
                                "dark_value": params.tissue.dark_value})
    _write_qc(group, spec, p, qc_attrs, grid.coords[order], len(grid.coords), None)
    timings["qc_s"] = time.perf_counter() - t
    level_scale = slide.level_scale(level)
    return {
        "reader": slide.backend,
        "vendor": slide.vendor,
        "dimensions": [w0, h0],
        "mpp0": [mpp.x, mpp.y],
        "mpp_source": mpp.source,
        "mpp_warning": mpp.warning,
        "target_mpp": params.target_mpp,
        "tile_size": T,
        "tile_um": T * params.target_mpp,
        "footprint_px": list(grid.footprint),
        "level": level,
        "downsample": list(level_scale),
        "level_mpp": p.level_mpps[level],
        "resampled": plan.resample,
        "min_tissue": params.min_tissue,
        "mask_mpp": params.mask_mpp,
        "tissue_params": params.tissue.to_dict(),
        "compression": params.compression.to_dict(),
        "stored_compression": compression.to_dict(),
        "params_hash": params.params_hash(spec.mpp),
        "grid_shape": list(grid.shape),
        "n_grid": int(len(grid.coords)),
        "n_tiles": n,
        "label": spec.label,
        "split": spec.split,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _write_qc(group: zarr.Group, spec: SlideSpec, p: "SlidePlan", attrs: dict, coords: np.ndarray,
              n_grid: int, error: str | None) -> None:
    """The slide's QC picture ``qc`` (see :mod:`pipeline.qc`); never fails the slide."""
    try:
        caption = qc_caption(spec.patient_id, spec.slide_id, attrs, len(coords), n_grid, p.mask.fraction, error)
        image, info = render_qc(p.thumbnail, p.mask.mask, p.mask.scale, coords, p.grid.footprint, caption)
        _write_small(group, L.QC, image, {L.SCALE: info["scale"], "size": info["size"],
                                          "caption_px": info["caption_px"]})
    except Exception as e:  # a picture is for people: never lose the tiles over it
        log.warning("%s: QC picture not written: %s: %s", spec.path, type(e).__name__, e)


def _write_small(group: zarr.Group, name: str, data: np.ndarray, attrs: dict) -> None:
    arr = create_array(group, name, shape=data.shape, dtype=data.dtype, chunks=data.shape if data.size else None,
                       attrs=attrs)
    if data.size:
        arr[...] = data


def _shards(slide, coords, plan, shard: int,
            measure: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
            budget: TimeBudget | None = None,
            ) -> Iterator[tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Tiles in ``plan`` order, in shards of ``shard`` tiles (the last may be shorter), not copied.

    Yields ``(pieces, measures)``: ``pieces`` a list of ``(k, T, T, 3) uint8`` views of the blocks
    the tiles were read in, whose concatenation is the shard's tiles; ``measures`` ``{name: (s,)
    float32}`` what ``measure`` returns for those ``s`` tiles (empty without ``measure``), run on each
    block as it is read. A block that straddles two shards is shared by both: memory is about a
    shard's tiles plus one block.
    """
    def fresh() -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        return [], ({k: np.zeros(shard, np.float32) for k in QC_FIELDS} if measure is not None else {})

    pieces, qc = fresh()
    filled = 0
    for _, block in iter_tile_blocks(slide, coords, plan, budget):
        measured = measure(block) if measure is not None else {}
        pos = 0
        while pos < len(block):
            take = min(shard - filled, len(block) - pos)
            pieces.append(block[pos : pos + take])
            for k, v in measured.items():
                qc[k][filled : filled + take] = v[pos : pos + take]
            filled += take
            pos += take
            if filled == shard:
                yield pieces, qc
                pieces, qc = fresh()
                filled = 0
    if filled:
        yield pieces, {k: v[:filled] for k, v in qc.items()}


def _pump_tiles(slide, coords, plan, tiles: zarr.Array, shard: int, progress, overlap: bool,
                qc: dict[str, np.ndarray] | None = None, ink_hues=None, dark_value: float = 0.25,
                budget: TimeBudget | None = None) -> None:
    """Write every tile of ``plan`` into ``tiles``, one whole shard per write (as one object, see
    :mod:`pipeline._shards`; through zarr for a layout it does not handle); with ``qc``
    (``{name: (N,) float32}`` for :data:`~pipeline.qc.QC_FIELDS`), fill it with each tile's QC measures.

    The measures are taken on each block as it is read (see :func:`_shards`): with ``overlap``, in the
    reading thread, beside this one's encoding and writing. With ``overlap`` a thread reads the next
    shards while this one encodes and writes; memory stays bounded: at most ``_QUEUE_BATCHES`` shards
    wait in the queue, plus one being filled. ``budget`` is checked before every block read;
    ``progress(0)`` first tells that tile reading has begun.
    """
    written = 0
    if progress is not None:
        progress(0)
    measure = (lambda b: tile_measures(b, ink_hues, dark_value)) if qc is not None else None
    batches = _shards(slide, coords, plan, shard, measure, budget)
    layout = ShardLayout.of(tiles)
    pool = codec_pool() if layout is not None else None
    try:
        for pieces, measures in _prefetch(batches) if overlap else batches:
            n = sum(len(p) for p in pieces)
            if qc is not None:
                for k, v in measures.items():
                    qc[k][written : written + n] = v
            if layout is not None:  # one object per shard, chunks encoded in threads, same bytes as zarr's
                write_shard(layout, written // shard, pieces, pool)
            else:
                tiles[written : written + n] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            written += n
            if progress is not None:
                progress(n)
    finally:
        if pool is not None:
            pool.shutdown()
    if written != tiles.shape[0]:
        raise RuntimeError(f"wrote {written} tiles, expected {tiles.shape[0]}")


def _prefetch(items: Iterator[_T]) -> Iterator[_T]:
    """Run ``items`` in a thread, ``_QUEUE_BATCHES`` ahead of the consumer; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                _put(q, item, stop)
            _put(q, done, stop)
        except BaseException as e:  # hand the error to the consumer
            _put(q, e, stop)

    thread = threading.Thread(target=produce, name="tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue

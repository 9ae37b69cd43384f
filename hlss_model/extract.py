"""Feature extraction from the store: every tile batch is read and decoded once, fed to every encoder.

Reads run ahead of the model in a small thread pool (zarr decoding releases the GIL), so the model
waits on storage only when storage is slower than it; memory is bounded by
``batch_size x (prefetch + 1)`` tiles whatever the slide size. Each slide's arrays are staged and
committed whole (one rename on a folder; on an object store marked complete by its last PUT, see
:mod:`pipeline.store`), so an interrupted run loses at most the slides
in flight and a rerun skips every slide whose features match the encoder's weights and the tiles.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.ids import validate_id
from pipeline.location import scrub
from pipeline.qc import TileFilter
from pipeline.store import SlideStore, StoreDamageError, StoreWriter, tiles_version


from .encoders import Encoder
from .settings import EVALUATION, EXTRACTION

__all__ = ["extract_features", "embed_tiles", "ExtractReport", "resolve_device", "sample_rows", "read_ahead",
           "check_encoder_names"]

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    extracted: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # patient, slide, error
    tiles: int = 0
    seconds: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @classmethod
    def merged(cls, parts: Iterable["ExtractReport"], seconds: float | None = None) -> "ExtractReport":
        """One report of runs that went on side by side: lists and tiles add up; ``seconds`` is the
        wall time of the whole (default: the longest part's)."""
        parts = list(parts)
        total = cls(seconds=max((p.seconds for p in parts), default=0.0) if seconds is None else seconds)
        for part in parts:
            total.extracted += part.extracted
            total.skipped += part.skipped
            total.failed += part.failed
            total.tiles += part.tiles
        return total


def sample_rows(n: int, limit: int | None, seed: int = EVALUATION.seed) -> np.ndarray | None:
    """A seeded, sorted subset of ``limit`` of ``n`` tile rows; None (all rows) when ``n <= limit``."""
    if limit is None or n <= limit:
        return None
    return np.sort(np.random.default_rng([seed, n]).choice(n, limit, replace=False))


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for but absent (or an
    index beyond the visible devices) is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


class _Runner:
    """Moves encoders to a device once and runs them on uint8 batches."""

    def __init__(self, encoders: list[Encoder], device: str, amp: bool | None) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # work timm or autocast puts on "cuda" lands here, not on cuda:0
        self.amp = (self.device.type == "cuda") if amp is None else amp
        for enc in encoders:
            enc.model.to(self.device).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, enc: Encoder, batch: torch.Tensor) -> np.ndarray:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = enc.model(enc.preprocess(batch))
        return out.float().cpu().numpy()

    @property
    def precision(self) -> str:
        """What the forward passes compute in: ``bf16`` (autocast) or ``fp32``; recorded on the features."""
        return "bf16" if self.amp else "fp32"

    def upload(self, block: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(block)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t


def _is_done(store: SlideStore, p: str, s: str, enc: Encoder, version: str, filt: dict | None = None) -> bool:
    if enc.name not in store.feature_names(p, s):
        return False
    a = store.features(p, s, enc.name).attrs
    return (a.get("weights_fingerprint") == enc.fingerprint and a.get("tiles_version") == version
            and (a.get("tile_filter") or None) == (filt or None))


@dataclass
class _SlideJob:
    patient: str
    slide: str
    n: int
    version: str
    encoders: list[Encoder]
    rows: np.ndarray | None = None  # tile rows to compute (a tile filter's kept rows); None = all
    staged: dict = field(default_factory=dict)  # encoder name -> staged zarr array
    writes: list[Future] = field(default_factory=list)
    error: BaseException | None = None


def _plan(reader: SlideStore, encoders: list[Encoder], force: bool, report: ExtractReport,
          on_slide: Callable | None, slides: set[tuple[str, str]] | None,
          tile_filter: TileFilter | None = None) -> Iterator[_SlideJob]:
    filt = tile_filter.to_dict() if tile_filter is not None and tile_filter.active else None
    for rec in reader.records(status="complete"):
        p, s = rec.patient_id, rec.slide_id
        if slides is not None and (p, s) not in slides:
            continue
        rows = None
        try:
            if rec.damage is not None:
                raise rec.damage
            version = tiles_version(rec.attrs)
            todo = [e for e in encoders if force or not _is_done(reader, p, s, e, version, filt)]
            if todo and rec.n_tiles and filt is not None:
                rows = np.flatnonzero(reader.tile_keep(p, s, tile_filter))
        except Exception as e:  # damaged, or an old slide without tile_qc: this slide fails, the rest go on
            error = scrub(str(e) if isinstance(e, StoreDamageError) else f"{type(e).__name__}: {e}")
            log.error("%s/%s: feature extraction failed: %s", p, s, error)
            report.failed.append((p, s, error))
            if on_slide:
                on_slide(p, s, "failed")
            continue
        if not todo or rec.n_tiles == 0 or (rows is not None and len(rows) == 0):
            report.skipped.append((p, s))
            if on_slide:
                on_slide(p, s, "skipped")
            continue
        yield _SlideJob(p, s, rec.n_tiles, version, todo, rows)


def extract_features(store: str | Path, encoders: list[Encoder], batch_size: int = EXTRACTION.batch_size,
                     device: str = EXTRACTION.device, dtype: str = EXTRACTION.dtype, force: bool = False,
                     prefetch: int = 2, amp: bool | None = None,
                     on_slide: Callable[[str, str, str], None] | None = None,
                     on_tiles: Callable[[int], None] | None = None,
                     slides: Iterable[tuple[str, str]] | None = None,
                     tile_filter: TileFilter | None = None, clean_staging: bool = True) -> ExtractReport:
    """Write ``features/<encoder.name>`` ``(N, D)`` for every complete slide of ``store``.

    Reads run ``prefetch`` batches ahead across slide boundaries, and feature rows are written to
    the staged arrays by a separate thread, so the model only waits when storage is the bottleneck.

    Args:
        encoders: one or more; a slide's tiles are read once for all that still need it.
        batch_size: tiles per forward pass.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda:N``.
        dtype: stored feature dtype (``float32`` or ``float16``).
        force: recompute even when finished features match.
        amp: bf16 autocast; default on CUDA only. Recorded as the features' ``precision`` attr
            (``bf16`` or ``fp32``); features are stored as ``dtype`` either way.
        on_slide: called ``(patient, slide, status)`` with status extracted | skipped | failed.
        on_tiles: called with the number of tiles of each finished batch.
        slides: only these ``(patient, slide)`` (default: every complete slide).
        tile_filter: compute features only for the tiles it keeps (:meth:`SlideStore.tile_keep`).
            The array keeps one row per tile, aligned with coords; rows of filtered tiles are NaN,
            and the filter is recorded in the array's attrs (``tile_filter``, ``n_kept``), so
            features made with another filter (or none) are recomputed. A slide with no kept tile
            is skipped; one without ``tile_qc`` (older store) fails when a QC limit is asked for.
            Consumers must drop NaN rows (``np.isnan(f).any(axis=1)``) or use the same mask.
        clean_staging: first remove staging left by dead writers. False when other writers of this
            store run beside this one: a live writer's version set aside mid-commit looks like a
            dead one's, so the multi-device driver cleans once before starting its workers.
    """
    check_encoder_names([e.name for e in encoders])
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    reader, writer = SlideStore(store), StoreWriter(store)
    if clean_staging:
        writer.clean_staging()
    chunk_rows = writer.feature_chunk_rows(batch_size)
    run = _Runner(encoders, device, amp)
    report, t0 = ExtractReport(), time.perf_counter()
    wanted = None if slides is None else {(p, s) for p, s in slides}

    filt = tile_filter.to_dict() if tile_filter is not None and tile_filter.active else None

    def batches() -> Iterator[tuple[_SlideJob, int, int]]:
        for job in _plan(reader, encoders, force, report, on_slide, wanted, tile_filter):
            total = job.n if job.rows is None else len(job.rows)
            for start in range(0, total, batch_size):
                yield job, start, min(total, start + batch_size)

    def read(job: _SlideJob, start: int, stop: int) -> np.ndarray:
        if job.rows is None:
            return reader.tiles(job.patient, job.slide)[start:stop]
        return reader.tiles(job.patient, job.slide).get_orthogonal_selection((job.rows[start:stop],))

    def put(arr, job: _SlideJob, start: int, stop: int, feats: np.ndarray) -> None:
        if job.rows is None:
            arr[start:stop] = feats
        else:
            arr.set_orthogonal_selection((job.rows[start:stop], slice(None)), feats)

    def commit(job: _SlideJob) -> None:
        if job.error is not None:
            raise job.error
        for fut in job.writes:
            fut.result()
        for enc in job.encoders:
            extra = {"precision": run.precision, **({} if filt is None else {"tile_filter": filt,
                                                                             "n_kept": int(len(job.rows))})}
            writer.commit_features(job.staged[enc.name], job.patient, job.slide, enc.name,
                                   {**enc.attrs(), "dtype": dtype, "n": job.n, **extra}, job.version)

    def finish(job: _SlideJob) -> None:
        try:
            commit(job)
            report.extracted.append((job.patient, job.slide))
            status = "extracted"
        except Exception as e:  # one bad slide must not stop the cohort
            error = scrub(str(e) if isinstance(e, StoreDamageError) else f"{type(e).__name__}: {e}")
            log.error("%s/%s: feature extraction failed: %s", job.patient, job.slide, error)
            report.failed.append((job.patient, job.slide, error))
            for arr in job.staged.values():
                writer.discard_array(arr)
            status = "failed"
        if on_slide:
            on_slide(job.patient, job.slide, status)

    current: _SlideJob | None = None
    with ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="tile-read") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="feature-write") as out_pool:
        try:
            for job, start, stop, block in read_ahead(batches(), read, pool, prefetch):
                if job is not current:
                    if current is not None:
                        finish(current)
                    current = job
                if job.error is not None:
                    continue
                try:
                    if not job.staged:
                        fill = 0 if job.rows is None else float("nan")
                        job.staged = {e.name: writer.stage_features(job.n, e.dim, dtype, chunk_rows=chunk_rows,
                                                                    fill_value=fill)
                                      for e in job.encoders}
                    tiles = block.result()
                    batch = run.upload(tiles)
                    for enc in job.encoders:
                        feats = run(enc, batch).astype(dtype)
                        job.writes.append(out_pool.submit(put, job.staged[enc.name], job, start, stop, feats))
                except Exception as e:
                    job.error = e
                    continue
                report.tiles += len(tiles)
                if on_tiles:
                    on_tiles(len(tiles))
            if current is not None:
                finish(current)
                current = None
        finally:
            if current is not None:  # interrupted: leave no staging behind
                for fut in current.writes:
                    fut.cancel()
                out_pool.shutdown(wait=True)
                for arr in current.staged.values():
                    writer.discard_array(arr)
    report.seconds = time.perf_counter() - t0
    return report


def check_encoder_names(names: list[str]) -> None:
    """ValueError unless there is at least one name, all differ and each is a valid feature name
    (each becomes the key ``features/<name>`` of every slide)."""
    if not names:
        raise ValueError("extract_features: give at least one encoder")
    if len(set(names)) != len(names):
        raise ValueError(f"extract_features: encoder names must differ, got {names}")
    for name in names:
        validate_id(name, kind="feature name")


def read_ahead(items: Iterator[tuple], read: Callable, pool: ThreadPoolExecutor,
               depth: int) -> Iterator[tuple]:
    """``(*item, future)`` with ``read(*item)`` submitted ``depth`` items ahead of the consumer."""
    window: list[tuple] = []
    for item in items:
        window.append((*item, pool.submit(read, *item)))
        if len(window) > depth:
            yield window.pop(0)
    yield from window


def embed_tiles(store: str | Path, encoder: Encoder, slides: list[tuple[str, str]],
                batch_size: int = EXTRACTION.batch_size, device: str = EXTRACTION.device,
                max_tiles_per_slide: int | None = EVALUATION.max_tiles_per_slide, seed: int = EVALUATION.seed,
                prefetch: int = 2, on_damage: Callable[[StoreDamageError], None] | None = None,
                ) -> dict[tuple[str, str], np.ndarray]:
    """In-memory ``(n, D) float32`` features of each slide (for evaluation; nothing is written).

    ``max_tiles_per_slide`` takes the rows :func:`sample_rows` picks from larger slides.
    ``on_damage``: called with the error of each slide whose tiles cannot be read, which is then
    left out of the result (default: the error is raised).
    """
    reader = SlideStore(store)
    run = _Runner([encoder], device, None)
    damaged: set[tuple[str, str]] = set()

    def hit(key: tuple[str, str], e: StoreDamageError) -> None:
        if on_damage is None:
            raise e
        if key not in damaged:
            damaged.add(key)
            on_damage(e)

    def batches() -> Iterator[tuple]:
        for key in slides:
            try:
                tiles = reader.tiles(*key)
            except StoreDamageError as e:
                hit(key, e)
                continue
            rows = sample_rows(tiles.shape[0], max_tiles_per_slide, seed)
            for start in range(0, tiles.shape[0] if rows is None else len(rows), batch_size):
                yield key, tiles, rows, start

    def read(key, tiles, rows, start: int) -> np.ndarray:
        if rows is None:
            return tiles[start:start + batch_size]
        return tiles.get_orthogonal_selection((rows[start:start + batch_size],))

    parts: dict[tuple[str, str], list[np.ndarray]] = {key: [] for key in slides}
    with ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="tile-read") as pool:
        for key, _, _, _, block in read_ahead(batches(), read, pool, prefetch):
            try:
                tiles = block.result()
            except StoreDamageError as e:
                hit(key, e)
                continue
            if key not in damaged:
                parts[key].append(run(encoder, run.upload(tiles)))
    return {key: np.concatenate(p) if p else np.zeros((0, encoder.dim), np.float32) for key, p in parts.items()
            if key not in damaged}

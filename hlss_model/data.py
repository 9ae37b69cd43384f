"""Hierarchical patient -> slide -> tile sampling straight from the cohort store.

One item is one patient: S of its slides (a one-slide patient repeats its slide), T tiles of each
slide (without replacement where the slide has enough), V augmented views of each tile. A batch of
B patients is ``images [B, S, T, V, 3, H, W] float32`` plus the ids that say which rows share a
patient, a slide or a tile. Only the store's ``tiles`` arrays are read; no slide file is opened.

Every draw is a pure function of ``(seed, step, slot)``, so a run resumed at step k sees exactly
the batches an uninterrupted run would, whatever the number of DataLoader workers.

Damaged slides (see :class:`pipeline.store.StoreDamageError`): a slide whose metadata, patient
metadata or ``tiles`` array metadata cannot be read is left out of the index with a warning naming
it, as a failed slide is, and training goes on with the rest. A damaged tile chunk met during
training stops it with a :class:`TrainingDataError` naming patient, slide, array and file (the tiles
are not read ahead; ``hlss verify --repair`` retiles the slide).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.qc import TileFilter
from pipeline import layout
from pipeline.store import SlideStore, StoreDamageError, StoreError

from .augment import AugmentParams, HEAugment, ViewDraw

__all__ = ["CohortIndex", "PatientDataset", "HierarchicalBatchSampler", "TrainingDataError", "make_loader",
           "collate_patients", "ThreadLoader"]

log = logging.getLogger(__name__)


class TrainingDataError(StoreError):
    """A damaged tile chunk met while drawing a batch; the message names patient, slide, array and file."""

    def __init__(self, message: str) -> None:
        # from a DataLoader worker it comes back as "Caught ... Original Traceback ...: <message>"
        last = message.strip().splitlines()[-1] if message.strip() else message
        prefix = f"{type(self).__name__}: "
        super().__init__(last.split(prefix, 1)[1] if prefix in last else message)


@dataclass(frozen=True)
class CohortIndex:
    """Complete slides of a store, grouped by patient (attributes only; no tile is read).

    ``slide_keys[g]`` is ``(patient_id, slide_id)`` of global slide number ``g``; ``patient_slides[i]``
    lists the global slide numbers of patient ``i``; ``labels[i]`` is the patient's class index or -1.
    """

    store_path: str
    patient_ids: tuple[str, ...]
    patient_slides: tuple[tuple[int, ...], ...]
    slide_keys: tuple[tuple[str, str], ...]
    slide_tiles: tuple[int, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    splits: tuple[str | None, ...]
    # with a tile filter: the kept tile rows of each slide (``slide_tiles[g] == len(slide_rows[g])``);
    # None = every row 0..slide_tiles[g]-1
    slide_rows: tuple[np.ndarray, ...] | None = field(default=None, compare=False)

    @classmethod
    def from_store(cls, store: str | Path | SlideStore, patients: list[str] | None = None,
                   tile_filter: TileFilter | None = None) -> "CohortIndex":
        """Index the complete slides with at least one tile; ``patients`` restricts to those ids.

        ``tile_filter``: only tiles it keeps are drawn (a slide with none kept is left out); needs the
        store's ``tile_qc`` measures for QC limits (StoreError otherwise).
        """
        store = store if isinstance(store, SlideStore) else SlideStore(store)
        filtering = tile_filter is not None and tile_filter.active
        kept_rows: list[np.ndarray] = []
        wanted = None if patients is None else set(patients)
        pids, pslides, keys, ntiles, raw_labels, splits = [], [], [], [], [], []
        by_patient: dict[str, list[str]] = {}
        for rec in store.records(status="complete"):
            if wanted is not None and rec.patient_id not in wanted:
                continue
            if rec.damage is not None:
                log.warning("left out of training: %s", rec.damage)
                continue
            by_patient.setdefault(rec.patient_id, []).append(rec.slide_id)
        for p, slide_ids in by_patient.items():
            own = []
            for s in slide_ids:
                try:
                    n = _usable_tiles(store, p, s)
                    if n > 0 and filtering:
                        rows = np.flatnonzero(store.tile_keep(p, s, tile_filter))
                        n = len(rows)
                        if n > 0:
                            kept_rows.append(rows)
                except StoreDamageError as e:
                    log.warning("left out of training: %s", e)
                    continue
                if n > 0:
                    own.append(len(keys))
                    keys.append((p, s))
                    ntiles.append(n)
            if own:
                attrs = store.patient_attrs(p)
                pids.append(p)
                pslides.append(tuple(own))
                raw_labels.append(attrs.get("label"))
                splits.append(attrs.get("split"))
        if not pids:
            raise ValueError(f"{store.path}: no complete slide with tiles to sample from")
        class_names = tuple(sorted({str(x) for x in raw_labels if x not in (None, "")}))
        labels = tuple(class_names.index(str(x)) if x not in (None, "") else -1 for x in raw_labels)
        return cls(str(store.path), tuple(pids), tuple(pslides), tuple(keys), tuple(ntiles), labels,
                   class_names, tuple(splits), tuple(kept_rows) if filtering else None)

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    def subset(self, patients: list[str]) -> "CohortIndex":
        """The same store restricted to ``patients`` (e.g. the training split)."""
        wanted = set(patients)
        keep = [i for i, p in enumerate(self.patient_ids) if p in wanted]
        if not keep:
            raise ValueError("subset: none of the given patients is in the index")
        keys, ntiles, pslides, rows = [], [], [], []
        for i in keep:
            pslides.append(tuple(range(len(keys), len(keys) + len(self.patient_slides[i]))))
            keys += [self.slide_keys[g] for g in self.patient_slides[i]]
            ntiles += [self.slide_tiles[g] for g in self.patient_slides[i]]
            if self.slide_rows is not None:
                rows += [self.slide_rows[g] for g in self.patient_slides[i]]
        return CohortIndex(self.store_path, tuple(self.patient_ids[i] for i in keep), tuple(pslides), tuple(keys),
                           tuple(ntiles), tuple(self.labels[i] for i in keep), self.class_names,
                           tuple(self.splits[i] for i in keep), tuple(rows) if self.slide_rows is not None else None)


def _usable_tiles(store: SlideStore, patient: str, slide: str) -> int:
    """The slide's tile count, once its ``tiles`` array opens with that many rows (StoreDamageError if not)."""
    n = int(store.slide_attrs(patient, slide).get(layout.N_TILES, 0))
    if n > 0:
        tiles = store.tiles(patient, slide)
        if tiles.shape[0] != n:
            raise StoreDamageError(patient, slide, layout.TILES, store.where(f"{tiles.path}/{layout.META}"),
                                   f"{tiles.shape[0]} tiles, but the slide has n_tiles {n}")
    return n


def draw_patient(index: CohortIndex, patient: int, slides: int, tiles: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Global slide numbers ``(S,)`` and tile rows ``(S, T)`` for one patient.

    Slides are drawn without replacement while the patient has enough, then cycled; tiles likewise
    within each slide (a repeated slide gets fresh tiles where it has them).
    """
    own = np.asarray(index.patient_slides[patient])
    order = rng.permutation(len(own))
    chosen = own[np.resize(order, slides)]
    rows = np.empty((slides, tiles), dtype=np.int64)
    used: dict[int, list[int]] = {}
    for i, g in enumerate(chosen):
        n = index.slide_tiles[g]
        pool = used.setdefault(int(g), list(rng.permutation(n)))
        if len(pool) < tiles:
            pool.extend(rng.permutation(n))
        rows[i] = pool[:tiles]
        del pool[:tiles]
        if index.slide_rows is not None:  # positions among the kept tiles -> tile rows
            rows[i] = index.slide_rows[g][rows[i]]
    return chosen, rows


class PatientDataset(Dataset):
    """Maps ``(patient, item_seed)`` to one patient item.

    Returns a dict: ``images (S, T, V, 3, H, W) float32``, ``patient ()`` int64, ``slides (S,)``
    global slide numbers, ``tiles (S, T)`` tile keys unique across the cohort, ``label ()``.
    With ``encoded=True`` no pixel is decoded: ``images`` gives way to ``encoded`` (the S*T tiles'
    stored JPEG streams) and ``draws`` (the S*T*V views' random choices), see :meth:`_encoded`.
    """

    def __init__(self, index: CohortIndex, slides: int, tiles: int, views: int, augment: AugmentParams,
                 encoded: bool = False) -> None:
        self.index, self.slides, self.tiles, self.views = index, slides, tiles, views
        self.augment = HEAugment(augment)
        self.encoded = encoded
        self._store: SlideStore | None = None
        self._arrays: dict[int, Any] = {}  # slide number -> its tiles array, opened once per process
        self._pid = -1

    def __len__(self) -> int:
        return self.index.n_patients

    def _open(self) -> SlideStore:
        # Each DataLoader worker opens the store itself; zarr handles do not cross fork/spawn.
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = SlideStore(self.index.store_path), os.getpid()
            self._arrays = {}
        return self._store

    def _tiles(self, slide: int):
        """The tiles array of global slide ``slide``: its metadata is read once (a request per read on
        an object store), not once per item."""
        store = self._open()
        arr = self._arrays.get(slide)
        if arr is None:
            arr = self._arrays[slide] = store.tiles(*self.index.slide_keys[slide])
        return arr

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """The items of ``keys`` (what a DataLoader asks for a batch), their ``images`` slices of one
        batch tensor, in shared memory in a DataLoader worker: each view is written once, where
        :func:`collate_patients` hands it on without a copy."""
        batch = None if self.encoded else self._views(len(keys))
        return [self._item(key, None if batch is None else batch[i]) for i, key in enumerate(keys)]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self._item(key)

    def _item(self, key: tuple[int, int], images: torch.Tensor | None = None) -> dict[str, Any]:
        patient, item_seed = key
        rng = np.random.default_rng(item_seed)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        slides, rows = draw_patient(self.index, patient, self.slides, self.tiles, rng)
        item: dict[str, Any] = {}
        if self.encoded:
            item["encoded"], item["draws"] = self._encoded(slides, rows, gen)
        else:
            images = self._views() if images is None else images
            for s, (g, slide_rows) in enumerate(zip(slides, rows)):
                for t, tile in enumerate(self._read(int(g), slide_rows)):
                    for v in range(self.views):
                        self.augment(tile, gen, out=images[s, t, v])
            item["images"] = images
        return item | {
            "patient": torch.tensor(patient, dtype=torch.int64),
            "slides": torch.as_tensor(slides, dtype=torch.int64),
            "tiles": torch.as_tensor(slides[:, None] * (1 << 32) + rows, dtype=torch.int64),
            "label": torch.tensor(self.index.labels[patient], dtype=torch.int64),
        }

    def _views(self, *lead: int) -> torch.Tensor:
        """Room for the views of ``lead`` items: ``(*lead, S, T, V, 3, H, W) float32`` (see :func:`_empty`)."""
        size = self.augment.params.out_size
        return _empty((*lead, self.slides, self.tiles, self.views, 3, size, size))

    def _read(self, slide: int, rows: np.ndarray) -> np.ndarray:
        """Tiles ``rows`` of global slide ``slide``, ``(n, T, T, 3) uint8`` in that order."""
        order = np.argsort(rows)
        try:
            return self._tiles(slide).get_orthogonal_selection((rows[order],))[np.argsort(order)]
        except StoreDamageError as e:
            raise TrainingDataError(f"{e}; training stopped: repair it (hlss verify --repair) or leave "
                                    "the slide out") from None

    def _encoded(self, slides: np.ndarray, rows: np.ndarray,
                 gen: torch.Generator) -> tuple[list[bytes | np.ndarray], list[ViewDraw]]:
        """Per tile (slide-major) its stored JPEG stream, or its pixels ``(T, T, 3) uint8`` where the
        slide is not stored as JPEG; per view (tile-major) its :class:`ViewDraw`, drawn as the
        decoded path draws them, so both paths make the same views."""
        tiles: list[bytes | np.ndarray] = []
        draws = []
        for g, slide_rows in zip(slides, rows):
            arr = self._tiles(int(g))
            jpeg = arr.jpeg_bytes(slide_rows)
            tiles.extend(jpeg if jpeg is not None else list(self._read(int(g), slide_rows)))
            height, width = arr.shape[1:3]
            draws.extend(self.augment.draw(height, width, gen) for _ in range(len(slide_rows) * self.views))
        return tiles, draws


class HierarchicalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(patient, item_seed)``, a pure function of ``(seed, step)``.

    Plain: every patient once per epoch in a seeded order (the last partial batch of an epoch is
    dropped). Balanced: each slot draws a class uniformly, then a patient of that class, distinct
    within the batch where the class has enough. With DDP each rank takes slots ``rank::world``.
    """

    def __init__(self, labels: tuple[int, ...], batch_size: int, seed: int = 0, balanced: bool = False,
                 start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        n = len(labels)
        if batch_size > n:
            raise ValueError(f"batch of {batch_size} patients but the cohort has {n}: "
                             "lower sampler.batch_size (patient-level contrast needs distinct patients)")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} processes")
        self.labels = np.asarray(labels)
        if balanced and (self.labels < 0).any():
            raise ValueError("balanced sampling needs a label for every patient")
        self.batch_size, self.seed, self.balanced = batch_size, seed, balanced
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.steps_per_epoch = n // batch_size

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The whole (all ranks) batch of ``step``."""
        if self.balanced:
            patients = self._balanced(step)
        else:
            epoch, j = divmod(step, self.steps_per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
            patients = perm[j * self.batch_size:(j + 1) * self.batch_size]
        return [(int(p), int(np.random.default_rng([self.seed, step, slot]).integers(2**62)))
                for slot, p in enumerate(patients)]

    def _balanced(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 1 << 20])
        classes = np.unique(self.labels)
        picks: list[int] = []
        for c in rng.choice(classes, size=self.batch_size):
            members = np.flatnonzero(self.labels == c)
            fresh = np.setdiff1d(members, picks)
            picks.append(int(rng.choice(fresh if len(fresh) else members)))
        return np.asarray(picks)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)[self.rank::self.world_size]
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2**31 - 1


def collate_patients(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack patient items: ``images [B, S, T, V, 3, H, W]``, ``patient [B]``, ``slides [B, S]``,
    ``tiles [B, S, T]``, ``label [B]``; items made with ``encoded=True`` carry instead ``encoded``
    (B*S*T tiles, batch-major) and ``draws`` (B*S*T*V views) as flat lists, for
    :class:`~hlss_model.device_views.DeviceViews`."""
    return {k: [x for it in items for x in it[k]] if k in _LISTS else _stack([it[k] for it in items])
            for k in items[0]}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; the tensors themselves when they are the slices, in order, of one tensor (as
    :meth:`PatientDataset.__getitems__` makes them); else, in a DataLoader worker, stacked straight
    into shared memory as torch's default collate does (the batch would be copied there again)."""
    base = tensors[0]._base
    if (base is not None and base.shape[0] == len(tensors)
            and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(tensors))):
        return base
    return torch.stack(tensors, out=_empty((len(tensors), *tensors[0].shape), tensors[0].dtype))


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor, in shared memory when made in a DataLoader worker (to reach the
    main process without a copy)."""
    numel = int(np.prod(shape))
    if torch.utils.data.get_worker_info() is None or numel == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)  # as torch's default collate does
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


_LISTS = ("encoded", "draws")


class ThreadLoader:
    """Batches made by ``threads`` threads of this process, in the sampler's order, at most
    ``prefetch`` per thread ahead: a DataLoader without worker processes. JPEG decoding and torch's
    kernels release the GIL, and the views reach the training loop without the copy into shared
    memory that a worker process needs (on a 2-core VM that copy cost a worker 0.7 ms a 224 px view,
    a third of its time)."""

    def __init__(self, dataset: "PatientDataset", sampler: Sampler, threads: int, prefetch: int = 2) -> None:
        self.dataset, self.sampler, self.threads, self.prefetch = dataset, sampler, max(1, threads), prefetch

    def _batch(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        return collate_patients(self.dataset.__getitems__(keys))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.sampler)
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="hlss-loader") as pool:
            try:
                for keys in itertools.islice(batches, self.threads * self.prefetch):
                    pending.append(pool.submit(self._batch, keys))
                while pending:
                    batch = pending.popleft().result()
                    keys = next(batches, None)
                    if keys is not None:
                        pending.append(pool.submit(self._batch, keys))
                    yield batch
            finally:
                for f in pending:
                    f.cancel()


def make_loader(index: CohortIndex, slides: int, tiles: int, views: int, augment: AugmentParams, batch_size: int,
                seed: int = 0, balanced: bool = False, start_step: int = 0, num_workers: int = 2,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, encoded: bool = False,
                worker_kind: str = "process") -> DataLoader | ThreadLoader:
    """An endless DataLoader of hierarchical batches starting at ``start_step``.

    ``encoded``: the workers only read each tile's stored bytes and draw its views' random choices;
    :class:`~hlss_model.device_views.DeviceViews` decodes and augments them on the training device.
    ``worker_kind``: ``"process"`` (``num_workers`` spawned DataLoader workers; 0: in this process)
    or ``"thread"`` (a :class:`ThreadLoader` of ``num_workers`` threads)."""
    sampler = HierarchicalBatchSampler(index.labels, batch_size, seed, balanced, start_step, rank, world_size)
    dataset = PatientDataset(index, slides, tiles, views, augment, encoded=encoded)
    if worker_kind == "thread" and num_workers > 0:
        return ThreadLoader(dataset, sampler, num_workers)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_patients,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory and not encoded,
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )

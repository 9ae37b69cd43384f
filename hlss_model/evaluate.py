"""kNN evaluation of a store's tiles: from stored features or from an encoder run on the fly.

The train/held-out split is by patient: the run's own split when a run is evaluated (so held-out
patients were never trained on), else the manifest's ``split`` column, else a seeded split.

A damaged slide (see :class:`pipeline.store.StoreDamageError`) is left out with a warning and listed
in the report's ``damaged``; the CLI then exits 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .encoders import Encoder
from .extract import embed_tiles, sample_rows
from pipeline.store import SlideStore, StoreDamageError

from .knn import FeatureTable, KnnReport, knn_evaluate, split_patients
from .settings import EVALUATION, EXTRACTION

__all__ = ["knn_from_store", "store_split"]

log = logging.getLogger(__name__)


def _complete_slides(store: SlideStore, damaged: list[str] | None = None) -> dict[str, list[str]]:
    """Patient -> its complete slides; damaged slides are left out (their messages appended to ``damaged``)."""
    out: dict[str, list[str]] = {}
    for rec in store.records(status="complete"):
        if rec.damage is not None:
            log.warning("left out: %s", rec.damage)
            if damaged is not None:
                damaged.append(str(rec.damage))
            continue
        out.setdefault(rec.patient_id, []).append(rec.slide_id)
    return out


def store_split(store: SlideStore, seed: int = EVALUATION.seed) -> dict[str, str]:
    """Patient -> "train" | "test" from the store's patient attributes (manifest split, else seeded)."""
    labels, splits = {}, {}
    for p in _complete_slides(store):
        a = store.patient_attrs(p)
        labels[p] = a.get("label") or ""
        splits[p] = a.get("split")
    return split_patients(labels, splits, seed=seed)


def knn_from_store(store: str | Path, features: str | None = None, encoder: Encoder | None = None,
                   split: dict[str, str] | None = None, k: int = EVALUATION.k,
                   temperature: float = EVALUATION.temperature,
                   max_tiles_per_slide: int | None = EVALUATION.max_tiles_per_slide,
                   batch_size: int = EXTRACTION.batch_size, device: str = EXTRACTION.device,
                   seed: int = EVALUATION.seed) -> KnnReport:
    """Tile, slide and patient kNN accuracy and MCA over the labelled patients of ``store``.

    Exactly one of ``features`` (a stored feature name) or ``encoder`` is given. ``split`` maps
    patient -> "train" | "test"; None derives it with :func:`store_split`.
    """
    if (features is None) == (encoder is None):
        raise ValueError("give exactly one of features (a stored feature name) or encoder")
    st = SlideStore(store)
    split = split if split is not None else store_split(st, seed)
    slides, labels, damaged = [], {}, []
    for p, own in _complete_slides(st, damaged).items():
        label = st.patient_attrs(p).get("label")
        if p not in split or label in (None, ""):
            continue
        labels[p] = str(label)
        slides += [(p, s) for s in own]
    class_names = sorted(set(labels.values()))
    if len(class_names) < 2:
        raise ValueError(f"{st.path}: kNN needs labelled patients of at least two classes, found {class_names}")
    if encoder is not None:
        feats = embed_tiles(st.path, encoder, slides, batch_size=batch_size, device=device,
                            max_tiles_per_slide=max_tiles_per_slide, seed=seed,
                            on_damage=lambda e: damaged.append(str(e)))
    else:
        feats = {}
        for p, s in slides:
            if features not in st.feature_names(p, s):
                raise KeyError(f"patient {p}, slide {s}: no complete features {features!r}; run `hlss extract` first")
            try:
                feats[(p, s)] = _subsample(st.features(p, s, features), max_tiles_per_slide, seed)
            except StoreDamageError as e:
                log.warning("left out: %s", e)
                damaged.append(str(e))
    slides = [key for key in slides if key in feats]
    tables = {}
    for part in ("train", "test"):
        keys = [(p, s) for p, s in slides if split[p] == part]
        if not keys:
            raise ValueError(f"{st.path}: no labelled patients in the {part} split")
        tables[part] = FeatureTable(
            features=np.concatenate([feats[key] for key in keys]),
            labels=np.concatenate([np.full(len(feats[key]), class_names.index(labels[key[0]])) for key in keys]),
            slide_ids=[f"{p}/{s}" for p, s in keys for _ in range(len(feats[(p, s)]))],
            patient_ids=[p for p, s in keys for _ in range(len(feats[(p, s)]))],
        )
    report = knn_evaluate(tables["train"], tables["test"], class_names, k=k, temperature=temperature)
    report.damaged = damaged
    return report


def _subsample(arr, limit: int | None, seed: int) -> np.ndarray:
    """Stored features of the rows :func:`~hlss_model.extract.sample_rows` picks (all rows when few)."""
    rows = sample_rows(arr.shape[0], limit, seed)
    return np.asarray(arr[:] if rows is None else arr.get_orthogonal_selection((rows,)), dtype=np.float32)

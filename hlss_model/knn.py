"""Weighted kNN evaluation of frozen features at tile, slide and patient level.

Follows HiDisc (Jiang et al., CVPR 2023), which uses the InstDisc / DINO weighted kNN: cosine
similarity to the training tiles, the top-k neighbours vote with weight ``exp(sim / T)``, and a
slide or patient is classified by the sum of its tiles' score vectors.

Everything here is a pure function over arrays: the caller extracts the features.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cohort import TEST_SPLITS, TRAIN_SPLITS

from .settings import EVALUATION

__all__ = [
    "FeatureTable",
    "KnnReport",
    "LevelResult",
    "knn_evaluate",
    "knn_scores",
    "split_patients",
]

ArrayLike = np.ndarray | torch.Tensor
LEVELS = ("tile", "slide", "patient")


def knn_scores(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    n_classes: int,
    k: int = EVALUATION.k,
    temperature: float = EVALUATION.temperature,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Weighted kNN class scores of each query.

    Args:
        train_features: (N, F) features of the labelled bank; L2-normalised here.
        train_labels: (N,) integer labels in ``[0, n_classes)``.
        query_features: (M, F) features to classify; L2-normalised here.
        n_classes: number of classes C.
        k: neighbours per query, clipped to N.
        temperature: T in the neighbour weight ``exp(cosine / T)``.
        chunk_size: queries per block, so at most ``chunk_size x N`` similarities exist at once.

    Returns:
        (M, C) float32 tensor: ``score[m, c]`` is the summed weight of m's neighbours labelled c.
    """
    train = torch.as_tensor(train_features).float()
    labels = torch.as_tensor(train_labels).long()
    query = torch.as_tensor(query_features).float()
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F), got {tuple(train.shape)} and {tuple(query.shape)}")
    if labels.shape != (train.shape[0],):
        raise ValueError(f"train_labels must be ({train.shape[0]},), got {tuple(labels.shape)}")
    if train.shape[0] == 0:
        raise ValueError("the training bank is empty")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"train_labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")

    k = min(k, train.shape[0])
    train = F.normalize(train, dim=1)
    query = F.normalize(query, dim=1)
    scores = torch.zeros(query.shape[0], n_classes, dtype=torch.float32)
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ train.T  # (chunk, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        # scatter_add accumulates weights of neighbours that share a label
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return scores


@dataclass
class FeatureTable:
    """Per-tile features with their labels and provenance.

    Attributes:
        features: (N, F) float array or tensor.
        labels: (N,) integer class indices.
        slide_ids: (N,) slide of each tile.
        patient_ids: (N,) patient of each tile.
    """

    features: ArrayLike
    labels: ArrayLike
    slide_ids: Sequence[str]
    patient_ids: Sequence[str]

    def __post_init__(self) -> None:
        n = len(self.features)
        lengths = {"labels": len(self.labels), "slide_ids": len(self.slide_ids), "patient_ids": len(self.patient_ids)}
        bad = {name: m for name, m in lengths.items() if m != n}
        if bad:
            raise ValueError(f"FeatureTable has {n} feature rows but lengths {bad}")

    def __len__(self) -> int:
        return len(self.features)


@dataclass
class LevelResult:
    """Classification metrics at one level (tile, slide or patient).

    ``per_class`` maps each class present in the test set to its recall; ``mean_class_accuracy``
    is their mean, so it is not inflated by the majority class as ``accuracy`` is.
    """

    accuracy: float
    mean_class_accuracy: float
    n: int
    per_class: dict[str, float] = field(default_factory=dict)


@dataclass
class KnnReport:
    """kNN results at the ``"tile"``, ``"slide"`` and ``"patient"`` levels."""

    levels: dict[str, LevelResult]
    class_names: list[str]
    k: int
    temperature: float
    n_train_tiles: int
    n_test_tiles: int
    damaged: list[str] = field(default_factory=list)  # damaged slides left out (messages name them)

    def table(self) -> str:
        """Fixed-width table: level | n | accuracy | MCA, in percent; then the damaged slides left out."""
        lines = [f"{'level':<8} {'n':>8} {'accuracy':>9} {'MCA':>7}"]
        for name, r in self.levels.items():
            lines.append(f"{name:<8} {r.n:>8d} {100 * r.accuracy:>8.1f}% {100 * r.mean_class_accuracy:>6.1f}%")
        lines += [f"  DAMAGED (left out) {d}" for d in self.damaged]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _level_result(pred: np.ndarray, true: np.ndarray, class_names: Sequence[str]) -> LevelResult:
    """Accuracy, per-class recall and their mean over the classes present in ``true``."""
    per_class = {class_names[c]: float(np.mean(pred[true == c] == c)) for c in np.unique(true)}
    return LevelResult(
        accuracy=float(np.mean(pred == true)),
        mean_class_accuracy=float(np.mean(list(per_class.values()))),
        n=int(len(true)),
        per_class=per_class,
    )


def _group_scores(
    ids: Sequence[str], labels: np.ndarray, scores: torch.Tensor, what: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Sum tile scores (M, C) per id into (G, C) and return each group's single label (G,)."""
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(i, len(index)) for i in ids], dtype=np.int64)
    n_groups = len(index)
    summed = torch.zeros(n_groups, scores.shape[1], dtype=scores.dtype).index_add_(
        0, torch.from_numpy(inverse), scores
    )
    lo = np.full(n_groups, np.iinfo(np.int64).max)
    hi = np.full(n_groups, np.iinfo(np.int64).min)
    np.minimum.at(lo, inverse, labels)
    np.maximum.at(hi, inverse, labels)
    mixed = [gid for gid, g in index.items() if lo[g] != hi[g]]
    if mixed:
        raise ValueError(f"{len(mixed)} {what}(s) mix tile labels, e.g. {mixed[:5]}")
    return summed, lo


def knn_evaluate(
    train: FeatureTable,
    test: FeatureTable,
    class_names: list[str],
    k: int = EVALUATION.k,
    temperature: float = EVALUATION.temperature,
) -> KnnReport:
    """Classify every test tile against the training tiles and aggregate to slides and patients.

    A tile is predicted as the argmax of its kNN scores; a slide (patient) as the argmax of the sum
    of its tiles' score vectors, so confident tiles count for more than in a majority vote. A
    slide's or patient's ground truth is its tiles' common label.

    Raises:
        ValueError: if the test set is empty or a slide or patient mixes labels.
    """
    if len(test) == 0:
        raise ValueError("the test FeatureTable is empty: nothing to evaluate")
    n_classes = len(class_names)
    test_labels = np.asarray(test.labels, dtype=np.int64)
    if test_labels.min() < 0 or test_labels.max() >= n_classes:
        raise ValueError(f"test labels must lie in [0, {n_classes}) for {n_classes} class names")

    scores = knn_scores(train.features, train.labels, test.features, n_classes, k=k, temperature=temperature)
    levels = {"tile": _level_result(scores.argmax(1).numpy(), test_labels, class_names)}
    for level, ids in (("slide", test.slide_ids), ("patient", test.patient_ids)):
        summed, true = _group_scores(ids, test_labels, scores, level)
        levels[level] = _level_result(summed.argmax(1).numpy(), true, class_names)
    return KnnReport(
        levels=levels,
        class_names=list(class_names),
        k=k,
        temperature=temperature,
        n_train_tiles=len(train),
        n_test_tiles=len(test),
    )


def split_patients(
    patient_labels: Mapping[str, int | str],
    manifest_splits: Mapping[str, str | None],
    held_out_fraction: float = 0.3,
    seed: int = EVALUATION.seed,
) -> dict[str, str]:
    """Assign each patient to ``"train"`` or ``"test"``.

    If any patient has a split in the manifest, the manifest decides and must cover every patient
    ("val"/"validation"/"heldout"... count as test). Otherwise each class sends
    ``round(held_out_fraction * n_class)`` of its patients to test, clamped to ``[1, n_class - 1]``
    when the class has at least 2 patients so both sides see it (a lone patient stays in train).
    The random split depends only on ``seed`` and the set of patients, not on dict order.

    Returns:
        ``{patient_id: "train" | "test"}`` for every patient in ``patient_labels``.
    """
    patients = sorted(patient_labels)
    given = {p: manifest_splits.get(p) for p in patients}
    if any(s is not None for s in given.values()):
        missing = [p for p, s in given.items() if s is None]
        if missing:
            raise ValueError(
                f"{len(missing)} patient(s) have no split in a partially split manifest, e.g. {missing[:5]}"
            )
        out = {}
        for p, s in given.items():
            value = s.strip().lower()
            if value in TRAIN_SPLITS:
                out[p] = "train"
            elif value in TEST_SPLITS:
                out[p] = "test"
            else:
                raise ValueError(f"unknown split {s!r} for patient {p!r}")
        return out

    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    by_class: dict[int | str, list[str]] = {}
    for p in patients:
        by_class.setdefault(patient_labels[p], []).append(p)
    rng = random.Random(seed)
    out = {p: "train" for p in patients}
    for label in sorted(by_class, key=repr):
        members = by_class[label]
        n_test = round(held_out_fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        for p in rng.sample(members, n_test):
            out[p] = "test"
    return out

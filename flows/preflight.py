"""Checks a flow makes before any work, so a run that cannot finish fails in seconds with one message
instead of after hours of tiling (the settings' own checks are in :mod:`flows.settings`).

Run by ``tile-and-train`` before tiling: the training config can be built, its device and the
extraction device exist, and the cohort (the store's patients plus the source's) has enough
training patients for the sampler's batch.
"""

from __future__ import annotations

from hlss_model.checks import check_device_name
from pipeline.cohort import discover_cohort
from pipeline.run_folder import RunFolder
from pipeline.store import SlideStore, StoreError

from .settings import ExtractionSettings, FlowConfigError, TrainingSettings

__all__ = ["check_before_work", "expected_split"]


def check_before_work(source: str, store: str, run_dir: str, training: TrainingSettings,
                      extraction: ExtractionSettings, reused: bool) -> None:
    """FlowConfigError naming the setting at fault, before tiling. ``reused``: the run in ``run_dir``
    is finished and will be reused, so only extraction is checked."""
    _check_device(extraction.device, "extraction.device")
    if reused:
        return
    saved = RunFolder(run_dir).config
    cfg = training.train_config(saved if training.resume and saved.is_file() else None)
    _check_device(cfg.device, "training.device")
    split = expected_split(source, store, cfg.seed)
    train = sorted(p for p, s in split.items() if s == "train")
    batch = cfg.sampler.batch_size
    if len(train) < batch:
        held = len(split) - len(train)
        raise FlowConfigError(
            f"training: sampler.batch_size is {batch} patients but the cohort has {len(train)} training "
            f"patients ({len(split)} patients, {held} held out for evaluation); set "
            f"training.overrides.sampler.batch_size to {max(1, len(train))} or less, or add patients")


def _check_device(name: str, setting: str) -> None:
    """The device exists on this machine (a CUDA index within the visible devices)."""
    from hlss_model.extract import resolve_device

    try:
        check_device_name(name)
        resolve_device(name)
    except ValueError as e:
        raise FlowConfigError(f"{setting}: {e}") from None


def expected_split(source: str, store: str, seed: int) -> dict[str, str]:
    """Patient -> "train" | "test" as training will see it once ``source`` is tiled into ``store``: the
    store's patients with complete slides and every patient of the source's usable rows, with the
    source's labels and splits over the store's (as tiling will write them)."""
    from hlss_model.knn import split_patients

    labels: dict[str, str] = {}
    splits: dict[str, str | None] = {}
    try:
        st = SlideStore(store)
    except (StoreError, OSError):
        st = None  # a new store: the source alone
    if st is not None:
        for p in {r.patient_id for r in st.records(status="complete") if r.damage is None}:
            a = st.patient_attrs(p)
            labels[p], splits[p] = a.get("label") or "", a.get("split")
    try:
        cohort = discover_cohort(source)
    except ValueError as e:  # ManifestError: the whole source is unusable
        raise FlowConfigError(f"source: {e}") from None
    for spec in cohort.slides:
        attrs = spec.patient_attrs()
        labels[spec.patient_id] = attrs["label"] or labels.get(spec.patient_id, "")
        splits[spec.patient_id] = attrs["split"] or splits.get(spec.patient_id)
    try:
        return split_patients(labels, splits, seed=seed)
    except ValueError as e:
        raise FlowConfigError(f"source {source}: {e}") from None

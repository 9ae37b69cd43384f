"""Attribute maps: how much each tile of a slide looks like each language attribute of an HLSS run.

For every tile the score of attribute ``a`` is the cosine between the tile's projection ``z`` (the
model's L2-normalised projection of the backbone features, computed on the tile as the training
evaluation transform sees it: resized to the run's ``image_size``, normalised with its mean/std)
and the L2-normalised text embedding of ``a`` (the run's ``attributes.safetensors`` rows, the
embeddings of the attribute sentences). HLSS's alignment loss pulls exactly these two together, so
this is the score the training optimised. (The trained per-level heads are the other option: they
start as the same rows but drift, and their outputs are re-normalised over the level, which makes
them relative to the other attributes of the level rather than a similarity to a sentence.)

Stored per slide as one ``(N, A) float32`` array ``<slide>/attributes/<run>`` (A = every attribute
of every level, levels concatenated in the run's order; attrs ``levels`` and ``names`` per column,
``run``, ``weights_fingerprint``, ``tiles_version``, ``complete``), written through the same staged,
atomic commit as features (:meth:`pipeline.store.StoreWriter.commit_features`), and reused while the
run's weights and the slide's tiles are unchanged.

Summaries (:func:`pipeline.attribute_maps.top_attributes`) average a column over the tiles of a slide
(or over every tile of a patient's slides); :func:`pipeline.attribute_maps.render_heatmap` paints one
column over the slide thumbnail. Both read stored arrays only, so the cohort report uses them without torch.

This module imports torch only inside the functions that need it, so importing it is cheap.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.ids import InvalidIdError, sanitize_id
from pipeline.attribute_maps import colormap, render_heatmap, top_attributes
from pipeline import layout
from pipeline.store import SlideStore, StoreDamageError, StoreWriter, tiles_version

from .settings import EXTRACTION

__all__ = ["ExplainError", "ExplainRun", "AttributeMap", "load_explain_run", "explain_slide", "explain_patient",
           "top_attributes", "colormap", "render_heatmap", "SlideExplanation",
           "explain_and_draw"]

GROUP = layout.ATTRIBUTES


class ExplainError(ValueError):
    """A request that cannot be explained (not an HLSS run, unknown slide or attribute...)."""


@dataclass
class ExplainRun:
    """An HLSS run ready to score tiles: its model, its attribute columns and their text rows."""

    path: Path
    name: str                      # array name under <slide>/attributes/
    model: Any                     # HLSSModel (eval mode, on CPU until used)
    meta: dict
    levels: list[str]              # per column
    names: list[str]               # per column
    text: np.ndarray               # (A, D) float32, L2-normalised rows
    fingerprint: str               # model weights + text rows
    sentences: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def columns(self, level: str | None = None) -> list[int]:
        return [i for i, lv in enumerate(self.levels) if level is None or lv == level]


@dataclass
class AttributeMap:
    """Attribute scores of one slide: ``scores[i, j]`` = cosine of tile i to column j."""

    patient: str
    slide: str
    run: str
    scores: np.ndarray             # (N, A) float32
    levels: list[str]
    names: list[str]
    reused: bool = False

    def column(self, level: str, name: str) -> np.ndarray:
        for j, (lv, n) in enumerate(zip(self.levels, self.names)):
            if lv == level and n == name:
                return self.scores[:, j]
        raise KeyError(f"no attribute {level}:{name}")

    def top(self, k: int = 3) -> dict[str, list[tuple[str, float]]]:
        return top_attributes(self.scores, self.names, self.levels, k)


# -- the run ------------------------------------------------------------------------------------------


def load_explain_run(run: str | Path | ExplainRun, name: str | None = None) -> ExplainRun:
    """Load an HLSS run folder for scoring; :class:`ExplainError` for HiDisc runs or missing text.

    ``name``: the array name under ``<slide>/attributes/`` (default: the run folder's name).
    """
    if isinstance(run, ExplainRun):
        return run
    import torch

    from pipeline.run_folder import RunFolder

    from .encoders import state_fingerprint
    from .runs import load_run_model, read_run

    path = Path(run).expanduser()
    try:
        meta = read_run(path)
    except FileNotFoundError as e:
        raise ExplainError(str(e)) from None
    if meta.get("method") != "hlss":
        raise ExplainError(f"{path}: a {meta.get('method')!r} run has no attribute text embeddings "
                           "(HiDisc trains without language); attribute maps need an HLSS run")
    if not RunFolder(path).attributes.is_file():
        raise ExplainError(f"{path}: HLSS run without attributes.safetensors")
    try:
        model, meta = load_run_model(path)
    except FileNotFoundError as e:
        raise ExplainError(str(e)) from None
    from safetensors.torch import load_file

    emb = load_file(str(RunFolder(path).attributes))
    named = meta.get("attributes") or {}
    levels, names, rows = [], [], []
    order = [lv for lv in named if lv in emb] + [lv for lv in emb if lv not in named]  # run.json's level order
    for level in order:
        tensor = emb[level]
        level_names = list(named.get(level) or [f"{level}_{i}" for i in range(tensor.shape[0])])
        if len(level_names) != tensor.shape[0]:
            raise ExplainError(f"{path}: run.json names {len(level_names)} {level} attributes, "
                               f"attributes.safetensors has {tensor.shape[0]} rows")
        levels += [level] * len(level_names)
        names += level_names
        rows.append(torch.nn.functional.normalize(tensor.float(), dim=1))
    text = torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, meta["embed_dim"]), np.float32)
    h = hashlib.blake2b(digest_size=12)
    h.update(state_fingerprint(model).encode())
    h.update(text.tobytes())
    h.update(json.dumps([levels, names]).encode())
    resolved = path.resolve()
    if name is not None:
        try:
            clean = sanitize_id(name)
        except InvalidIdError as e:
            raise ExplainError(f"attribute map name {name!r}: {e}") from None
        if clean != name:
            raise ExplainError(f"attribute map name {name!r} is not a plain id (e.g. {clean!r})")
    else:
        try:
            name = sanitize_id(resolved.name)
        except InvalidIdError:
            name = "run"
    return ExplainRun(path=resolved, name=name, model=model, meta=meta, levels=levels, names=names, text=text,
                      fingerprint=h.hexdigest(), sentences=_run_sentences(resolved, meta))


def _run_sentences(path: Path, meta: dict) -> dict[tuple[str, str], tuple[str, ...]]:
    """The attribute sentences of a run, when the attribute file it was trained with is still the same."""
    from pipeline.run_folder import RunFolder

    try:
        from .text import LEVELS, load_attributes

        cfg = RunFolder(path).read_config()
        attrs = load_attributes((cfg.get("model") or {}).get("attributes"))
        if meta.get("attributes_hash") and attrs.content_hash() != meta["attributes_hash"]:
            return {}
        return {(lv, a.name): a.sentences for lv in LEVELS for a in attrs[lv]}
    except Exception:  # sentences are a courtesy: names and scores are enough
        return {}


# -- scoring ------------------------------------------------------------------------------------------


def _open(store: str | Path | SlideStore) -> SlideStore:
    return store if isinstance(store, SlideStore) else SlideStore(store)


def _stored(reader: SlideStore, patient: str, slide: str, name: str):
    """The complete scores array ``attributes/<name>`` of a slide, or None."""
    return reader.attribute_scores(patient, slide, name) if name in reader.attribute_runs(patient, slide) else None


def _reusable(attrs, er: ExplainRun, version: str) -> bool:
    """Whether stored scores are this run's, for these tiles and these attribute columns."""
    return (attrs.get("weights_fingerprint") == er.fingerprint and attrs.get("tiles_version") == version
            and list(attrs.get("names", [])) == er.names and list(attrs.get("levels", [])) == er.levels)


def explain_slide(store: str | Path | SlideStore, run: str | Path | ExplainRun, patient: str, slide: str, *,
                  batch_size: int = EXTRACTION.batch_size, device: str = EXTRACTION.device,
                  force: bool = False,
                  amp: bool | None = None) -> AttributeMap:
    """Attribute scores of every tile of a complete slide, computed and stored, or reused when stored
    scores match the run's weights and the slide's tiles (``force`` recomputes).

    ``amp``: bf16 autocast of the backbone (default: on CUDA only).
    """
    er = load_explain_run(run)
    reader = _open(store)
    attrs = reader.slide_attrs(patient, slide)
    if attrs.get("status") != "complete":
        raise ExplainError(f"{patient}/{slide}: slide is {attrs.get('status')!r}, not complete")
    version = tiles_version(attrs)
    if not force:
        stored = _stored(reader, patient, slide, er.name)
        if stored is not None and _reusable(stored.attrs, er, version):
            return AttributeMap(patient, slide, er.name, stored[:], list(er.levels), list(er.names), reused=True)
        owner = stored.attrs.get("run") if stored is not None else None
        if owner is not None and owner != str(er.path):
            raise ExplainError(f"{patient}/{slide}: attributes/{er.name} holds the scores of another run ({owner}); "
                               f"name this one differently (--name), or replace them (--force)")
    scores = _compute(reader, er, patient, slide, int(attrs.get("n_tiles", 0)), version, batch_size, device, amp)
    return AttributeMap(patient, slide, er.name, scores, list(er.levels), list(er.names))


def _compute(reader: SlideStore, er: ExplainRun, patient: str, slide: str, n: int, version: str,
             batch_size: int, device: str, amp: bool | None) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from .extract import read_ahead, resolve_device

    from .augment import EvalTransform

    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else amp
    model = er.model.to(dev).eval()
    transform = EvalTransform(int(er.meta["image_size"]), er.meta["mean"], er.meta["std"])
    text = torch.from_numpy(er.text).to(dev)
    tiles = reader.tiles(patient, slide)
    writer = StoreWriter(reader.path)
    a = len(er.names)
    staged = writer.stage_features(n, a, "float32", chunk_rows=writer.feature_chunk_rows(batch_size))
    out = np.zeros((n, a), np.float32)
    try:
        starts = ((s,) for s in range(0, n, batch_size))
        with ThreadPoolExecutor(2, thread_name_prefix="tile-read") as pool, torch.inference_mode():
            for start, block in read_ahead(starts, lambda s: tiles[s:s + batch_size], pool, 2):
                x = transform(block.result()).to(dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    feats = model.backbone(x)
                z = torch.nn.functional.normalize(model.projection(feats.float()).float(), dim=-1)
                out[start:start + len(x)] = (z @ text.T).cpu().numpy()
        if n:
            staged[:] = out
        writer.commit_features(staged, patient, slide, er.name, {
            "levels": list(er.levels), "names": list(er.names), "run": str(er.path),
            "weights_fingerprint": er.fingerprint, "score": "cosine(z, attribute text embedding)",
            "image_size": int(er.meta["image_size"]), "n": n}, version, group=GROUP)
    except BaseException:
        writer.discard_array(staged)
        raise
    return out


def explain_patient(store: str | Path | SlideStore, run: str | Path | ExplainRun, patient: str, *,
                    k: int = 3, **kwargs) -> tuple[list[AttributeMap], dict[str, list[tuple[str, float]]]]:
    """Explain every complete slide of a patient; the top ``k`` attributes per level over all its tiles."""
    er = load_explain_run(run)
    reader = _open(store)
    maps = [explain_slide(reader, er, patient, s, **kwargs) for s in reader.slides(patient)]
    scores = np.concatenate([m.scores for m in maps]) if maps else np.zeros((0, len(er.names)), np.float32)
    return maps, top_attributes(scores, er.names, er.levels, k)


# -- one slide and its patient, drawn (``hlss explain``) ----------------------------------------------


def _find_slide(reader: SlideStore, slide: str) -> str:
    owners = [p for p in reader.patients() if slide in reader.slides(p, status=None)]
    if not owners:
        raise ExplainError(f"unknown slide {slide!r} in {reader.path}")
    if len(owners) > 1:
        raise ExplainError(f"slide {slide!r} belongs to several patients: {owners}")
    return owners[0]


def _chosen(er: ExplainRun, wanted: list[str], top: dict[str, list[tuple[str, float]]]) -> list[tuple[str, str]]:
    if not wanted:
        return [(lv, items[0][0]) for lv, items in top.items() if items]
    out: list[tuple[str, str]] = []
    for spec in wanted:
        level, _, name = spec.rpartition(":")
        hits = [(lv, n) for lv, n in zip(er.levels, er.names) if n == name and (not level or lv == level)]
        if not hits:
            raise ExplainError(f"run {er.name} has no attribute {spec!r}; it has: "
                               + ", ".join(f"{lv}:{n}" for lv, n in zip(er.levels, er.names)))
        out += [h for h in hits if h not in out]
    return out


@dataclass
class SlideExplanation:
    """One slide explained with the rest of its patient (what ``hlss explain`` prints and draws).

    ``top`` / ``patient_top``: level -> [(attribute, mean score)] best first, over the slide's tiles /
    over every tile of the patient's explained slides (``maps``, the slide's first); ``damaged``: the
    damage of the patient's slides left out; ``written``: the heatmap PNGs.
    """

    run: ExplainRun
    patient: str
    slide: AttributeMap
    top: dict[str, list[tuple[str, float]]]
    maps: list[AttributeMap]
    patient_top: dict[str, list[tuple[str, float]]]
    damaged: list[Any]
    written: list[Path]


def explain_and_draw(store: str | Path | SlideStore, run: str | Path, slide: str, out: str | Path, *,
                     attributes: Sequence[str] = (), top: int = 3, name: str | None = None, batch_size: int = 128,
                     device: str = "auto", force: bool = False) -> SlideExplanation:
    """Explain ``slide`` (scores stored, or reused) and the other slides of its patient; draw a heatmap
    ``<out>/<slide>_<level>_<attribute>.png`` of each of ``attributes`` (``[LEVEL:]NAME``; default the
    top one of each level). ``top``: attributes listed per level.

    Raises :class:`ExplainError` for a bad request (unknown slide or attribute, slide not complete,
    not an HLSS run), :class:`~pipeline.store.StoreDamageError` when the slide itself is damaged
    (damage of the patient's other slides is collected in ``damaged``), StoreError for an unusable store.
    """
    if top < 1:
        raise ExplainError("--top must be >= 1")
    reader = _open(store)
    patient = _find_slide(reader, slide)
    status = reader.slide_attrs(patient, slide).get("status")
    if status != "complete":
        raise ExplainError(f"slide {slide!r} is not complete (status {status!r}); tile it first")
    er = load_explain_run(run, name)
    kw = dict(batch_size=batch_size, device=device, force=force)
    amap = explain_slide(reader, er, patient, slide, **kw)
    slide_top = amap.top(top)
    chosen = _chosen(er, list(attributes), slide_top)
    maps, damaged = [amap], [r.damage for r in reader.patient_records(patient, "complete") if r.damage]
    for other in reader.slides(patient):
        if other == slide:
            continue
        try:
            maps.append(explain_slide(reader, er, patient, other, **kw))
        except StoreDamageError as e:  # another slide of the patient: left out of the patient's top list
            damaged.append(e)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for level, attr in chosen:
        title = f"{patient}/{slide}  {level}: {attr}  (cosine to the attribute text, run {er.name})"
        path = out / f"{slide}_{level}_{attr}.png"
        render_heatmap(reader, patient, slide, amap.column(level, attr), title).save(path)
        written.append(path)
    scores = np.concatenate([m.scores for m in maps])
    return SlideExplanation(er, patient, amap, slide_top, maps, top_attributes(scores, er.names, er.levels, top),
                            damaged, written)

"""Language-attribute maps as stored data: top attributes of a slide and heatmaps over its thumbnail.

:mod:`hlss_model.explain` computes, per tile, the cosine between the tile's HLSS projection and each
attribute text embedding, and stores it as ``<slide>/attributes/<run>`` ``(N, A) float32`` (attrs
``levels`` and ``names`` per column). This module only reads and draws those arrays (numpy and Pillow,
no torch), so the cohort report and the QC export can show them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from . import layout
from .qc import picture_size, tile_rects
from .store import SlideStore

__all__ = ["top_attributes", "colormap", "render_heatmap"]


def _open(store: str | Path | SlideStore) -> SlideStore:
    return store if isinstance(store, SlideStore) else SlideStore(store)


def top_attributes(scores: np.ndarray, names: Sequence[str], levels: Sequence[str],
                   k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per level, the ``k`` attributes with the highest mean score over the rows (tiles), best first.

    NaN rows (tiles left out) are ignored; a level with no scored tile gets an empty list.
    """
    scores = np.asarray(scores, np.float64).reshape(-1, len(names))
    valid = ~np.isnan(scores).any(axis=1)
    mean = scores[valid].mean(axis=0) if valid.any() else np.full(len(names), np.nan)
    out: dict[str, list[tuple[str, float]]] = {}
    for level in dict.fromkeys(levels):
        cols = [j for j, lv in enumerate(levels) if lv == level]
        if not valid.any():
            out[level] = []
            continue
        order = sorted(cols, key=lambda j: (-mean[j], j))[:max(0, k)]
        out[level] = [(names[j], float(mean[j])) for j in order]
    return out


# -- pictures -----------------------------------------------------------------------------------------

# viridis at 9 evenly spaced stops (matplotlib's values), interpolated linearly
_VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)
_LINE_PX = 12


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``(...,)`` values -> ``(..., 3) uint8`` viridis colours, ``vmin`` dark purple, ``vmax`` yellow."""
    v = np.asarray(values, np.float64)
    t = np.clip((v - vmin) / (vmax - vmin), 0, 1) if vmax > vmin else np.full(v.shape, 0.5)
    t = np.nan_to_num(t, nan=0.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(t).astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def render_heatmap(store: str | Path | SlideStore, patient: str, slide: str, column_scores: np.ndarray,
                   title: str, *, alpha: float = 0.6, vmin: float | None = None, vmax: float | None = None):
    """The slide thumbnail with each tile's footprint filled by its score's colour (viridis, blended
    with ``alpha``), over a white caption band: ``title``, a colour bar and its min / max.

    Returns a ``PIL.Image`` of the QC picture's size (:func:`pipeline.qc.picture_size` of the
    thumbnail) plus a caption band below.
    NaN scores leave their tiles unpainted; ``vmin``/``vmax`` default to the scores' range.
    """
    from PIL import Image, ImageDraw, ImageFont

    reader = _open(store)
    group = reader.group(patient, slide)
    thumb = np.asarray(group[layout.THUMBNAIL][:], np.uint8)
    scale = group[layout.THUMBNAIL].attrs.get(layout.SCALE) or [1.0, 1.0]
    attrs = reader.slide_attrs(patient, slide)
    footprint = attrs.get("footprint_px") or attrs.get("tile_size")
    coords = reader.coords(patient, slide)
    values = np.asarray(column_scores, np.float64).reshape(-1)
    if len(values) != len(coords):
        raise ValueError(f"{patient}/{slide}: {len(values)} scores for {len(coords)} tiles")
    finite = values[np.isfinite(values)]
    lo = float(vmin if vmin is not None else (finite.min() if finite.size else 0.0))
    hi = float(vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    h, w = thumb.shape[:2]
    pic = thumb.astype(np.float64).copy()
    colours = colormap(values, lo, hi).astype(np.float64)
    if len(coords):
        rects = tile_rects(coords, footprint, scale, w, h)
        for (x0, y0, x1, y1), col, v in zip(rects.tolist(), colours, values):
            if np.isfinite(v):
                pic[y0:y1 + 1, x0:x1 + 1] = (1 - alpha) * thumb[y0:y1 + 1, x0:x1 + 1] + alpha * col
    pic = np.rint(pic).clip(0, 255).astype(np.uint8)
    dw, dh = picture_size(w, h)
    if (dw, dh) != (w, h):  # the same size as the slide's QC picture
        resample = Image.Resampling.NEAREST if dw > w else Image.Resampling.BILINEAR
        pic = np.asarray(Image.fromarray(pic).resize((dw, dh), resample))
        w, h = dw, dh

    font = ImageFont.load_default()
    chars = max(8, (w - 8) // 6)  # the default bitmap font is about 6 px per character
    lines = textwrap.wrap(title, chars) or [""]
    scale_lines = textwrap.wrap(f"colour scale: min {lo:.3f} (left)  max {hi:.3f} (right)", chars)
    bar_px = 10
    band = _LINE_PX * (len(lines) + len(scale_lines)) + bar_px + 14
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(Image.fromarray(pic), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, h + 4 + i * _LINE_PX), line, fill=(0, 0, 0), font=font)
    top = h + 4 + len(lines) * _LINE_PX
    bar_w = max(1, w - 8)
    bar = colormap(np.linspace(lo, hi, bar_w), lo, hi)
    canvas.paste(Image.fromarray(np.repeat(bar[None], bar_px, axis=0)), (min(4, w - 1), top))
    for i, line in enumerate(scale_lines):
        draw.text((4, top + bar_px + 2 + i * _LINE_PX), line, fill=(0, 0, 0), font=font)
    return canvas

"""Tissue contours and kept tiles as GeoJSON, in level-0 pixels, the way QuPath imports objects.

One ``FeatureCollection`` per slide (``<out>/<patient>/<slide>.geojson``):

* the tissue mask's outlines as ``annotation`` objects classified ``Tissue``: each connected piece of
  tissue one ``Polygon`` (outer ring, then its holes), traced on the stored mask and scaled by its
  ``scale`` (level-0 px per mask px), so vertices lie on mask-pixel edges (about 8 µm apart);
* each kept tile as a ``tile`` object: its exact level-0 footprint (``coords`` + ``footprint_px``),
  with ``tissue`` (fraction) and the per-tile QC measures as ``measurements``.

Coordinates are level-0 pixels, x right and y down, as QuPath (File > Import objects), TRIDENT's
and LazySlide's contour files use them. Rings are closed and follow RFC 7946's right-hand rule on the
numbers as given: outer rings counter-clockwise (positive shoelace area), holes clockwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import find_contours, points_in_poly

from . import layout as L
from .files import atomic_write_bytes

__all__ = ["tissue_polygons", "slide_geojson", "export_geojson"]

log = logging.getLogger(__name__)


def tissue_polygons(mask: np.ndarray, scale: tuple[float, float]) -> list[list[np.ndarray]]:
    """Polygons ``[outer, *holes]`` of a ``(h, w) bool`` mask; each ring ``(n, 2) float`` level-0
    ``(x, y)``, closed, with ``scale`` the level-0 px per mask px along x and y."""
    padded = np.pad(np.asarray(mask, bool), 1).astype(np.uint8)
    rings = [c[:, ::-1] - 1 for c in find_contours(padded, 0.5, positive_orientation="high")]  # (x, y) mask px
    rings = [r for r in rings if len(r) >= 4]
    signed = [_signed_area(r) for r in rings]
    # skimage winds "high" islands one way and holes the other; which sign is which depends on the
    # axis order, so the outer rings are those with the sign of the largest ring
    sign = np.sign(signed[int(np.argmax(np.abs(signed)))]) if rings else 1.0
    outers = [r for r, a in zip(rings, signed) if np.sign(a) == sign]
    polygons: list[list[np.ndarray]] = [[r] for r in outers]
    for hole, a in zip(rings, signed):
        if np.sign(a) == sign:
            continue
        owners = [p for p in polygons if points_in_poly(hole[:1], p[0])[0]]
        if owners:  # the smallest outer ring around it
            min(owners, key=lambda p: abs(_signed_area(p[0]))).append(hole)
    sx, sy = float(scale[0]), float(scale[1])
    return [[_oriented(ring * (sx, sy), outer=i == 0) for i, ring in enumerate(p)] for p in polygons]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _oriented(ring: np.ndarray, outer: bool) -> np.ndarray:
    """``ring`` closed, with a positive shoelace area when ``outer`` (negative for a hole)."""
    ring = ring if np.allclose(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])
    return ring if (_signed_area(ring) > 0) == outer else ring[::-1]


def _tile_feature(rect: tuple[float, float, float, float], measurements: dict[str, float]) -> dict[str, Any]:
    x0, y0, x1, y1 = rect
    return {"type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]]},
            "properties": {"objectType": "tile", "measurements": measurements}}


def slide_geojson(store, patient_id: str, slide_id: str, tiles: bool = True) -> dict[str, Any]:
    """The slide's tissue outlines (and kept tiles) as a GeoJSON ``FeatureCollection`` (see the module)."""
    attrs = store.slide_attrs(patient_id, slide_id)
    group = store.group(patient_id, slide_id)
    features: list[dict[str, Any]] = []
    mask_scale = group[L.TISSUE_MASK].attrs[L.SCALE]
    for polygon in tissue_polygons(store.tissue_mask(patient_id, slide_id), mask_scale):
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon",
                                      "coordinates": [np.round(r, 2).tolist() for r in polygon]},
                         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"},
                                        "isLocked": True}})
    if tiles and int(attrs.get(L.N_TILES, 0)):
        coords = store.coords(patient_id, slide_id)
        fw, fh = attrs["footprint_px"]  # level-0 px (x, y), as the tiler has always written it
        measures = {"tissue": store.tissue(patient_id, slide_id)}
        if L.TILE_QC in group:
            measures.update(store.tile_qc(patient_id, slide_id))
        for i, (x, y) in enumerate(coords.tolist()):
            features.append(_tile_feature((x, y, round(x + fw, 2), round(y + fh, 2)),
                                          {k: float(v[i]) for k, v in measures.items() if np.isfinite(v[i])}))
    return {"type": "FeatureCollection", "features": features,
            "properties": {"patient": patient_id, "slide": slide_id, "units": "level-0 px",
                           "mpp0": attrs.get("mpp0"), "source": (attrs.get(L.SOURCE) or {}).get("path")}}


def export_geojson(store, out_dir: str | Path, tiles: bool = True) -> tuple[list[Path], list[str]]:
    """Write ``<out>/<patient>/<slide>.geojson`` for every complete slide; ``(paths, problems)``,
    a problem naming each damaged slide (the others are written)."""
    from .store import SlideStore, StoreDamageError

    store = store if isinstance(store, SlideStore) else SlideStore(store)
    out, written, problems = Path(out_dir), [], []
    for rec in store.records(status=L.COMPLETE):
        if rec.damage is not None:
            problems.append(str(rec.damage))
            continue
        try:
            doc = slide_geojson(store, rec.patient_id, rec.slide_id, tiles=tiles)
        except (StoreDamageError, KeyError) as e:
            problems.append(f"patient {rec.patient_id}, slide {rec.slide_id}: {e}")
            continue
        path = out / rec.patient_id / f"{rec.slide_id}.geojson"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(doc).encode())
        written.append(path)
    return written, problems

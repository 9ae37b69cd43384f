"""``hlss export-geojson``: tissue outlines and kept tiles in level-0 pixels, read back and compared
with the store (areas, holes, tile footprints, measurements)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.measure import points_in_poly

from hlss.cli import main
from pipeline.config import TilingParams
from pipeline.geojson import tissue_polygons
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore


def _signed(ring) -> float:
    """Shoelace area of a ring (positive: counter-clockwise read as x-right/y-up numbers)."""
    r = np.asarray(ring, float)
    return 0.5 * float(np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(np.roll(r[:, 0], -1), r[:, 1]))


def _area(ring) -> float:
    return abs(_signed(ring))


def test_a_ring_with_a_hole_keeps_its_hole_and_area():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 10:50] = True  # 30 x 40 mask px of tissue
    mask[15:25, 20:30] = False  # a 10 x 10 hole
    mask[2:4, 55:58] = True  # a separate speck
    polygons = tissue_polygons(mask, (8.0, 4.0))
    assert sorted(len(p) for p in polygons) == [1, 2]  # the speck alone; the block with one hole
    block = next(p for p in polygons if len(p) == 2)
    outer, hole = (np.asarray(r) for r in block)
    # traced through pixel edges' midpoints: within a pixel's perimeter of the true area
    assert _area(outer) == pytest.approx(30 * 40 * 8 * 4, rel=0.05)
    assert _area(hole) == pytest.approx(10 * 10 * 8 * 4, rel=0.25)
    assert outer[:, 0].min() == pytest.approx(10 * 8, abs=8) and outer[:, 1].max() == pytest.approx(35 * 4, abs=4)
    for ring in (outer, hole):
        assert np.allclose(ring[0], ring[-1])  # closed
    assert _signed(outer) > 0 > _signed(hole)  # RFC 7946's right-hand rule on the numbers: outer CCW, holes CW


def test_export_geojson_matches_the_store(make_slide, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    make_slide(str(slides / "a.svs"), width=2048, height=1536, seed=3)
    assert tile_cohort(slides, tmp_path / "s.zarr", TilingParams(target_mpp=1.0, tile_size=64)).exit_code == 0
    store = SlideStore(tmp_path / "s.zarr")
    (patient,) = store.patients()
    (slide,) = store.slides(patient)
    assert main(["export-geojson", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "g")]) == 0
    assert "wrote 1 GeoJSON files" in capsys.readouterr().out
    doc = json.loads((tmp_path / "g" / patient / f"{slide}.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and doc["properties"]["units"] == "level-0 px"
    tissue = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    attrs = store.slide_attrs(patient, slide)
    coords, fractions = store.coords(patient, slide), store.tissue(patient, slide)
    assert len(tiles) == attrs["n_tiles"] == len(coords)
    fw = attrs["footprint_px"][0]
    for feature, (x, y), fraction in zip(tiles, coords.tolist(), fractions):
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == [x, y] and ring[2] == [pytest.approx(x + fw, abs=0.01), pytest.approx(y + fw, abs=0.01)]
        assert feature["properties"]["measurements"]["tissue"] == pytest.approx(float(fraction))
        assert {"focus", "pen", "brightness", "saturation"} <= set(feature["properties"]["measurements"])
    # the outlines hold the mask's tissue area (level-0 px²) and the kept tiles' centres
    mask = store.tissue_mask(patient, slide)
    sx, sy = store.group(patient, slide)["tissue_mask"].attrs["scale"]
    area = sum(_area(f["geometry"]["coordinates"][0]) - sum(_area(h) for h in f["geometry"]["coordinates"][1:])
               for f in tissue)
    assert area == pytest.approx(mask.sum() * sx * sy, rel=0.1)
    assert all(f["properties"]["classification"]["name"] == "Tissue" for f in tissue)
    centres = coords + fw / 2
    inside = np.zeros(len(centres), bool)
    for f in tissue:
        inside |= points_in_poly(centres, np.asarray(f["geometry"]["coordinates"][0]))
    assert inside.mean() > 0.9


def test_export_geojson_without_a_store_is_a_usage_error(tmp_path, capsys):
    assert main(["export-geojson", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "g")]) == 2
    assert "no such store" in capsys.readouterr().err and not (tmp_path / "g").exists()

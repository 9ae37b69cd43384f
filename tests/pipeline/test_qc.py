"""QC pictures, per-tile QC measures, and filtering tiles on them (sampler and extraction)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from hlss.cli import main
from hlss_model.config import ConfigError, TrainConfig
from hlss_model.data import CohortIndex, draw_patient
from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.qc import (OUTLINE_RGB, QC_FIELDS, TILE_RGB, TileFilter, export_qc, inner_boundary, picture_size,
                        render_qc, tile_measures)
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore, StoreError

# lossless: the stored tiles are the pixels the QC measures saw (they are taken before encoding)
PARAMS = TilingParams(target_mpp=1.0, tile_size=64, compression=TileCompression.from_name("lossless"))


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory) -> Path:
    """One slide with tissue and pen marks, one blank slide (fails: no tissue)."""
    from pipeline.synthetic import HETissueRenderer, write_slide

    root = tmp_path_factory.mktemp("qc")
    slides = root / "slides"
    slides.mkdir()
    write_slide(slides / "pen.svs", 2048, 1536, HETissueRenderer(2048, 1536, tissue_class=0, stain_seed=0, seed=2, pen_marks=True), mpp=0.5)
    write_slide(slides / "blank.svs", 1024, 1024, HETissueRenderer(1024, 1024, tissue_class=0, stain_seed=0, seed=0, tissue=False), mpp=0.5)
    tile_cohort(slides, root / "store.zarr", PARAMS)
    return root / "store.zarr"


def _slide(store: SlideStore, status: str = "complete") -> tuple[str, str]:
    rec = next(store.records(status=status))
    return rec.patient_id, rec.slide_id


def _is(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (img == np.asarray(rgb, np.uint8)).all(axis=-1)


# -- the QC picture ---------------------------------------------------------------------------------


def test_qc_picture_outlines_the_mask_and_draws_every_kept_tile(qc_store):
    st = SlideStore(qc_store)
    p, s = _slide(st)
    img, thumb, mask = st.qc_image(p, s), st.thumbnail(p, s), st.tissue_mask(p, s)
    attrs, a = st.slide_attrs(p, s), dict(st.group(p, s)["qc"].attrs)
    th, tw = thumb.shape[:2]
    k = -(-512 // max(th, tw))  # a small thumbnail is enlarged by a whole factor to 512 px or more
    assert max(th, tw) < 512 and k > 1
    h, w = th * k, tw * k
    assert img.dtype == np.uint8 and img.shape[1] == w and a["size"] == [w, h]
    assert img.shape[0] == h + a["caption_px"] > h  # a caption band below the slide
    # every green pixel is a tissue-boundary pixel of the (enlarged) stored mask, and every boundary pixel is green
    boundary = find_boundaries(np.kron(mask, np.ones((k, k), bool)), mode="inner")
    green = _is(img[:h], OUTLINE_RGB)
    assert boundary.sum() > 50
    np.testing.assert_array_equal(green, boundary)
    # one rectangle per stored tile, drawn where the tile lies
    coords = st.coords(p, s)
    again, info = render_qc(thumb, mask, st.group(p, s)["thumbnail"].attrs["scale"], coords,
                            attrs["footprint_px"], ["x"])
    rects = info["rects"]
    assert len(rects) == attrs["n_tiles"] == len(coords)
    sx, sy = info["scale"]
    np.testing.assert_array_equal(rects[:, 0], np.floor(coords[:, 0] / sx))
    np.testing.assert_array_equal(rects[:, 1], np.floor(coords[:, 1] / sy))
    drawn = _is(img[:h], TILE_RGB) | green
    assert drawn[rects[:, 1], rects[:, 0]].all() and drawn[rects[:, 3], rects[:, 2]].all()
    np.testing.assert_array_equal(again[:h], img[:h])  # the stored picture is this drawing
    magenta = _is(img[:h], TILE_RGB)
    assert magenta.sum() > 0 and not magenta[~ndi.binary_dilation(_rect_outlines(rects, (h, w)))].any()
    # the caption band holds text (dark pixels on white)
    band = img[h:]
    assert (band.min(axis=-1) < 128).sum() > 100
    # PNG round trip
    png = Image.open(io.BytesIO(st.qc_png(p, s)))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), img)


def _rect_outlines(rects: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    for x0, y0, x1, y1 in rects.tolist():
        out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = True
        out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = True
    return out


def _masks() -> list[np.ndarray]:
    """Random masks (sparse to dense, smooth and speckled) and masks touching the image's edges."""
    rng = np.random.default_rng(7)
    masks = [rng.random((h, w)) < p for h, w, p in ((40, 60, 0.1), (33, 17, 0.5), (50, 50, 0.9), (1, 30, 0.5),
                                                     (30, 1, 0.5))]
    masks.append(np.kron(rng.random((12, 16)) < 0.5, np.ones((5, 5), bool)))  # blobs, many at the edges
    full, empty, dot, frame = np.ones((20, 30), bool), np.zeros((20, 30), bool), np.zeros((9, 9), bool), np.ones((9, 9), bool)
    dot[0, 4] = dot[4, 4] = dot[8, 8] = True
    frame[2:-2, 2:-2] = False
    edges = np.zeros((20, 30), bool)
    edges[:, :6] = edges[-4:, :] = True  # a band down the left edge and one along the bottom
    return masks + [full, empty, dot, frame, edges, np.ones((1, 1), bool)]


def test_inner_boundary_is_skimage_find_boundaries_inner():
    for mask in _masks():
        np.testing.assert_array_equal(inner_boundary(mask), find_boundaries(mask, mode="inner"),
                                      err_msg=f"{mask.shape} mask with {mask.sum()} pixels")


def test_picture_size_shrinks_large_and_enlarges_small_thumbnails():
    assert picture_size(5000, 300) == (2048, 123)
    assert picture_size(100, 60) == (600, 360)  # x6: the smallest whole factor reaching 512 px
    assert picture_size(1000, 800) == (1000, 800)


def test_render_qc_downscales_large_thumbnails():
    thumb = np.full((300, 5000, 3), 230, np.uint8)
    mask = np.zeros((300, 5000), bool)
    mask[100:200, 1000:3000] = True
    img, info = render_qc(thumb, mask, (4.0, 4.0), np.array([[4000, 400], [8000, 400]]), 64, ["caption"])
    assert img.shape[1] == 2048 and max(info["size"]) == 2048
    assert len(info["rects"]) == 2 and _is(img, TILE_RGB).any() and _is(img, OUTLINE_RGB).any()


def test_failed_slide_has_a_qc_picture_and_export_writes_every_slide(qc_store, tmp_path):
    st = SlideStore(qc_store)
    p, s = _slide(st, "failed")
    img = st.qc_image(p, s)
    assert img.shape[0] > st.thumbnail(p, s).shape[0] and not _is(img, TILE_RGB).any()
    out = tmp_path / "qc"
    paths = export_qc(qc_store, out)
    assert len(paths) == 2 == sum(1 for _ in st.records(status=None))
    for rec in st.records(status=None):
        path = out / rec.patient_id / f"{rec.slide_id}.png"
        assert path in paths
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")),
                                      st.qc_image(rec.patient_id, rec.slide_id))
    # the command
    assert main(["qc", str(qc_store), "--out", str(tmp_path / "cli"), "--status", "complete"]) == 0
    assert len(list((tmp_path / "cli").rglob("*.png"))) == 1


# -- per-tile measures ------------------------------------------------------------------------------


def test_stored_tile_qc_is_aligned_with_the_tiles(qc_store):
    st = SlideStore(qc_store)
    p, s = _slide(st)
    qc, n = st.tile_qc(p, s), st.slide_attrs(p, s)["n_tiles"]
    assert set(qc) == set(QC_FIELDS)
    for v in qc.values():
        assert v.shape == (n,) and v.dtype == np.float32 and np.isfinite(v).all()
    again = tile_measures(st.tiles(p, s)[:])  # row i is the measure of tile i
    for k in QC_FIELDS:
        np.testing.assert_allclose(qc[k], again[k], rtol=1e-5)
    assert (qc["brightness"] > 0).all() and (qc["brightness"] <= 1).all()
    assert (qc["saturation"] >= 0).all() and (qc["saturation"] <= 1).all()
    assert (qc["pen"] >= 0).all() and (qc["pen"] <= 1).all()


def test_measures_see_blur_ink_brightness_and_saturation(qc_store):
    st = SlideStore(qc_store)
    p, s = _slide(st)
    tiles = st.tiles(p, s)[:8]
    blurred = np.stack([ndi.gaussian_filter(t, sigma=(2, 2, 0)) for t in tiles])
    inked = tiles.copy()
    inked[:, 16:48, :] = (40, 70, 190)  # a blue marker stroke across half the tile
    white = np.full((1, 64, 64, 3), 250, np.uint8)
    m, mb, mi, mw = (tile_measures(x) for x in (tiles, blurred, inked, white))
    assert (mb["focus"] < 0.5 * m["focus"]).all()
    assert (mi["pen"] >= m["pen"] + 0.45).all() and (m["pen"] < 0.2).all()
    assert mw["brightness"][0] == pytest.approx(250 / 255) and mw["saturation"][0] == 0 and mw["pen"][0] == 0
    assert (m["saturation"] > 0.05).all() and (m["brightness"] < mw["brightness"][0]).all()


# -- filtering -------------------------------------------------------------------------------------


def test_tile_filter_limits_and_validation():
    qc = {"focus": np.array([1.0, 5.0, 9.0]), "pen": np.array([0.0, 0.5, 0.0]), "tissue": np.array([1.0, 1, 0.4])}
    assert TileFilter().keep(qc).tolist() == [True, True, True] and not TileFilter().active
    assert TileFilter(min_focus=5).keep(qc).tolist() == [False, True, True]
    assert TileFilter(min_focus=5, max_pen=0.1).keep(qc).tolist() == [False, False, True]
    assert TileFilter(min_tissue=0.5).keep(qc).tolist() == [True, True, False]
    with pytest.raises(KeyError, match="brightness"):
        TileFilter(max_brightness=0.9).keep(qc)
    with pytest.raises(ValueError):
        TileFilter(min_brightness=0.9, max_brightness=0.1)
    cfg = TrainConfig.from_dict({"tile_filter": {"min_focus": 3, "max_pen": 0.1}})
    assert cfg.tile_filter == TileFilter(min_focus=3.0, max_pen=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and not TrainConfig().tile_filter.active
    with pytest.raises(ConfigError, match="tile_filter"):
        TrainConfig.from_dict({"tile_filter": {"min_fokus": 3}})
    with pytest.raises(ConfigError, match="tile_filter"):
        TrainConfig.from_dict({"tile_filter": {"min_focus": "high"}})


def test_sampler_never_draws_a_filtered_tile(train_store, tmp_path):
    st = SlideStore(train_store)
    focus = np.concatenate([st.tile_qc(r.patient_id, r.slide_id)["focus"] for r in st.records("complete")])
    filt = TileFilter(min_focus=float(np.median(focus)))
    index = CohortIndex.from_store(train_store, tile_filter=filt)
    full = CohortIndex.from_store(train_store)
    kept = {key: set(np.flatnonzero(st.tile_keep(*key, filt)).tolist()) for key in index.slide_keys}
    assert sum(index.slide_tiles) == sum(len(v) for v in kept.values()) < sum(full.slide_tiles)
    sub = index.subset(list(index.patient_ids[:3]))
    for idx in (index, sub):
        rng = np.random.default_rng(0)
        for _ in range(50):
            for patient in range(idx.n_patients):
                slides, rows = draw_patient(idx, patient, slides=2, tiles=3, rng=rng)
                for g, r in zip(slides, rows):
                    assert set(r.tolist()) <= kept[idx.slide_keys[g]]
    # a store tiled before tile_qc: fine unfiltered or on tissue; a QC limit is a clear error
    old = tmp_path / "old.zarr"
    shutil.copytree(train_store, old)
    for d in old.rglob("tile_qc"):
        shutil.rmtree(d)
    assert CohortIndex.from_store(old).slide_tiles == full.slide_tiles
    assert sum(CohortIndex.from_store(old, tile_filter=TileFilter(min_tissue=0.9)).slide_tiles) \
        <= sum(full.slide_tiles)
    with pytest.raises(StoreError, match="retile"):
        CohortIndex.from_store(old, tile_filter=filt)


def test_extraction_with_a_filter_computes_kept_rows_only(train_store, tmp_path):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    store = tmp_path / "store.zarr"
    shutil.copytree(train_store, store)
    st = SlideStore(store)
    p = st.patients()[0]
    keys = [(p, s) for s in st.slides(p)]
    focus = st.tile_qc(*keys[0])["focus"]
    filt = TileFilter(min_focus=float(np.median(focus)))
    enc = timm_encoder("resnet10t", name="r10")
    rep = extract_features(store, [enc], batch_size=16, device="cpu", slides=keys, tile_filter=filt)
    assert rep.exit_code == 0 and rep.extracted == keys
    filtered = {}
    for key in keys:
        f = st.features(*key, "r10")
        keep = st.tile_keep(*key, filt)
        assert f.shape[0] == len(keep) == st.slide_attrs(*key)["n_tiles"]  # aligned with coords
        a = f.attrs
        assert a["tile_filter"] == filt.to_dict() and a["n_kept"] == keep.sum()
        values = f[:]
        assert np.isfinite(values[keep]).all() and np.isnan(values[~keep]).all()
        filtered[key] = values
    assert rep.tiles == sum(int(st.tile_keep(*k, filt).sum()) for k in keys)
    # the same filter again: nothing to do; no filter: recomputed, and the kept rows agree
    assert extract_features(store, [enc], batch_size=16, device="cpu", slides=keys, tile_filter=filt).skipped == keys
    rep = extract_features(store, [enc], batch_size=16, device="cpu", slides=keys)
    assert rep.extracted == keys
    for key in keys:
        full = st.features(*key, "r10")[:]
        keep = st.tile_keep(*key, filt)
        assert np.isfinite(full).all() and "tile_filter" not in st.features(*key, "r10").attrs
        np.testing.assert_allclose(full[keep], filtered[key][keep], rtol=1e-4, atol=1e-4)

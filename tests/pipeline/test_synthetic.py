"""Synthetic slides: both readers see the pyramid, mpp and content we meant to write; content
is consistent across tiles and levels, deterministic, and tells classes apart by structure
but not by colour; the demo cohort and its manifest; streaming keeps memory bounded."""

from __future__ import annotations

import csv
import hashlib
import re
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import tiffslide
from numpy.lib.stride_tricks import sliding_window_view
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from pipeline.synthetic import (
    CLASS_NAMES,
    HETissueRenderer,
    level_downsamples,
    make_demo_cohort,
    write_blank_slide,
    write_no_mpp_slide,
    write_slide,
    write_small_slide,
)

W, H = 2048, 1536


def renderer(**kw) -> HETissueRenderer:
    opts = dict(tissue_class=0, stain_seed=1, seed=2) | kw
    return HETissueRenderer(opts.pop("width", W), opts.pop("height", H), **opts)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two RGB images."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def box_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f, img.shape[1] // f
    return img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))


def inside_tissue(r: HETissueRenderer, size: int) -> tuple[int, int]:
    """Level-0 origin of a size x size square lying wholly on tissue (ground truth)."""
    cell = max(32, r.width // 256)
    mask = r.tissue_mask(0, 0, r.width // cell, r.height // cell, cell)
    k = size // cell + 2
    ok = sliding_window_view(mask, (k, k)).all(axis=(2, 3))
    ys, xs = np.nonzero(ok)
    assert len(ys), "no tissue window of that size"
    i = len(ys) // 2
    return (int(xs[i]) + 1) * cell, (int(ys[i]) + 1) * cell


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- writer + readers


@pytest.mark.parametrize(
    "vendor,mpp,suffix", [("aperio", 0.5, ".svs"), ("aperio", 0.25, ".svs"), ("generic", 0.5, ".tif")]
)
def test_both_readers_see_the_pyramid_mpp_and_content(tmp_path, vendor, mpp, suffix):
    r = renderer(tissue_class=1)
    path = write_slide(tmp_path / f"s{suffix}", W, H, r, mpp=mpp, vendor=vendor, n_levels=3)
    x, y = inside_tissue(r, 512)
    x, y = x // 64 * 64, y // 64 * 64  # on the pixel grid of every level
    for slide, ns in ((tiffslide.TiffSlide(path), "tiffslide"), (openslide.OpenSlide(path), "openslide")):
        with slide:
            props = slide.properties
            assert slide.dimensions == (W, H)
            assert slide.level_count == 3
            assert slide.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
            assert slide.level_downsamples == pytest.approx((1, 4, 16))
            assert float(props[f"{ns}.mpp-x"]) == pytest.approx(mpp)
            assert float(props[f"{ns}.mpp-y"]) == pytest.approx(mpp)
            if vendor == "aperio":
                assert props[f"{ns}.vendor"] == "aperio"
                assert float(props[f"{ns}.objective-power"]) == {0.5: 20, 0.25: 40}[mpp]
                assert "thumbnail" in slide.associated_images
            for level, d in enumerate((1, 4, 16)):
                size = min(256, (W - x) // d, (H - y) // d)  # within the level
                assert size >= 32
                got = np.asarray(slide.read_region((x, y), level, (size, size)).convert("RGB"))
                assert mad(got, r.region(x, y, size, size, d)) < 8, (ns, level)  # JPEG q90, 4:2:0 chroma


def test_no_mpp_generic_tiff_has_no_mpp_in_either_reader(tmp_path):
    path = write_no_mpp_slide(tmp_path / "nompp.tif", 1024, 768)
    with tiffslide.TiffSlide(path) as ts:
        assert ts.properties.get("tiffslide.mpp-x") is None
    with openslide.OpenSlide(path) as os_:
        assert "openslide.mpp-x" not in os_.properties
        assert os_.properties["openslide.vendor"] == "generic-tiff"


def test_tiny_and_blank_slides(tmp_path):
    tiny = write_small_slide(tmp_path / "tiny.svs")
    for slide in (tiffslide.TiffSlide(tiny), openslide.OpenSlide(tiny)):
        with slide:
            assert slide.dimensions == (200, 150) and slide.level_count == 1
            assert np.asarray(slide.read_region((0, 0), 0, (200, 150)).convert("RGB")).shape == (150, 200, 3)
    blank = write_blank_slide(tmp_path / "blank.svs", 1024, 768)
    with openslide.OpenSlide(blank) as slide:
        img = np.asarray(slide.read_region((0, 0), 0, (1024, 768)).convert("RGB")).astype(int)
    assert img.min() > 220 and np.abs(img - img.mean(axis=(0, 1))).mean() < 3  # plain glass, slight noise
    assert not renderer(tissue=False).tissue_mask(0, 0, 64, 48, 32).any()


def test_pyramid_levels():
    assert level_downsamples(4096, 3072) == [1, 4]
    assert level_downsamples(16384, 16384) == [1, 4, 16]
    assert level_downsamples(60000, 60000) == [1, 4, 16, 64]
    assert level_downsamples(200, 150) == [1]
    assert level_downsamples(2048, 1536, n_levels=3) == [1, 4, 16]


# ----------------------------------------------------------------------------- content


def test_region_is_seamless_across_tiles_and_consistent_across_levels():
    r = renderer(tissue_class=3, width=60000, height=60000)  # far from the origin too
    x, y = inside_tissue(r, 2048)
    x, y = x // 64 * 64, y // 64 * 64
    whole = r.region(x, y, 512, 512)
    tiles = np.vstack([np.hstack([r.region(x + j, y + i, 256, 256) for j in (0, 256)]) for i in (0, 256)])
    assert np.array_equal(whole, tiles)
    assert np.array_equal(whole[100:300, 37:237], r.region(x + 37, y + 100, 200, 200))  # unaligned origin
    # a coarser level is the box-averaged level 0 (up to the nonlinearity of stain absorption)
    level0 = r.region(x, y, 2048, 2048)
    for d in (4, 16, 64):
        n = 2048 // d
        assert mad(r.region(x, y, n, n, d), box_mean(level0, d)) < 6, d
    with pytest.raises(ValueError):
        r.region(x, y, 8, 8, 2.5)


def test_rendering_is_deterministic_and_seeded():
    a = renderer(pen_marks=True).region(512, 512, 512, 512)
    assert np.array_equal(a, renderer(pen_marks=True).region(512, 512, 512, 512))
    assert mad(a, renderer(pen_marks=True, seed=3).region(512, 512, 512, 512)) > 5  # other layout
    assert mad(a, renderer(pen_marks=True, stain_seed=9).region(512, 512, 512, 512)) > 1  # other stain


def test_glass_and_tissue_cover_the_slide_as_designed():
    for seed in range(4):
        r = renderer(seed=seed)
        cover = r.tissue_mask(0, 0, W // 16, H // 16, 16).mean()
        assert 0.28 < cover < 0.62, cover
        thumb = r.region(0, 0, W // 16, H // 16, 16).astype(int)
        glass = thumb[~r.tissue_mask(0, 0, W // 16, H // 16, 16)]
        assert (glass.min(axis=1) > 225).mean() > 0.97  # white-ish glass


def nucleus_features(img: np.ndarray) -> np.ndarray:
    """Nuclei from an Otsu threshold of the red channel (hematoxylin absorbs red, eosin hardly):
    count per 10^5 px, median area (px), median eccentricity; share of bright (lumen) pixels."""
    red = img[..., 0].astype(float)
    nuclei = [p for p in regionprops(label(red < threshold_otsu(red))) if p.area >= 8]
    return np.array([
        len(nuclei) / (red.size / 1e5),
        np.median([p.area for p in nuclei]),
        np.median([p.eccentricity for p in nuclei]),
        (img.min(axis=2) > 215).mean(),
    ])


def test_classes_differ_in_structure_not_in_mean_colour():
    per_class = 8
    colours, features, labels = [], [], []
    for c in range(len(CLASS_NAMES)):
        for k in range(per_class):
            r = renderer(tissue_class=c, stain_seed=100 + 10 * c + k, seed=500 + 10 * c + k)
            img = r.region(*inside_tissue(r, 256), 256, 256)
            colours.append(img.reshape(-1, 3).mean(axis=0))
            features.append(nucleus_features(img))
            labels.append(c)
    colours, features, labels = np.array(colours), np.array(features), np.array(labels)
    classes = range(len(CLASS_NAMES))

    # mean colour: the stain varies more within a class than the class means differ
    means = np.array([colours[labels == c].mean(axis=0) for c in classes])
    within = np.sqrt(((colours - means[labels]) ** 2).sum(axis=1).mean())
    between = max(np.linalg.norm(means[a] - means[b]) for a in classes for b in classes if a < b)
    assert between < within, (between, within)

    # structure: a nearest-centroid rule on four nucleus statistics, leave-one-out, is right
    z = (features - features.mean(axis=0)) / features.std(axis=0)
    right = 0
    for i in range(len(z)):
        rest = np.arange(len(z)) != i
        centroids = np.array([z[rest & (labels == c)].mean(axis=0) for c in classes])
        right += np.argmin(((centroids - z[i]) ** 2).sum(axis=1)) == labels[i]
    assert right / len(z) >= 0.95
    glandular, solid, spindle, pleomorphic = (features[labels == c].mean(axis=0) for c in classes)
    assert glandular[3] > 0.03 > max(solid[3], spindle[3], pleomorphic[3])  # lumens
    assert spindle[2] > max(solid[2], pleomorphic[2])  # elongated nuclei
    assert pleomorphic[1] > max(solid[1], spindle[1])  # large nuclei
    assert solid[0] > max(spindle[0], pleomorphic[0])  # crowded nuclei


def test_pen_marks_are_drawn_over_tissue_and_glass():
    def ink(img: np.ndarray) -> np.ndarray:
        r, g, b = (img[..., i].astype(int) for i in range(3))
        blue = (b - r > 90) & (g < 150)
        green = (g - r > 50) & (g - b > 40)
        black = img.max(axis=2) < 90
        return blue | green | black

    d = 8
    plain, marked = renderer(), renderer(pen_marks=True)
    tissue = marked.tissue_mask(0, 0, W // d, H // d, d)
    assert ink(plain.region(0, 0, W // d, H // d, d)).mean() < 0.001
    on = ink(marked.region(0, 0, W // d, H // d, d))
    assert on.mean() > 0.01 and on[tissue].sum() > 100 and on[~tissue].sum() > 100


# ----------------------------------------------------------------------------- cohort


def test_demo_cohort_manifest_and_determinism(tmp_path):
    opts = dict(n_patients=6, slides_per_patient=(1, 2), n_classes=2, width=640, height=512, seed=5)
    manifest = make_demo_cohort(tmp_path / "a", **opts)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_path", "patient_id", "slide_id", "label", "split"]
    patients = sorted({row["patient_id"] for row in rows})
    assert patients == [f"TCGA-HL-{i:04d}" for i in range(1, 7)]
    assert 6 <= len(rows) <= 12
    for row in rows:
        path = manifest.parent / row["slide_path"]
        assert path.is_file() and path.suffix == ".svs"
        assert re.fullmatch(rf"{row['patient_id']}-01Z-00-DX[12]", row["slide_id"])
        assert re.fullmatch(rf"{row['slide_id']}\.[0-9a-f]{{8}}(-[0-9a-f]{{4}}){{3}}-[0-9a-f]{{12}}\.svs", path.name)
        with openslide.OpenSlide(path) as slide:
            assert slide.dimensions == (640, 512) and slide.properties["openslide.mpp-x"] == "0.5"
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add((row["label"], row["split"]))
    assert all(len(v) == 1 for v in by_patient.values())  # one label and split per patient
    labels = {p: next(iter(v)) for p, v in by_patient.items()}
    assert [labels[p][0] for p in patients] == ["glandular", "solid"] * 3  # round-robin classes
    splits = [s for _, s in labels.values()]
    assert splits.count("train") == 4 and splits.count("test") == 2
    for split in ("train", "test"):
        assert {lab for lab, s in labels.values() if s == split} == {"glandular", "solid"}
    dx2 = [row for row in rows if row["slide_id"].endswith("DX2")]
    assert all(any(r["slide_id"] == row["slide_id"][:-1] + "1" for r in rows) for row in dx2)

    again = make_demo_cohort(tmp_path / "b", **opts)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all(sha256(tmp_path / "a" / p) == sha256(tmp_path / "b" / p) for p in files_a)
    other = make_demo_cohort(tmp_path / "c", **(opts | dict(seed=6)))
    assert other.read_bytes() != again.read_bytes()


def test_demo_cohort_plain_names_and_limits(tmp_path):
    manifest = make_demo_cohort(tmp_path, n_patients=2, slides_per_patient=(1, 1), n_classes=1,
                                width=300, height=300, tcga_names=False)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slide_path"], r["patient_id"], r["slide_id"]) for r in rows] == [
        ("slides/P0001_S1.svs", "P0001", "P0001_S1"), ("slides/P0002_S1.svs", "P0002", "P0002_S1")]
    with pytest.raises(ValueError):
        make_demo_cohort(tmp_path, n_classes=5)


# ----------------------------------------------------------------------------- streaming


class Ramps:
    """A cheap renderer (a function of level-0 coordinates), so the test times the writer."""

    def region(self, x: int, y: int, w: int, h: int, downsample: float = 1) -> np.ndarray:
        cols = (x + np.arange(w) * downsample) // 64 % 200
        rows = (y + np.arange(h) * downsample) // 64 % 200
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = cols[None, :] + 40
        img[..., 1] = rows[:, None] + 40
        img[..., 2] = 200
        return img


def test_large_slide_is_streamed_with_bounded_memory(tmp_path):
    side = 16384  # 768 MiB of raw RGB at level 0
    tracemalloc.start()
    try:
        path = write_slide(tmp_path / "big.svs", side, side, Ramps())
        _, writer_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # the H&E renderer works in bands too: the whole slide at downsample 64 (4 M samples)
        HETissueRenderer(side, side, tissue_class=2, stain_seed=0, seed=0).region(0, 0, 256, 256, 64)
        _, render_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert writer_peak < 32 * 2**20, writer_peak / 2**20  # MiB, vs 768 MiB for the image
    assert render_peak < 64 * 2**20, render_peak / 2**20
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((side, side), (4096, 4096), (1024, 1024))
        corner = slide.read_region((side - 256, side - 256), 0, (256, 256), as_array=True)
    assert mad(corner, Ramps().region(side - 256, side - 256, 256, 256)) < 2

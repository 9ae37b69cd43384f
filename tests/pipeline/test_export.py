"""``hlss export-mil``: stored features as CLAM/TRIDENT MIL bags, slide lists, splits and pooled
embeddings, read back exactly the way those tools read them.

Neither tool is on PyPI (and pandas is not installed here), so the readers below reproduce their
code line by line with ``csv``/``h5py``/``torch``/``openslide``, citing the lines they follow in
the mirrors of mahmoodlab/CLAM at 53e2409d4a8189c682c173382964a85f114f923c and mahmoodlab/TRIDENT
at a91fa8490e0210ebbbe58452c3babe009e0ab7ca.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hlss.cli import build_parser, main
from hlss.commands import outputs as commands
from hlss.options import resolve_store
from pipeline.export import ExportError, export_mil, file_stem, trident_dir
from pipeline.pooling import POOLED, combine, pool
from pipeline.store import SlideStore, StoreWriter, tiles_version
from tests.store_snapshot import assert_unchanged, snapshot

DIM = 12


def _copy(train_store: Path, tmp_path: Path, patients: int = 3) -> Path:
    """A private copy of the first ``patients`` patients of the session store."""
    keep = set(SlideStore(train_store).patients()[:patients])

    def ignore(folder, names):
        if Path(folder).name != "patients":
            return []
        return [n for n in names if (Path(folder) / n).is_dir() and n not in keep]

    dst = tmp_path / "store.zarr"
    shutil.copytree(train_store, dst, ignore=ignore)
    return dst


def _put_features(store: Path, p: str, s: str, name: str, seed: int = 0, values: np.ndarray | None = None,
                  **attrs_extra) -> np.ndarray:
    """Commit ``values`` (default random ``(N, DIM)``) as features of a slide through the store's writer."""
    st = SlideStore(store)
    attrs = st.slide_attrs(p, s)
    if values is None:
        values = np.random.default_rng(seed).standard_normal((attrs["n_tiles"], DIM)).astype(np.float32)
    w = StoreWriter(store)
    arr = w.stage_features(len(values), values.shape[1], fill_value=float("nan"))
    arr[:] = values
    w.commit_features(arr, p, s, name, {"model": "test:random", "weights_fingerprint": f"seed{seed}",
                                        "dim": values.shape[1], "dtype": "float32", "n": len(values),
                                        **attrs_extra}, tiles_version(attrs))
    return values


def _slides(store: Path) -> list[tuple[str, str]]:
    return [(r.patient_id, r.slide_id) for r in SlideStore(store).records(status="complete")]


def _stem(store: Path, p: str, s: str) -> str:
    return file_stem(SlideStore(store).slide_attrs(p, s)["source"]["path"])


def _slide_meta(store: Path, p: str, s: str) -> Path:
    return store / "patients" / p / "slides" / s / "zarr.json"


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc["attributes"])
    path.write_text(json.dumps(doc))


def _set_split(store: Path, p: str, split: str) -> None:
    def edit(a):
        a["split"] = split
    _edit_json(store / "patients" / p / "zarr.json", edit)


@pytest.fixture
def exported_store(train_store, tmp_path):
    """A store copy with features "f" on every slide but the last one."""
    store = _copy(train_store, tmp_path)
    slides = _slides(store)
    assert len(slides) >= 3
    values = {key: _put_features(store, *key, "f", seed=i) for i, key in enumerate(slides[:-1])}
    return store, slides, values


# -- CLAM: dataset_modules/dataset_generic.py ----------------------------------------------------

def _pd_read_csv(path: Path) -> tuple[list[str], list[dict[str, str | None]]]:
    """``pd.read_csv(path)`` as CLAM uses it: header row, an unnamed column becomes ``Unnamed: i``,
    empty cells are NaN (None here), values stay strings (object dtype: our ids are not numbers)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [c or f"Unnamed: {i}" for i, c in enumerate(next(reader))]
        return header, [{k: (v if v != "" else None) for k, v in zip(header, row)} for row in reader]


def clam_dataset(csv_path: Path, label_dict: dict[str, int]) -> list[dict]:
    """Generic_WSI_Classification_Dataset.__init__ (dataset_generic.py L60-66: label_col 'label',
    ``pd.read_csv(csv_path)``) and df_prep (L111-122: ``data.at[i, 'label'] = label_dict[key]``)."""
    _, rows = _pd_read_csv(csv_path)
    for r in rows:
        r["label"] = label_dict[r["label"]]  # L119-120; a label outside label_dict is CLAM's KeyError
    return rows


def clam_return_splits(slide_data: list[dict], csv_path: Path) -> tuple[list[dict] | None, ...]:
    """return_splits(from_id=False, csv_path) (L244-249) and get_split_from_df (L188-199):
    ``all_splits[key].dropna()``, then the slide_data rows whose ``slide_id`` ``isin`` the column."""
    _, all_splits = _pd_read_csv(csv_path)
    out = []
    for key in ("train", "val", "test"):
        split = [r[key] for r in all_splits if r[key] is not None]  # L189-190
        if len(split) > 0:  # L192-195
            out.append([r for r in slide_data if r["slide_id"] in split])
        else:
            out.append(None)  # L197
    return tuple(out)


def clam_getitem(data_dir: Path, row: dict, use_h5: bool):
    """Generic_MIL_Dataset.__getitem__ (L327-352): ``pt_files/{slide_id}.pt`` through torch.load, or
    ``h5_files/{slide_id}.h5`` 'features' and 'coords' when load_from_h5(True)."""
    slide_id, label = row["slide_id"], row["label"]
    if not use_h5:
        full_path = os.path.join(data_dir, "pt_files", "{}.pt".format(slide_id))  # L338
        return torch.load(full_path), label  # L339 (torch >= 2.6 loads tensors with weights_only)
    full_path = os.path.join(data_dir, "h5_files", "{}.h5".format(slide_id))  # L346
    with h5py.File(full_path, "r") as hdf5_file:  # L347-349
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
    return torch.from_numpy(features), label, coords  # L351-352


def _store_bag(store: Path, p: str, s: str, name: str = "f") -> tuple[np.ndarray, np.ndarray]:
    """The store's (features, coords) of a slide's tiles with features (no NaN row)."""
    st = SlideStore(store)
    feats = st.features(p, s, name)[:]
    keep = ~np.isnan(feats).any(axis=1)
    return feats[keep], np.asarray(st.coords(p, s))[keep]


def test_clam_generic_mil_dataset_reads_bags_csv_and_splits(exported_store, tmp_path):
    store, slides, values = exported_store
    st = SlideStore(store)
    val_patient = slides[1][0]
    _set_split(store, val_patient, "Val")  # any case, as the manifest allows
    out = tmp_path / "mil"
    report = export_mil(store, "f", "both", out)

    assert report.written == slides[:-1]
    (p_missing, s_missing, why), = report.skipped
    assert (p_missing, s_missing) == slides[-1] and "'f'" in why
    assert report.exit_code == 1 and not report.renamed

    labels = sorted({str(st.patient_attrs(p)["label"]) for p, _ in slides})
    label_dict = {lab: i for i, lab in enumerate(labels)}
    slide_data = clam_dataset(out / "dataset.csv", label_dict)
    assert [r["case_id"] for r in slide_data] == [p for p, _ in slides[:-1]]
    assert [r["slide_id"] for r in slide_data] == [_stem(store, p, s) for p, s in slides[:-1]]
    assert [r["store_slide_id"] for r in slide_data] == [s for _, s in slides[:-1]]
    for r in slide_data:
        assert r["slide_path"] == st.slide_attrs(r["case_id"], r["store_slide_id"])["source"]["path"]
        assert Path(r["slide_path"]).exists() and Path(r["slide_path"]).name.startswith(r["slide_id"] + ".")
        assert r["label"] == label_dict[str(st.patient_attrs(r["case_id"])["label"])]

    train, val, test = clam_return_splits(slide_data, out / "splits_0.csv")
    expected = {"train": [], "val": [], "test": []}
    for p, s in slides[:-1]:
        split = "val" if p == val_patient else str(st.patient_attrs(p)["split"]).lower()
        expected[split].append(_stem(store, p, s))
    for got, key in ((train, "train"), (val, "val"), (test, "test")):
        assert [r["slide_id"] for r in got or []] == expected[key], key
    assert val and [n for n in report.notes if "no split" in n or "val" in n] == []

    for r in slide_data:
        key = (r["case_id"], r["store_slide_id"])
        feats, coords = _store_bag(store, *key)
        bag, label = clam_getitem(out, r, use_h5=False)
        assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32 and label == r["label"]
        np.testing.assert_array_equal(bag.numpy(), values[key])
        h5_bag, _, h5_coords = clam_getitem(out, r, use_h5=True)
        np.testing.assert_array_equal(h5_bag.numpy(), feats)
        np.testing.assert_array_equal(h5_coords, coords)  # level-0 (x, y) of each bag row
    names = {r["slide_id"] for r in slide_data}
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["h5_files", "pt_files", "dataset.csv", "splits_0.csv", "slide_embeddings.h5", "patient_embeddings.h5"]
        + [f"{n}.h5" for n in names] + [f"{n}.pt" for n in names])  # no temporary files left


def test_splits_without_val_are_reported(exported_store, tmp_path):
    store, slides, _ = exported_store
    unsplit = slides[0][0]
    _edit_json(store / "patients" / unsplit / "zarr.json", lambda a: a.pop("split", None))
    for p, s in slides:
        if p == unsplit:
            _edit_json(_slide_meta(store, p, s), lambda a: a.pop("split", None))
    report = export_mil(store, "f", "clam-h5", tmp_path / "mil")
    notes = "\n".join(report.notes)
    assert "val column of splits_0.csv is empty" in notes and "split=val" in notes
    n_unsplit = sum(1 for p, _ in report.written if p == unsplit)
    assert f"{n_unsplit} exported slides have no split" in notes
    header, rows = _pd_read_csv(tmp_path / "mil" / "splits_0.csv")
    assert header == ["Unnamed: 0", "train", "val", "test"]  # as CLAM's save_splits writes it (index first)
    listed = [r[k] for r in rows for k in ("train", "test") if r[k]]
    assert all(r["val"] is None for r in rows)
    assert len(listed) == len(report.written) - n_unsplit
    assert "NOTE no slide has split val" in report.table()


# -- CLAM: create_heatmaps.py -----------------------------------------------------------------------

def test_create_heatmaps_finds_each_slide_and_its_bag(exported_store, tmp_path):
    """create_heatmaps.py with dataset.csv as its process list and our h5 bag in place of the one it
    would compute: the slide file, the bag, and the patch geometry it draws with."""
    import openslide
    from PIL import Image

    store, slides, _ = exported_store
    out = tmp_path / "mil"
    export_mil(store, "f", "clam-h5", out)
    st = SlideStore(store)
    data_dir = str(Path(st.slide_attrs(*slides[0])["source"]["path"]).parent)  # data_arguments.data_dir
    slide_ext = ".svs"  # data_arguments.slide_ext
    # L153-157: pd.read_csv(process_list), initialize_df fills 'process' = 1 (batch_process_utils.py
    # L25, L69-78: columns it lacks are added), mask = df['process'] == 1
    _, process_stack = _pd_read_csv(out / "dataset.csv")
    raw_save_dir = tmp_path / "heatmap_raw"
    for row in process_stack:
        slide_name = row["slide_id"]  # L188
        if slide_ext not in slide_name:  # L189-190
            slide_name += slide_ext
        label = row["label"]  # L194
        slide_id = slide_name.replace(slide_ext, "")  # L198
        grouping = label  # L200-203 (a str label is its own group)
        slide_path = os.path.join(data_dir, slide_name)  # L223-224
        store_id = (row["case_id"], row["store_slide_id"])
        assert slide_path == st.slide_attrs(*store_id)["source"]["path"] and os.path.isfile(slide_path)

        # L208, L280-281: the bag create_heatmaps would otherwise compute (compute_from_patches writes
        # 'features' and 'coords', vis_utils/heatmap_utils.py L85-87): ours, put in its place
        r_slide_save_dir = raw_save_dir / "HEATMAP_OUTPUT" / str(grouping) / slide_id
        r_slide_save_dir.mkdir(parents=True)
        h5_path = os.path.join(r_slide_save_dir, slide_id + ".h5")
        shutil.copy(out / "h5_files" / f"{row['slide_id']}.h5", h5_path)
        assert os.path.isfile(h5_path)  # L285: so compute_from_patches is skipped
        file = h5py.File(h5_path, "r")  # L296-299
        features = torch.tensor(file["features"][:])
        patch_size = int(file["coords"].attrs["patch_size"])  # patching_arguments.patch_size to configure
        patch_level = int(file["coords"].attrs["patch_level"])  # patching_arguments.patch_level
        coords = file["coords"][:]  # L310-312
        file.close()
        feats, store_coords = _store_bag(store, *store_id)
        np.testing.assert_array_equal(features.numpy(), feats)
        np.testing.assert_array_equal(coords, store_coords)

        a = st.slide_attrs(*store_id)
        wsi = openslide.open_slide(slide_path)  # wsi_core/WholeSlideImage.py L32-33, L361-369
        dim_0 = wsi.level_dimensions[0]
        level_downsamples = [(dim_0[0] / float(d[0]), dim_0[1] / float(d[1])) for d in wsi.level_dimensions]
        # L267-270: the heatmap draws each score over patch_size * downsample level-0 px: the tile's footprint
        vis_patch_size = tuple((np.array((patch_size, patch_size)) * np.array(level_downsamples[patch_level])
                                ).astype(int))
        assert abs(vis_patch_size[0] - a["footprint_px"][0]) <= 1
        # L345: sampled patches are read_region(coord, patch_level, (patch_size, patch_size)): the tile
        patch = wsi.read_region(tuple(int(v) for v in coords[0]), patch_level, (patch_size, patch_size)).convert("RGB")
        tile = st.tiles(*store_id)[int(np.flatnonzero((store_coords == coords[0]).all(axis=1))[0])]
        resized = np.asarray(patch.resize((a["tile_size"],) * 2, Image.BILINEAR), dtype=np.float32)
        assert np.abs(resized - tile.astype(np.float32)).mean() < 12  # same place on the slide (resampling aside)
        wsi.close()


# -- TRIDENT: trident/Processor.py, trident/IO.py, trident/wsi_objects/WSI.py ------------------------

def trident_splitext(path: str) -> tuple[str, str]:
    """trident/IO.py splitext (L20-26): compound extensions first, else os.path.splitext."""
    path_lower = path.lower()
    for ext in {".ome.tif", ".ome.tiff", ".ome.zarr"}:  # L17
        if path_lower.endswith(ext):
            return path[:-len(ext)], path[-len(ext):]
    return os.path.splitext(path)


def trident_collect_valid_slides(wsi_dir: str, wsi_ext: list[str]) -> list[str]:
    """trident/IO.py collect_valid_slides without a custom list (L96-123): listdir, extension match, sorted."""
    wsi_ext = [ext.lower() for ext in wsi_ext]
    valid_rel_paths = sorted(f for f in os.listdir(wsi_dir) if any(f.lower().endswith(ext) for ext in wsi_ext))
    return [os.path.join(wsi_dir, rel) for rel in valid_rel_paths]


def trident_is_locked(path: str) -> bool:
    """trident/IO.py is_locked (L284-309)."""
    return os.path.exists(f"{path}.lock")


def trident_read_coords(coords_path: str) -> tuple[dict, np.ndarray]:
    """trident/IO.py read_coords (L576-605)."""
    with h5py.File(coords_path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    return attrs, coords


def test_trident_processor_sees_slides_done_and_reads_coords_and_features(exported_store, tmp_path):
    store, slides, _ = exported_store
    st = SlideStore(store)
    job_dir = str(tmp_path / "job")
    report = export_mil(store, "f", "clam-h5", job_dir, layout="trident", encoder="uni_v1")
    assert report.written == slides[:-1]
    assert not (Path(job_dir) / "h5_files").exists()
    wsi_source = str(Path(st.slide_attrs(*slides[0])["source"]["path"]).parent)
    by_stem = {_stem(store, p, s): (p, s) for p, s in slides}

    # run_batch_of_slides.py L383-384 / Processor.run_patching_job L518-529: the user's --mag 10
    # (10 / target_mpp 1.0) --patch_size 64 --overlap 0 name coords_dir
    mag, patch_size_arg, overlap = 10.0, 64, 0
    coords_dir = f"{float(mag):g}x_{patch_size_arg}px_{overlap}px_overlap"
    enc_name = "uni_v1"
    saveto = os.path.join(coords_dir, f"features_{enc_name}")  # Processor.py L763
    feat_dir = os.path.join(job_dir, saveto)
    done = []
    # Processor.__init__ L149-156, L188-199 (name = basename) -> WSI.__init__ L153-155 (splitext(name))
    for abs_path in trident_collect_valid_slides(wsi_source, [".svs"]):
        name, _ = trident_splitext(os.path.basename(abs_path))
        wsi_feats_fp = os.path.join(job_dir, saveto, f"{name}.h5")  # L792
        coords_path = os.path.join(job_dir, coords_dir, "patches", f"{name}_patches.h5")  # L806
        # run_patching_job L563 and run_patch_feature_extraction_job L794: exists and not locked = skipped
        if not (os.path.exists(wsi_feats_fp) and not trident_is_locked(wsi_feats_fp)):
            continue
        assert os.path.exists(coords_path)
        done.append(name)
        key = by_stem[name]
        a = st.slide_attrs(*key)
        feats, store_coords = _store_bag(store, *key)

        # WSI.extract_patch_features L930-934 and WSIPatcher L131-147 (what a re-extraction would read)
        coords_attrs, coords = trident_read_coords(coords_path)
        patch_size = coords_attrs.get("patch_size", None)
        level0_magnification = coords_attrs.get("level0_magnification", None)
        target_magnification = coords_attrs.get("target_magnification", None)
        assert None not in (patch_size, level0_magnification, target_magnification)
        downsample = (10 / target_magnification) / (10 / level0_magnification)
        patch_size_src = round(patch_size * downsample)
        assert patch_size == a["tile_size"] and abs(patch_size_src - a["footprint_px"][0]) <= 1
        assert int(coords_attrs["patch_size_level0"]) == round(a["footprint_px"][0])
        assert coords_attrs["name"] == name and coords_attrs["overlap"] == 0
        assert (coords_attrs["level0_width"], coords_attrs["level0_height"]) == tuple(a["dimensions"])
        np.testing.assert_array_equal(coords, store_coords)

        # WSI.extract_slide_features L1102-1106 (what a slide encoder reads from features_<enc>/)
        patch_features_path = os.path.join(job_dir, coords_dir, f"features_{enc_name}", f"{name}.h5")  # L1002
        with h5py.File(patch_features_path, "r") as f:
            fcoords = f["coords"][:]
            patch_features = f["features"][:]
            fattrs = dict(f["coords"].attrs)
            assert f["features"].attrs["encoder"] == enc_name and f["features"].attrs["name"] == name
        np.testing.assert_array_equal(patch_features, feats)
        np.testing.assert_array_equal(fcoords, store_coords)
        assert int(fattrs["patch_size_level0"]) == round(a["footprint_px"][0])

        # run_slide_feature_extraction_job L936-942, L989-990: slide_features_mean-<enc>/<name>.h5 is
        # "already extracted"; its 'features' is MeanSlideEncoder.forward's mean over the patches
        # (slide_encoder_models/load.py L599) and WSI.extract_slide_features' save (WSI.py L1163-1172)
        slide_feature_path = os.path.join(job_dir, coords_dir, f"slide_features_mean-{enc_name}", f"{name}.h5")
        assert os.path.exists(slide_feature_path) and not trident_is_locked(slide_feature_path)
        with h5py.File(slide_feature_path, "r") as f:
            slide_vec = f["features"][:]
        np.testing.assert_allclose(slide_vec, torch.from_numpy(patch_features).float().mean(dim=0).numpy(),
                                   rtol=1e-5, atol=1e-6)

    # run_batch_of_slides.py L421-445: the same slides are not pending for the feat task
    feat_done = {os.path.splitext(f)[0] for f in os.listdir(feat_dir) if os.path.splitext(f)[1] in {".h5", ".pt"}}
    assert sorted(done) == sorted(feat_done) == sorted(_stem(store, p, s) for p, s in slides[:-1])


# -- slide and patient embeddings ------------------------------------------------------------------

def test_pooled_vectors_are_stored_with_the_features_and_exported(train_store, tmp_path):
    """Slide vectors = numpy mean/max of the stored rows without NaN; patient vectors over all the
    patient's tiles; a linear probe on the exported slide embeddings separates the classes."""
    store = _copy(train_store, tmp_path, patients=8)
    st = SlideStore(store)
    slides = _slides(store)
    labels = sorted({str(st.patient_attrs(p)["label"]) for p, _ in slides})
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(DIM).astype(np.float32)
    stored = {}
    for i, (p, s) in enumerate(slides):
        n = st.slide_attrs(p, s)["n_tiles"]
        y = labels.index(str(st.patient_attrs(p)["label"]))
        v = (rng.standard_normal((n, DIM)) + (2 * y - 1) * 1.5 * direction).astype(np.float32)
        if i == 0:
            v[: n // 2] = np.nan  # tiles a tile filter left out
        stored[(p, s)] = _put_features(store, p, s, "f", values=v)
    for key, v in stored.items():  # committed with the array, from its rows
        a = st.features(*key, "f").attrs[POOLED]
        ok = v[~np.isnan(v).any(axis=1)]
        assert a["rows"] == len(ok)
        np.testing.assert_allclose(a["mean"], ok.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.float32(a["max"]), ok.max(axis=0))

    out = tmp_path / "mil"
    report = export_mil(store, "f", "clam-h5", out)
    assert report.exit_code == 0 and report.tiles == sum(int((~np.isnan(v).any(axis=1)).sum())
                                                          for v in stored.values())
    with h5py.File(out / "slide_embeddings.h5", "r") as f:
        mean, mx, tiles = f["mean"][:], f["max"][:], f["tiles"][:]
        ids = f["store_slide_id"].asstr()[:].tolist()
        case = f["case_id"].asstr()[:].tolist()
        label = f["label"].asstr()[:].tolist()
        split = f["split"].asstr()[:].tolist()
        assert f["slide_id"].asstr()[:].tolist() == [_stem(store, p, s) for p, s in slides]
    assert list(zip(case, ids)) == slides and mean.dtype == np.float32 and mean.shape == (len(slides), DIM)
    for i, key in enumerate(slides):
        ok = stored[key][~np.isnan(stored[key]).any(axis=1)]
        np.testing.assert_allclose(mean[i], np.nanmean(stored[key], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mx[i], ok.max(axis=0))
        assert tiles[i] == len(ok)
    with h5py.File(out / "patient_embeddings.h5", "r") as f:
        pmean, pmax = f["mean"][:], f["max"][:]
        patients = f["case_id"].asstr()[:].tolist()
    assert patients == sorted({p for p, _ in slides}, key=[p for p, _ in slides].index)
    for j, p in enumerate(patients):
        rows = np.concatenate([stored[k] for k in slides if k[0] == p])
        ok = rows[~np.isnan(rows).any(axis=1)]
        np.testing.assert_allclose(pmean[j], ok.mean(axis=0, dtype=np.float64), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pmax[j], ok.max(axis=0))

    # a linear probe without MIL: least squares on the train slides, evaluated on the held-out ones
    y = np.array([labels.index(v) for v in label], dtype=np.float64) * 2 - 1
    train = np.array([v == "train" for v in split])
    assert train.any() and (~train).any()
    x = np.hstack([mean, np.ones((len(mean), 1), dtype=np.float32)])
    w, *_ = np.linalg.lstsq(x[train], y[train], rcond=None)
    assert (np.sign(x[~train] @ w) == y[~train]).mean() == 1.0


def test_old_features_without_pooled_vectors_are_pooled_on_the_fly(exported_store, tmp_path):
    store, slides, values = exported_store
    export_mil(store, "f", "clam-h5", tmp_path / "new")
    for p, s in slides[:-1]:  # as a store written before pooling existed
        _edit_json(store / "patients" / p / "slides" / s / "features" / "f" / "zarr.json",
                   lambda a: a.pop(POOLED))
    assert all(POOLED not in SlideStore(store).features(p, s, "f").attrs for p, s in slides[:-1])
    before = snapshot(store)
    export_mil(store, "f", "clam-h5", tmp_path / "old")
    assert_unchanged(before, snapshot(store))  # read only
    for name in ("slide_embeddings.h5", "patient_embeddings.h5"):
        with h5py.File(tmp_path / "new" / name, "r") as new, h5py.File(tmp_path / "old" / name, "r") as old:
            np.testing.assert_array_equal(new["mean"][:], old["mean"][:])
            np.testing.assert_array_equal(new["max"][:], old["max"][:])
    with h5py.File(tmp_path / "old" / "slide_embeddings.h5", "r") as f:
        for i, key in enumerate(slides[:-1]):
            np.testing.assert_allclose(f["mean"][i], values[key].mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path, stem", [
    ("/d/TCGA-AA-0001-01Z-00-DX1.1f2e.svs", "TCGA-AA-0001-01Z-00-DX1.1f2e"), ("/d/x.OME.TIFF", "x"),
    ("s3://bucket/a/b.ome.tif", "b"), ("/d/s.ome.zarr", "s"), ("C:\\slides\\w.ndpi", "w"), ("/d/noext", "noext"),
    ("/d/.hidden", ".hidden"), ("", ""),
])
def test_file_stem_is_tridents_wsi_name(path, stem):
    assert file_stem(path) == stem
    if path and "\\" not in path and "://" not in path:  # TRIDENT's WSI.name (trident/IO.py splitext)
        assert trident_splitext(os.path.basename(path))[0] == stem


@pytest.mark.parametrize("mpp, tile, folder", [(0.5, 256, "20x_256px_0px_overlap"), (1.0, 64, "10x_64px_0px_overlap"),
                                               (0.25, 224, "40x_224px_0px_overlap"), (0.3, 256, "33.3333x_256px_0px_overlap")])
def test_trident_dir_is_the_folder_of_tridents_mag(mpp, tile, folder):
    assert trident_dir({"target_mpp": mpp, "tile_size": tile}) == folder
    mag = 10 / mpp  # run_batch_of_slides.py L383-384 with --mag 10/mpp
    assert f"{float(round(mag, 4) if mag % 1 else mag):g}x_{tile}px_0px_overlap" == folder


def test_pooling_helpers():
    rows = np.array([[1, 5], [np.nan, np.nan], [3, -1], [2, np.nan]], dtype=np.float32)
    p = pool(rows, block_rows=1)
    assert p.rows == 2 and p.mean.tolist() == [2.0, 2.0] and p.max.tolist() == [3.0, 5.0]
    q = pool(np.array([[10, 10]], dtype=np.float16))
    both = combine([p, q, pool(np.full((3, 2), np.nan, dtype=np.float32))])
    assert both.rows == 3 and both.mean.tolist() == [np.float32(14 / 3)] * 2 and both.max.tolist() == [10.0, 10.0]
    empty = pool(np.full((2, 2), np.nan, dtype=np.float32))
    assert empty.rows == 0 and np.isnan(empty.mean).all() and empty.to_attrs() == {"rows": 0, "mean": None,
                                                                                     "max": None}
    with pytest.raises(ValueError, match="different dimensions"):
        combine([p, pool(np.ones((1, 3), dtype=np.float32))])


def test_real_extracted_features_export(train_store, tmp_path):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    store = _copy(train_store, tmp_path, patients=1)
    assert extract_features(store, [timm_encoder("test_resnet", name="r")], batch_size=32, device="cpu").exit_code == 0
    report = export_mil(store, "r", "pt", tmp_path / "mil")
    assert report.exit_code == 0 and report.written == _slides(store)
    st = SlideStore(store)
    with h5py.File(tmp_path / "mil" / "slide_embeddings.h5", "r") as f:
        mean = f["mean"][:]
    for i, (p, s) in enumerate(report.written):
        bag = torch.load(tmp_path / "mil" / "pt_files" / f"{_stem(store, p, s)}.pt", weights_only=True)
        stored = st.features(p, s, "r")
        np.testing.assert_array_equal(bag.numpy(), stored[:].astype(np.float32))
        assert stored.attrs[POOLED]["rows"] == len(bag)  # extraction stored the pooled vectors
        np.testing.assert_allclose(mean[i], bag.numpy().mean(axis=0), rtol=1e-5, atol=1e-6)


# -- names, reruns, faults ----------------------------------------------------------------------------

def _set_source(store: Path, p: str, s: str, path: str | None) -> None:
    def edit(a):
        if path is None:
            a["source"].pop("path")
        else:
            a["source"]["path"] = path
    _edit_json(_slide_meta(store, p, s), edit)


def test_clashing_or_missing_stems_fall_back_to_slide_ids(exported_store, tmp_path, capsys):
    store, slides, _ = exported_store
    (p0, s0), (p1, s1) = slides[0], slides[1]
    _set_source(store, p0, s0, "/data/a/same.svs")
    _set_source(store, p1, s1, "/data/b/SAME.ndpi")  # one file name on a case-insensitive file system
    _put_features(store, *slides[-1], "f", seed=9)
    _set_source(store, *slides[-1], None)
    before = snapshot(store)
    rc = main(["export-mil", "--store", str(store), "--features", "f", "--out", str(tmp_path / "mil")])
    text = capsys.readouterr().out
    assert rc == 0  # every slide exported; the renames are warnings
    for (p, s), why in (((p0, s0), "also the stem of"), ((p1, s1), "also the stem of"),
                        (slides[-1], "no source path")):
        line = next(x for x in text.splitlines() if f"NAMED BY SLIDE ID {p}/{s}:" in x)
        assert why in line
        assert (tmp_path / "mil" / "h5_files" / f"{s}.h5").exists()
    assert not list((tmp_path / "mil" / "h5_files").glob("same*"))
    rows = {r["store_slide_id"]: r for r in _pd_read_csv(tmp_path / "mil" / "dataset.csv")[1]}
    assert rows[s0]["slide_id"] == s0 and rows[s0]["slide_path"] == "/data/a/same.svs"
    assert rows[slides[-1][1]]["slide_path"] is None
    assert_unchanged(before, snapshot(store))


def test_rerun_overwrites_and_drops_slides_whose_features_are_gone(exported_store, tmp_path):
    store, slides, _ = exported_store
    out = tmp_path / "mil"
    assert export_mil(store, "f", "clam-h5", out, layout="both").exit_code == 1
    stems = {k: _stem(store, *k) for k in slides}
    # the missing slide gets features, the first slide new ones, the second loses its features
    last = _put_features(store, *slides[-1], "f", seed=7)
    first = _put_features(store, *slides[0], "f", seed=8)
    p1, s1 = slides[1]
    shutil.rmtree(store / "patients" / p1 / "slides" / s1 / "features" / "f")
    stray = out / "h5_files" / f".hlss-tmp-dead-{slides[0][1]}.h5.tmp"  # left by a killed run
    stray.write_bytes(b"junk")
    old_style = out / "h5_files" / f"{slides[0][1]}.h5"  # an export of before bags were named by stem
    shutil.copy(out / "h5_files" / f"{stems[slides[0]]}.h5", old_style)
    foreign = out / "10x_64px_0px_overlap" / "patches" / f"{slides[0][1]}_patches.h5"
    with h5py.File(foreign, "w") as f:  # TRIDENT's own file: not ours, kept
        f["coords"] = np.zeros((1, 2), dtype=np.int64)

    report = export_mil(store, "f", "clam-h5", out, layout="both")
    assert [k[:2] for k in report.skipped] == [(p1, s1)]
    gone = [out / "h5_files" / f"{stems[(p1, s1)]}.h5", old_style] + [
        out / "10x_64px_0px_overlap" / d / f"{stems[(p1, s1)]}{suffix}"
        for d, suffix in (("patches", "_patches.h5"), ("features_f", ".h5"), ("slide_features_mean-f", ".h5"))]
    assert sorted(report.removed) == sorted(gone) and not any(p.exists() for p in gone)
    assert not stray.exists() and foreign.exists()
    assert "removed stale" in report.table()
    with h5py.File(out / "h5_files" / f"{stems[slides[0]]}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], first)
    with h5py.File(out / "h5_files" / f"{stems[slides[-1]]}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], last)
    assert [r["slide_id"] for r in _read_csv(out / "dataset.csv")] == [stems[k] for k in slides if k[1] != s1]
    assert not (out / "pt_files").exists()


def test_rerun_drops_the_bags_of_a_slide_whose_metadata_is_damaged(exported_store, tmp_path):
    store, slides, _ = exported_store
    out = tmp_path / "mil"
    export_mil(store, "f", "both", out)
    key = slides[0]
    bag = out / "h5_files" / f"{_stem(store, *key)}.h5"
    assert bag.exists()
    meta = _slide_meta(store, *key)
    meta.write_bytes(meta.read_bytes()[:40])  # its stem cannot be read any more
    before = snapshot(store)
    report = export_mil(store, "f", "both", out)
    assert report.skipped[0][:2] == key and "zarr.json" in report.skipped[0][2]
    assert not bag.exists() and not (out / "pt_files" / f"{bag.stem}.pt").exists()
    assert bag in report.removed and out / "pt_files" / f"{bag.stem}.pt" in report.removed
    assert key[1] not in {r["store_slide_id"] for r in _read_csv(out / "dataset.csv")}
    assert_unchanged(before, snapshot(store))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_nan_rows_are_left_out_of_bags(exported_store, tmp_path):
    store, slides, _ = exported_store
    key = slides[0]
    v = _put_features(store, *key, "f", seed=3)
    v[::2] = np.nan
    _put_features(store, *key, "f", values=v)
    all_nan = np.full_like(_put_features(store, *slides[1], "f", seed=4), np.nan)
    _put_features(store, *slides[1], "f", values=all_nan)
    before = snapshot(store)
    report = export_mil(store, "f", "clam-h5", tmp_path / "mil")
    assert_unchanged(before, snapshot(store))
    skipped = {(p, s): why for p, s, why in report.skipped}
    assert list(skipped) == [slides[-1], slides[1]]
    assert f"every row of features 'f' is NaN (all {len(all_nan)} tiles left out" in skipped[slides[1]]
    with h5py.File(tmp_path / "mil" / "h5_files" / f"{_stem(store, *key)}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], v[1::2])
        np.testing.assert_array_equal(f["tile_index"][:], np.arange(1, len(v), 2))
        np.testing.assert_array_equal(f["coords"][:], SlideStore(store).coords(*key)[1::2])


def test_unknown_feature_name_or_layout_is_a_clear_error(exported_store, tmp_path):
    store, _, _ = exported_store
    before = snapshot(store)
    with pytest.raises(ExportError) as e:
        export_mil(store, "nope", "clam-h5", tmp_path / "mil")
    msg = str(e.value)
    assert str(store) in msg and "'nope'" in msg and "f" in msg.split("feature names in the store:")[1]
    assert not (tmp_path / "mil").exists()  # nothing written
    with pytest.raises(ExportError, match="unknown format"):
        export_mil(store, "f", "npz", tmp_path / "mil")
    with pytest.raises(ExportError, match="unknown layout 'qupath'; choose one of clam, trident, both"):
        export_mil(store, "f", "pt", tmp_path / "mil", layout="qupath")
    with pytest.raises(ExportError, match=r"TRIDENT encoder name '\.\./up' is not allowed"):
        export_mil(store, "f", "pt", tmp_path / "mil", layout="trident", encoder="../up")
    assert not (tmp_path / "mil").exists()
    assert_unchanged(before, snapshot(store))


def _parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    resolve_store(args)
    return args


def test_cli_entry(exported_store, tmp_path, capsys):
    store, slides, _ = exported_store
    out = tmp_path / "mil"
    args = _parse(["export-mil", "--store", str(store), "--features", "f", "--format", "pt", "--layout", "both",
                   "--trident-encoder", "resnet50", "--out", str(out)])
    assert args.func is commands.export_mil and args.format == "pt" and args.layout == "both"
    assert args.func(args) == 1  # one slide skipped
    text = capsys.readouterr().out
    assert f"SKIPPED {slides[-1][0]}/{slides[-1][1]}" in text and f"{len(slides) - 1} slides" in text
    stems = sorted(_stem(store, p, s) for p, s in slides[:-1])
    assert sorted(p.stem for p in (out / "pt_files").iterdir()) == stems
    assert sorted(p.stem for p in (out / "10x_64px_0px_overlap" / "features_resnet50").iterdir()) == stems
    parsed = _parse(["export-mil", "--store", "s", "--features", "f", "--out", "o"])
    assert (parsed.format, parsed.layout, parsed.trident_encoder) == ("clam-h5", "clam", None)

    bad = ["export-mil", "--store", str(store), "--features", "nope", "--out", str(out)]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlss export-mil: error: ") and "'nope'" in err and str(store) in err
    missing = ["export-mil", "--store", str(tmp_path / "absent.zarr"), "--features", "f", "--out", str(out)]
    assert main(missing) == 2 and "no such store" in capsys.readouterr().err
    for opt in (["--format", "npz"], ["--layout", "qupath"]):
        with pytest.raises(SystemExit):
            _parse(["export-mil", "--store", str(store), "--features", "f", *opt, "--out", str(out)])


def test_trident_folders_take_tridents_name_of_a_registered_encoder(train_store, tmp_path):
    """Features of ``--encoder uni`` record ``trident_name: uni_v1``, so the export writes
    ``features_uni_v1/`` (the folder TRIDENT's Processor looks in for its ``uni_v1``) without
    ``--trident-encoder``; an explicit name still wins, and features without the attr keep their name."""
    from hlss_model.encoder_zoo import TRIDENT_NAMES, ZOO

    store = _copy(train_store, tmp_path)
    slides = _slides(store)
    for p, s in slides:
        _put_features(store, p, s, "uni", trident_name=ZOO["uni"].trident_name)
        _put_features(store, p, s, "mine")
    job = tmp_path / "job"
    export_mil(store, "uni", "clam-h5", job, layout="trident")
    def feature_folders(job_dir: Path) -> list[str]:
        return sorted(d.name for d in job_dir.glob("*_overlap/features_*"))

    assert feature_folders(job) == ["features_uni_v1"]
    export_mil(store, "uni", "clam-h5", tmp_path / "job2", layout="trident", encoder="my_uni")
    assert feature_folders(tmp_path / "job2") == ["features_my_uni"]
    export_mil(store, "mine", "clam-h5", tmp_path / "job3", layout="trident")
    assert feature_folders(tmp_path / "job3") == ["features_mine"]
    # every name is a key of TRIDENT's encoder_registry (trident/patch_encoder_models/load.py, a91fa84)
    assert set(TRIDENT_NAMES.values()) <= {"conch_v15", "uni_v1", "uni_v2", "phikon_v2", "resnet50", "gigapath",
                                          "virchow2", "hoptimus0", "hoptimus1", "hibou_l"}
    assert set(TRIDENT_NAMES) <= set(ZOO)

"""``hlss export-mil``: stored features as CLAM/TRIDENT MIL bags, read back the way those tools read them
(CLAM's ``Generic_MIL_Dataset``: ``h5py.File(h5_files/<slide_id>.h5)["features"|"coords"]``,
``torch.load(pt_files/<slide_id>.pt)``, ``dataset.csv`` with ``case_id,slide_id,label``)."""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hlss.cli import build_parser, main
from hlss.commands import outputs as commands
from hlss.options import resolve_store
from pipeline.export import ExportError, export_mil
from pipeline.store import SlideStore, StoreWriter, tiles_version

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


def _put_features(store: Path, p: str, s: str, name: str, seed: int = 0) -> np.ndarray:
    """Commit random ``(N, DIM)`` features for a slide through the store's own writer."""
    st = SlideStore(store)
    attrs = st.slide_attrs(p, s)
    values = np.random.default_rng(seed).standard_normal((attrs["n_tiles"], DIM)).astype(np.float32)
    w = StoreWriter(store)
    arr = w.stage_features(len(values), DIM)
    arr[:] = values
    w.commit_features(arr, p, s, name, {"model": "test:random", "weights_fingerprint": f"seed{seed}",
                                        "dim": DIM, "dtype": "float32", "n": len(values)}, tiles_version(attrs))
    return values


def _slides(store: Path) -> list[tuple[str, str]]:
    return [(r.patient_id, r.slide_id) for r in SlideStore(store).records(status="complete")]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def exported_store(train_store, tmp_path):
    """A store copy with features "f" on every slide but the last one."""
    store = _copy(train_store, tmp_path)
    slides = _slides(store)
    assert len(slides) >= 3
    values = {key: _put_features(store, *key, "f", seed=i) for i, key in enumerate(slides[:-1])}
    return store, slides, values


def test_clam_h5_and_pt_read_back_as_clam_reads_them(exported_store, tmp_path):
    store, slides, values = exported_store
    out = tmp_path / "mil"
    report = export_mil(store, "f", "both", out)
    st = SlideStore(store)

    assert report.written == slides[:-1]
    (p_missing, s_missing, why), = report.skipped
    assert (p_missing, s_missing) == slides[-1] and "'f'" in why
    assert report.exit_code == 1
    assert not (out / "h5_files" / f"{s_missing}.h5").exists() and not (out / "pt_files" / f"{s_missing}.pt").exists()

    for p, s in slides[:-1]:
        a = st.slide_attrs(p, s)
        with h5py.File(out / "h5_files" / f"{s}.h5", "r") as f:  # CLAM's Generic_MIL_Dataset / heatmaps
            feats = f["features"][:]
            coords = f["coords"][:]
            patch_size = f["coords"].attrs["patch_size"]
            patch_level = f["coords"].attrs["patch_level"]
            size0 = f["coords"].attrs["patch_size_level0"]  # TRIDENT's slide encoders
            f_tile_size = f["coords"].attrs["tile_size"]
            assert f.attrs["feature_name"] == "f" and f.attrs["model"] == "test:random"
            assert f.attrs["patient_id"] == p and f.attrs["slide_id"] == s
            assert f["coords"].attrs["name"] == s
            assert float(f["coords"].attrs["target_mpp"]) == a["target_mpp"]
            np.testing.assert_allclose(f["coords"].attrs["downsample"], a["downsample"])
        assert feats.dtype == np.float32 and feats.shape == (a["n_tiles"], DIM)
        np.testing.assert_array_equal(feats, values[(p, s)])  # row i: tile i
        assert coords.shape == (a["n_tiles"], 2) and np.issubdtype(coords.dtype, np.integer)
        np.testing.assert_array_equal(coords, st.coords(p, s))  # level-0 (x, y)
        # CLAM reads patch_size px at patch_level: the tile's footprint there (tiles here are 64 px
        # at 1 µm/px resampled from 0.5 µm/px level 0, so 128 px), the stored side is tile_size
        assert int(patch_level) == a["level"]
        assert int(patch_size) == round(a["footprint_px"][0] / a["downsample"][0])
        assert int(f_tile_size) == a["tile_size"]
        assert int(size0) == round(a["footprint_px"][0])

        bag = torch.load(out / "pt_files" / f"{s}.pt", weights_only=True)  # CLAM's default data path
        assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32
        np.testing.assert_array_equal(bag.numpy(), values[(p, s)])

    rows = _read_csv(out / "dataset.csv")
    assert list(rows[0])[:3] == ["case_id", "slide_id", "label"]
    assert [(r["case_id"], r["slide_id"]) for r in rows] == slides[:-1]
    for r in rows:
        assert r["label"] == str(st.patient_attrs(r["case_id"])["label"]) and r["label"]
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["h5_files", "pt_files", "dataset.csv"] + [f"{s}.h5" for _, s in slides[:-1]]
        + [f"{s}.pt" for _, s in slides[:-1]])  # no temporary files left


def test_rerun_overwrites_and_drops_slides_whose_features_are_gone(exported_store, tmp_path):
    store, slides, _ = exported_store
    out = tmp_path / "mil"
    assert export_mil(store, "f", "clam-h5", out).exit_code == 1
    # the missing slide gets features, the first slide new ones, the second loses its features
    last = _put_features(store, *slides[-1], "f", seed=7)
    first = _put_features(store, *slides[0], "f", seed=8)
    p1, s1 = slides[1]
    shutil.rmtree(store / "patients" / p1 / "slides" / s1 / "features" / "f")
    stray = out / "h5_files" / f".hlss-tmp-dead-{slides[0][1]}.h5.tmp"  # left by a killed run
    stray.write_bytes(b"junk")

    report = export_mil(store, "f", "clam-h5", out)
    assert [k[:2] for k in report.skipped] == [(p1, s1)]
    assert not (out / "h5_files" / f"{s1}.h5").exists() and not stray.exists()
    with h5py.File(out / "h5_files" / f"{slides[0][1]}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], first)
    with h5py.File(out / "h5_files" / f"{slides[-1][1]}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], last)
    assert [r["slide_id"] for r in _read_csv(out / "dataset.csv")] == [s for p, s in slides if s != s1]
    assert not (out / "pt_files").exists()


def test_real_extracted_features_export(train_store, tmp_path):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    store = _copy(train_store, tmp_path, patients=1)
    assert extract_features(store, [timm_encoder("test_resnet", name="r")], batch_size=32, device="cpu").exit_code == 0
    report = export_mil(store, "r", "pt", tmp_path / "mil")
    assert report.exit_code == 0 and report.written == _slides(store)
    st = SlideStore(store)
    for p, s in report.written:
        bag = torch.load(tmp_path / "mil" / "pt_files" / f"{s}.pt", weights_only=True)
        np.testing.assert_array_equal(bag.numpy(), st.features(p, s, "r")[:].astype(np.float32))


def test_unknown_feature_name_is_a_clear_error(exported_store, tmp_path):
    store, _, _ = exported_store
    with pytest.raises(ExportError) as e:
        export_mil(store, "nope", "clam-h5", tmp_path / "mil")
    msg = str(e.value)
    assert str(store) in msg and "'nope'" in msg and "f" in msg.split("feature names in the store:")[1]
    assert not (tmp_path / "mil").exists()  # nothing written
    with pytest.raises(ExportError, match="unknown format"):
        export_mil(store, "f", "npz", tmp_path / "mil")


def _parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    resolve_store(args)
    return args


def test_cli_entry(exported_store, tmp_path, capsys):
    store, slides, _ = exported_store
    out = tmp_path / "mil"
    args = _parse(["export-mil", "--store", str(store), "--features", "f", "--format", "pt", "--out", str(out)])
    assert args.func is commands.export_mil and args.format == "pt"
    assert args.func(args) == 1  # one slide skipped
    text = capsys.readouterr().out
    assert f"SKIPPED {slides[-1][0]}/{slides[-1][1]}" in text and f"{len(slides) - 1} slides" in text
    assert sorted(p.stem for p in (out / "pt_files").iterdir()) == sorted(s for _, s in slides[:-1])
    assert _parse(["export-mil", "--store", "s", "--features", "f", "--out", "o"]).format == "clam-h5"

    bad = ["export-mil", "--store", str(store), "--features", "nope", "--out", str(out)]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlss export-mil: error: ") and "'nope'" in err and str(store) in err
    missing = ["export-mil", "--store", str(tmp_path / "absent.zarr"), "--features", "f", "--out", str(out)]
    assert main(missing) == 2 and "no such store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["export-mil", "--store", str(store), "--features", "f", "--format", "npz", "--out", str(out)])

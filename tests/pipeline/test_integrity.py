"""Fault injection: damaged chunks and metadata in a real store, as each store-walking command sees them.

Every case damages one thing in a copy of a small tiled store (with features), runs the command a
user would, and asserts what they see (the message names patient, slide, array and file; exit 1,
no traceback), that the other slides were still processed, and that nothing else in the store
changed (tests/store_snapshot.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hlss.cli import main
from pipeline.store import SlideStore, StoreDamageError, has_checksums
from store_snapshot import assert_unchanged, snapshot

# the demo cohort of the base store (seed 3): patient -> slides; split: P1 test, P2 and P3 train
P1, P2, P3 = "TCGA-HL-0001", "TCGA-HL-0002", "TCGA-HL-0003"
S1 = f"{P1}-01Z-00-DX1"
S2A, S2B = f"{P2}-01Z-00-DX1", f"{P2}-01Z-00-DX2"
S3A, S3B = f"{P3}-01Z-00-DX1", f"{P3}-01Z-00-DX2"
ALL = [(P1, S1), (P2, S2A), (P2, S2B), (P3, S3A), (P3, S3B)]


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    """5 slides of 3 patients, 64 px tiles, features ``f`` (timm test_resnet) on every slide."""
    from pipeline.config import TilingParams
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features
    from pipeline.runner import tile_cohort
    from pipeline.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("integrity")
    manifest = make_demo_cohort(out / "slides", n_patients=3, slides_per_patient=(1, 2), n_classes=2,
                                width=768, height=768, seed=3)
    store = out / "store.zarr"
    assert tile_cohort(manifest, store, TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=8)).exit_code == 0
    assert extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=32, device="cpu").exit_code == 0
    assert sorted((r.patient_id, r.slide_id) for r in SlideStore(store).records()) == ALL
    return store


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    """A private copy of the base store to damage."""
    copy = tmp_path / "store.zarr"
    shutil.copytree(base_store, copy)
    return copy


def slide_dir(store: Path, patient: str, slide: str) -> Path:
    return store / "patients" / patient / "slides" / slide


def flip(path: Path, offset: int = 40) -> None:
    """Flip every bit of one byte of a file (bit rot)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def names_damage(text: str, patient: str, slide: str | None, array: str | None, file: Path) -> bool:
    """Whether a message names the patient, slide, array and file of a damage."""
    return (f"patient {patient}" in text and (slide is None or f"slide {slide}" in text)
            and (array is None or f"array {array!r}" in text) and str(file) in text)


# -- integrity on every byte -------------------------------------------------------------------------


def test_every_array_of_a_new_store_carries_checksums(base_store):
    root = zarr.open_group(base_store, mode="r")
    arrays = [a for _, a in root.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert len(arrays) >= 5 * 10 and all(has_checksums(a) for a in arrays)
    assert SlideStore(base_store).info["schema_version"] == 2
    tiles = json.loads((slide_dir(base_store, P1, S1) / "tiles" / "zarr.json").read_text())["codecs"][0]
    # JPEG tiles: crc32c after the hlss.jpeg serializer on every inner chunk; the shard index keeps its own
    assert [c["name"] for c in tiles["configuration"]["codecs"]] == ["hlss.jpeg", "crc32c"]
    assert [c["name"] for c in tiles["configuration"]["index_codecs"]] == ["bytes", "crc32c"]


def test_flipped_byte_in_a_tile_is_a_named_read_error_and_extract_goes_on(store, capsys):
    shard = slide_dir(store, P1, S1) / "tiles" / "c" / "0" / "0" / "0" / "0"
    flip(shard, 100)  # inside the first tile's JPEG bytes
    with pytest.raises(StoreDamageError) as err:
        SlideStore(store).tiles(P1, S1)[0:4]
    e = err.value
    assert (e.patient_id, e.slide_id, e.array, Path(e.path)) == (P1, S1, "tiles", shard)
    assert "chunk (0, 0, 0, 0)" in str(e) and "checksum mismatch (crc32c)" in str(e)
    assert SlideStore(store).tiles(P1, S1)[5].shape == (64, 64, 3)  # the rest of the shard still reads

    before = snapshot(store)
    rc = main(["extract", "--store", str(store), "--random-init", "--encoder", "timm:test_resnet", "--name", "g", "--device", "cpu",
               "--batch-size", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "4 slides extracted" in out and "1 failed" in out
    line = next(x for x in out.splitlines() if "FAILED" in x)
    assert names_damage(line, P1, S1, "tiles", shard) and "Traceback" not in out
    st = SlideStore(store)
    assert all("g" in st.feature_names(p, s) for p, s in ALL if (p, s) != (P1, S1))
    assert "g" not in st.feature_names(P1, S1)
    assert_unchanged(before, snapshot(store), allow=tuple(f"patients/{p}/slides/{s}/features/g/" for p, s in ALL
                                                          if (p, s) != (P1, S1)))


def test_flipped_byte_in_coords_export_mil_skips_that_slide_only(store, tmp_path, capsys):
    chunk = slide_dir(store, P2, S2B) / "coords" / "c" / "0" / "0"
    flip(chunk, 12)
    before = snapshot(store)
    rc = main(["export-mil", "--store", str(store), "--features", "f", "--out", str(tmp_path / "mil")])
    out = capsys.readouterr().out
    assert rc == 1
    skipped = [x for x in out.splitlines() if "SKIPPED" in x]
    assert len(skipped) == 1 and names_damage(skipped[0], P2, S2B, "coords", chunk)
    assert sorted(p.stem.split(".")[0] for p in (tmp_path / "mil" / "h5_files").glob("*.h5")) == sorted(
        s for p, s in ALL if s != S2B)  # bags are named by file stem: <slide id>.<uuid> for TCGA names
    assert_unchanged(before, snapshot(store))


def test_flipped_byte_in_a_feature_array_export_and_knn_name_it(store, tmp_path, capsys):
    chunk = slide_dir(store, P3, S3B) / "features" / "f" / "c" / "0" / "0"
    flip(chunk, 30)
    before = snapshot(store)
    rc = main(["export-mil", "--store", str(store), "--features", "f", "--out", str(tmp_path / "mil")])
    out = capsys.readouterr().out
    assert rc == 1 and names_damage(out, P3, S3B, "features/f", chunk)
    assert len(list((tmp_path / "mil" / "h5_files").glob("*.h5"))) == 4

    rc = main(["knn", "--store", str(store), "--features", "f", "--k", "5", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "patient" in captured.out and "DAMAGED (left out)" in captured.out
    assert names_damage(captured.out, P3, S3B, "features/f", chunk)
    assert "hlss verify" in captured.err and "Traceback" not in captured.err
    assert_unchanged(before, snapshot(store))


# -- damaged metadata ---------------------------------------------------------------------------------


def test_truncated_slide_metadata_info_report_and_qc_list_it_and_go_on(store, tmp_path, capsys):
    meta = slide_dir(store, P2, S2A) / "zarr.json"
    truncate(meta)
    before = snapshot(store)

    assert main(["info", str(store)]) == 1
    captured = capsys.readouterr()
    assert "5 slides (4 complete, 0 failed, 1 damaged)" in captured.out
    line = next(x for x in captured.out.splitlines() if x.startswith("  DAMAGED"))
    assert names_damage(line, P2, S2A, None, meta) and "slide metadata is damaged" in line
    assert "not valid JSON" in line and "hlss verify" in captured.err

    assert main(["report", str(store), "--out", str(tmp_path / "r.html")]) == 1
    captured = capsys.readouterr()
    html = (tmp_path / "r.html").read_text()
    assert names_damage(captured.err, P2, S2A, None, meta)
    assert html.count('data-source="qc"') == 4 and "4 complete, 0 failed, 1 damaged" in html

    assert main(["qc", str(store), "--out", str(tmp_path / "qc")]) == 1
    assert "wrote 4 QC pictures of 5 slides" in capsys.readouterr().out
    assert len(list((tmp_path / "qc").rglob("*.png"))) == 4
    assert_unchanged(before, snapshot(store))


def test_hlss_info_on_a_damaged_store_exits_1_without_traceback(store):
    (slide_dir(store, P3, S3A) / "zarr.json").write_text('{"attributes": {"status": "comp')
    proc = subprocess.run([sys.executable, "-m", "hlss", "info", str(store)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and f"DAMAGED {S3A}: patient {P3}, slide {S3A}" in proc.stdout
    assert f"{S3B}" in proc.stdout


def test_invalid_array_metadata_report_marks_the_slide_and_verify_names_the_array(store, tmp_path, capsys):
    meta = slide_dir(store, P1, S1) / "tissue" / "zarr.json"
    meta.write_text("{not json")
    before = snapshot(store)
    assert main(["report", str(store), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert names_damage(err, P1, S1, "tissue", meta)
    assert 'data-source="qc"' in (tmp_path / "r.html").read_text()
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    damaged = [x for x in out.splitlines() if x.startswith("  DAMAGED")]
    assert len(damaged) == 1 and names_damage(damaged[0], P1, S1, "tissue", meta)
    assert_unchanged(before, snapshot(store))


def test_invalid_patient_metadata_damages_its_slides_only(store, capsys, caplog):
    from hlss_model.data import CohortIndex

    meta = store / "patients" / P2 / "zarr.json"
    meta.write_text("[")
    before = snapshot(store)
    assert main(["info", str(store)]) == 1
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("  DAMAGED")]
    assert len(lines) == 2 and all(names_damage(x, P2, None, None, meta) for x in lines)
    assert all("patient metadata is damaged" in x for x in lines)
    with caplog.at_level(logging.WARNING):
        index = CohortIndex.from_store(store)
    assert index.patient_ids == (P1, P3)
    assert sum("left out of training" in r.getMessage() and str(meta) in r.getMessage() for r in caplog.records) == 2
    assert_unchanged(before, snapshot(store))


# -- training -------------------------------------------------------------------------------------------


def test_training_leaves_a_damaged_slide_out_with_a_warning(store, caplog):
    from hlss_model.data import CohortIndex

    meta = slide_dir(store, P3, S3A) / "tiles" / "zarr.json"
    truncate(meta)
    with caplog.at_level(logging.WARNING):
        index = CohortIndex.from_store(store)
    assert (P3, S3A) not in index.slide_keys and len(index.slide_keys) == 4 and P3 in index.patient_ids
    warning = next(r.getMessage() for r in caplog.records if "left out of training" in r.getMessage())
    assert names_damage(warning, P3, S3A, "tiles", meta)


def test_a_damaged_shard_met_while_training_stops_with_a_named_error(store):
    from hlss_model.augment import AugmentParams
    from hlss_model.data import CohortIndex, PatientDataset, TrainingDataError

    index = CohortIndex.from_store(store)
    shards = sorted((slide_dir(store, P1, S1) / "tiles" / "c").rglob("0"))
    for shard in (s for s in shards if s.is_file()):
        flip(shard, shard.stat().st_size - 2)  # the shard index: every tile of the shard is unreadable
    ds = PatientDataset(index, slides=1, tiles=2, views=1, augment=AugmentParams())
    for encoded in (True, False):  # the stored bytes sent to the GPU are checked the same way
        with pytest.raises(TrainingDataError) as err:
            PatientDataset(index, slides=1, tiles=2, views=1, augment=AugmentParams(), encoded=encoded)[
                (index.patient_ids.index(P1), 7)]
    assert f"patient {P1}, slide {S1}: array 'tiles' is damaged" in str(err.value)
    assert "training stopped" in str(err.value)
    assert ds[(index.patient_ids.index(P3), 7)]["images"].shape[:3] == (1, 2, 1)  # other patients still draw
    # from a DataLoader worker the error comes back as one message, not the worker's traceback
    wrapped = TrainingDataError(f"Caught TrainingDataError in DataLoader worker process 0.\nOriginal Traceback "
                                f"(most recent call last):\n  File \"x.py\"\nhlss_model.data.TrainingDataError: "
                                f"{err.value}\n")
    assert str(wrapped) == str(err.value)


# -- schema 1 ---------------------------------------------------------------------------------------------


def _write_schema_1_store(path: Path, slides: list[Path], monkeypatch) -> None:
    """A store written the way schema 1 did: arrays without crc32c (zarr's default codecs), schema_version 1."""
    import pipeline.tiler as tiler
    from pipeline.cohort import SlideSpec
    from pipeline.config import TilingParams
    from pipeline.store import StoreWriter

    def v1_create_array(group, name, *, attrs=None, chunks=None, **kw):
        arr = group.create_array(name, chunks=chunks or "auto", **kw)
        if attrs:
            arr.update_attributes(attrs)
        return arr

    writer = StoreWriter(path)
    root = path / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["hlss"]["schema_version"] = 1
    root.write_text(json.dumps(doc))
    with monkeypatch.context() as m:
        m.setattr(tiler, "create_array", v1_create_array)
        for i, slide in enumerate(slides):
            spec = SlideSpec(slide, f"P{i}", f"S{i}", "a" if i % 2 else "b", "train")
            assert tiler.tile_slide(spec, writer, TilingParams(target_mpp=1.0, tile_size=64)).status == "complete"


def test_a_schema_1_store_still_reads_verifies_and_is_written_to(make_slide, tmp_path, monkeypatch, capsys):
    from pipeline.cohort import SlideSpec
    from pipeline.config import TilingParams
    from pipeline.store import StoreWriter
    from pipeline.tiler import tile_slide

    slides = [make_slide(f"s{i}.svs", 512, 512, seed=i) for i in range(3)]
    store = tmp_path / "v1.zarr"
    _write_schema_1_store(store, slides[:2], monkeypatch)
    st = SlideStore(store)
    assert st.info["schema_version"] == 1 and not has_checksums(st.tiles("P0", "S0").array)
    assert st.tiles("P0", "S0")[0].shape == (64, 64, 3) and len(st.coords("P1", "S1")) == st.tiles("P1", "S1").shape[0]
    assert main(["verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 intact, 0 damaged" in out and "carry no checksums" in out

    # written to: a new slide gets checksums, the store keeps its label 1, both kinds read
    spec = SlideSpec(slides[2], "P2", "S2", "a", "test")
    assert tile_slide(spec, StoreWriter(store), TilingParams(target_mpp=1.0, tile_size=64)).status == "complete"
    st = SlideStore(store)
    assert st.info["schema_version"] == 1 and has_checksums(st.tiles("P2", "S2").array)
    assert main(["verify", str(store)]) == 0
    assert "3 intact" in capsys.readouterr().out

    # a damaged chunk of a schema-1 array is still named when its codec notices (zstd here)
    chunk = slide_dir(store, "P1", "S1") / "coords" / "c" / "0" / "0"
    flip(chunk, 8)
    with pytest.raises(StoreDamageError) as err:
        SlideStore(store).coords("P1", "S1")
    assert names_damage(str(err.value), "P1", "S1", "coords", chunk)
    assert np.asarray(SlideStore(store).coords("P0", "S0")).shape[1] == 2


def test_a_damaged_evaluation_record_is_left_out_with_a_warning(store, tmp_path, capsys, caplog):
    from pipeline.store import StoreWriter

    StoreWriter(store).write_evaluation("knn-a", {"levels": {}})
    StoreWriter(store).write_evaluation("knn-b", {"levels": {}})
    meta = store / "evaluations" / "knn-b" / "zarr.json"
    truncate(meta)
    before = snapshot(store)
    with caplog.at_level(logging.WARNING):
        assert list(SlideStore(store).evaluations()) == ["knn-a"]
    assert any("knn-b" in r.getMessage() and str(meta) in r.getMessage() for r in caplog.records)
    assert main(["report", str(store), "--out", str(tmp_path / "r.html")]) == 0
    assert_unchanged(before, snapshot(store))


@pytest.mark.slow
def test_hlss_train_stops_on_a_damaged_chunk_with_one_message(train_store, tiny_text_model, tmp_path, capsys):
    """Through a DataLoader worker process (num_workers 1): exit 1 and one line naming the damage."""
    import yaml

    store = tmp_path / "store.zarr"
    shutil.copytree(train_store, store)
    shards = [f for f in store.glob("patients/*/slides/*/tiles/c/**/*") if f.is_file()]
    for shard in shards:
        flip(shard, shard.stat().st_size - 2)  # every shard index: no tile reads
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "method": "hlss", "steps": 2, "seed": 7, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
        "channels_last": False,
        "sampler": {"batch_size": 4, "slides_per_patient": 1, "tiles_per_slide": 2, "views_per_tile": 2,
                    "num_workers": 1},
        "model": {"backbone": "resnet10t", "text_encoder": str(tiny_text_model)},
        "augment": {"out_size": 32}}))
    before = snapshot(store)
    rc = main(["train", "--store", str(store), "--out", str(tmp_path / "run"), "--config", str(config), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith("hlss train: error:"))
    assert "array 'tiles' is damaged" in line and "training stopped" in line
    assert any(str(s) in line for s in shards) and "Traceback" not in err and "DataLoader worker" not in err
    assert_unchanged(before, snapshot(store))

"""``hlss verify STORE [--repair]``: every chunk read, damage named per slide/array/file, repair from the source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hlss.cli import main
from pipeline.config import TilingParams
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore
from pipeline.synthetic import make_demo_cohort
from pipeline.verify import verify_store
from store_snapshot import assert_unchanged, snapshot
from test_integrity import ALL, P1, P2, P3, S1, S2A, S2B, S3A, S3B, flip, names_damage, slide_dir

PARAMS = TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with ``slides/`` (the demo cohort of tests/pipeline/test_integrity.py) and ``store.zarr`` tiled from it."""
    out = tmp_path_factory.mktemp("verify")
    manifest = make_demo_cohort(out / "slides", n_patients=3, slides_per_patient=(1, 2), n_classes=2,
                                width=768, height=768, seed=3)
    assert tile_cohort(manifest, out / "store.zarr", PARAMS).exit_code == 0
    return out


@pytest.fixture
def store(base, tmp_path) -> Path:
    """A copy of the base store (its sources are the base's slides: read only here)."""
    shutil.copytree(base / "store.zarr", tmp_path / "store.zarr")
    return tmp_path / "store.zarr"


def damaged_lines(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("  DAMAGED")]


def test_an_intact_store_verifies_clean_given_either_way(store, capsys):
    before = snapshot(store)
    assert main(["verify", str(store)]) == 0
    assert "5 intact, 0 damaged" in capsys.readouterr().out
    assert main(["verify", "--store", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_slides"] == 5 and doc["n_damaged"] == 0 and all(not s["unchecked"] for s in doc["slides"])
    assert main(["verify"]) == 2 and "give the store" in capsys.readouterr().err
    assert main(["verify", str(store), "--store", str(store.parent / "other.zarr")]) == 2
    assert "two stores given" in capsys.readouterr().err
    assert_unchanged(before, snapshot(store))


def test_a_missing_chunk_file_is_named(store, capsys):
    shard = slide_dir(store, P3, S3A) / "tiles" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()  # zarr itself would read these tiles back as black
    before = snapshot(store)
    assert main(["verify", str(store)]) == 1
    lines = damaged_lines(capsys.readouterr().out)
    assert len(lines) == 1 and names_damage(lines[0], P3, S3A, "tiles", shard)
    assert "chunk file c/1/0/0/0 is missing" in lines[0]
    assert_unchanged(before, snapshot(store))


def test_a_flipped_shard_index_and_a_flipped_tile_are_named_per_chunk(store, capsys):
    index_shard = slide_dir(store, P1, S1) / "tiles" / "c" / "0" / "0" / "0" / "0"
    flip(index_shard, index_shard.stat().st_size - 3)  # the crc32c-checked shard index
    tile_shard = slide_dir(store, P2, S2B) / "tiles" / "c" / "1" / "0" / "0" / "0"
    flip(tile_shard, 50)  # the first tile of the second shard (tile 8)
    before = snapshot(store)
    report = verify_store(store)
    assert report.exit_code == 1 and sorted((c.patient_id, c.slide_id) for c in report.damaged) == [(P1, S1), (P2, S2B)]
    by_slide = {c.slide_id: c.damage for c in report.damaged}
    assert all(e.array == "tiles" and Path(e.path) == index_shard for e in by_slide[S1])
    assert len(by_slide[S1]) == 5  # every tile of the shard fails; five are named
    [tile] = by_slide[S2B]
    assert Path(tile.path) == tile_shard and "chunk (8, 0, 0, 0)" in tile.problem and "crc32c" in tile.problem
    assert_unchanged(before, snapshot(store))


def test_shape_disagreeing_with_n_tiles_is_damage(store, capsys):
    meta = slide_dir(store, P2, S2A) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["n_tiles"] += 1
    meta.write_text(json.dumps(doc))
    assert main(["verify", str(store)]) == 1
    lines = damaged_lines(capsys.readouterr().out)
    assert {x.split("array ")[1].split(" ")[0] for x in lines} == {"'tiles'", "'coords'", "'tissue'", "'tile_qc/focus'",
                                                                   "'tile_qc/pen'", "'tile_qc/brightness'",
                                                                   "'tile_qc/saturation'"}
    assert all(f"slide {S2A}" in x and "but the slide has n_tiles" in x for x in lines)


def test_repair_retiles_from_an_unchanged_source_only_and_names_what_to_re_extract(base, tmp_path, capsys):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    slides = tmp_path / "slides"
    shutil.copytree(base / "slides", slides)
    store = tmp_path / "store.zarr"
    assert tile_cohort(slides / "manifest.csv", store, PARAMS).exit_code == 0
    assert extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=32, device="cpu").exit_code == 0
    st = SlideStore(store)
    src = {s: Path(st.slide_attrs(p, s)["source"]["path"]) for p, s in ALL}
    tiles_before = st.tiles(P1, S1)[:]
    # S1: a flipped tile, source intact; S2A: flipped coords, source gone; S3B: flipped tissue, source re-scanned
    flip(slide_dir(store, P1, S1) / "tiles" / "c" / "0" / "0" / "0" / "0", 60)
    flip(slide_dir(store, P2, S2A) / "coords" / "c" / "0" / "0", 12)
    flip(slide_dir(store, P3, S3B) / "tissue" / "c" / "0", 6)
    src[S2A].unlink()
    data = bytearray(src[S3B].read_bytes())
    data[len(data) // 2] ^= 0xFF
    src[S3B].write_bytes(bytes(data))
    before = snapshot(store)

    assert main(["verify", str(store), "--repair"]) == 1  # two slides could not be repaired
    out = capsys.readouterr().out
    assert len(damaged_lines(out)) == 3
    repaired = next(x for x in out.splitlines() if x.startswith("  REPAIRED"))
    assert f"slide {S1}" in repaired and str(src[S1]) in repaired and "re-extract features/f" in repaired
    not_repaired = [x for x in out.splitlines() if x.startswith("  NOT REPAIRED")]
    assert any(f"slide {S2A}" in x and "is missing; left as is" in x for x in not_repaired)
    assert any(f"slide {S3B}" in x and "changed since it was tiled" in x for x in not_repaired)
    # only the repaired slide changed; it is whole again, its features named above are gone with the old version
    assert_unchanged(before, snapshot(store), allow=(f"patients/{P1}/slides/{S1}/",))
    st = SlideStore(store)
    assert (st.tiles(P1, S1)[:] == tiles_before).all() and st.feature_names(P1, S1) == []
    assert main(["verify", str(store)]) == 1
    lines = damaged_lines(capsys.readouterr().out)
    assert len(lines) == 2 and not any(S1 in x for x in lines)

"""The byte-range tile reader (pipeline.tile_reader): the same tiles as zarr reads, for single tiles,
runs and random batches, on a folder and on S3 (moto); neighbours coalesced into one read; damage
still a StoreDamageError; unsharded arrays and missing chunks read through zarr."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import tile_reader
from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.runner import tile_cohort
from pipeline.store import CheckedArray, SlideStore, StoreDamageError, create_array
from pipeline.tile_reader import TileArray, TileReader
from store_snapshot import assert_unchanged, snapshot

import test_objstore

s3_endpoint = test_objstore.s3_endpoint  # the moto server fixture

PARAMS = TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=16)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from pipeline.synthetic import write_he_slide

    return write_he_slide(tmp_path_factory.mktemp("reader") / "S1.svs", 1280, 1024, mpp=0.5, seed=5)


def _store(slide: Path, store, compression: str = "jpeg") -> SlideStore:
    params = TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=16,
                          compression=TileCompression.from_name(compression))
    assert tile_cohort(slide, store, params).exit_code == 0
    return SlideStore(store)


def _only(st: SlideStore) -> TileArray:
    rec = next(iter(st.records("complete")))
    tiles = st.tiles(rec.patient_id, rec.slide_id)
    assert isinstance(tiles, TileArray) and tiles._reader.layout is not None
    return tiles


def _selections(n: int) -> list:
    rng = np.random.default_rng(0)
    return [0, 17, n - 1, -1, slice(0, n), slice(14, 35), slice(n - 3, None), slice(5, 5),
            ("rows", rng.integers(0, n, 40)), ("rows", np.array([n - 1, 0, 0, 16, 15])), ("rows", np.array([], int))]


def _check_all(tiles: TileArray) -> None:
    ref = tiles.array[...]
    rows = np.random.default_rng(1).integers(0, ref.shape[0], 50)
    np.testing.assert_array_equal(tiles._reader.read(rows), ref[rows])  # the reader itself, no fallback
    for i in (0, 16, ref.shape[0] - 1):
        np.testing.assert_array_equal(tiles._reader.tile(i), ref[i])
    for sel in _selections(ref.shape[0]):
        if isinstance(sel, tuple):
            got = tiles.get_orthogonal_selection((sel[1],))
            np.testing.assert_array_equal(got, ref[sel[1]])
        else:
            np.testing.assert_array_equal(tiles[sel], ref[sel])


@pytest.mark.parametrize("compression", ["jpeg", "lossless"])
def test_reads_equal_zarr(tmp_path, slide, compression):
    tiles = _only(_store(slide, tmp_path / "s.zarr", compression))
    assert tiles.shape[0] > 32 and tiles.shape[0] % 16, "want several shards, the last partly filled"
    _check_all(tiles)


def test_neighbours_are_one_read_and_indexes_are_cached(tmp_path, slide, monkeypatch):
    tiles = _only(_store(slide, tmp_path / "s.zarr"))
    reads = []
    real = tile_reader._pread
    monkeypatch.setattr(tile_reader, "_pread", lambda *a: reads.append(a[1:]) or real(*a))
    tiles[2:12]  # one shard: its index, then one range
    assert len(reads) == 2 and reads[0][0] < 0
    reads.clear()
    tiles.get_orthogonal_selection((np.array([3, 9, 30]),))  # shard 0 cached; shard 1's index, 2 ranges
    assert len(reads) == 3
    reads.clear()
    monkeypatch.setattr(tiles._reader, "gap", 0)
    tiles.get_orthogonal_selection((np.array([3, 5]),))  # a tile between them: not merged without a gap
    assert len(reads) == 2


def test_object_store_reads_by_ranged_gets(tmp_path, slide, s3_endpoint, monkeypatch):
    url = f"s3://{test_objstore._new_bucket(s3_endpoint)}/store"
    tiles = _only(_store(slide, url))
    _check_all(tiles)
    calls = []
    real = TileReader._store_get
    monkeypatch.setattr(TileReader, "_store_get", lambda self, req: calls.append(req) or real(self, req))
    fresh = _only(SlideStore(url))
    fresh.get_orthogonal_selection((np.array([1, 2, 3, 20]),))
    assert [len(c) for c in calls] == [2, 2]  # two index suffixes, then one range per shard
    assert type(calls[1][0][1]).__name__ == "RangeByteRequest"


def test_damage_is_named_as_zarr_names_it(tmp_path, slide):
    store = tmp_path / "s.zarr"
    tiles = _only(_store(slide, store))
    shard = next(Path(store).rglob("tiles/c/1/0/0/0"))
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(store)
    for read in (lambda t: t[16], lambda t: t[10:20], lambda t: t.get_orthogonal_selection((np.array([16]),))):
        with pytest.raises(StoreDamageError, match=r"chunk \(16, 0, 0, 0\): checksum mismatch") as e:
            read(_only(SlideStore(store)))
        assert e.value.path.endswith("tiles/c/1/0/0/0")
    np.testing.assert_array_equal(tiles[0:16], tiles.array[0:16])  # the other shard still reads
    assert_unchanged(before, snapshot(store))


def test_unsharded_arrays_and_missing_chunks_read_through_zarr(tmp_path):
    group = zarr.open_group(tmp_path, mode="w")
    data = np.random.default_rng(1).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    plain = create_array(group, "plain", shape=data.shape, dtype="uint8", chunks=(1, 16, 16, 3))
    plain[...] = data
    # a schema-1 store: chunks equal to the fill value were not written
    old = group.create_array("old", shape=data.shape, dtype="uint8", chunks=(1, 16, 16, 3), shards=(4, 16, 16, 3),
                             fill_value=0, config={"write_empty_chunks": False})
    holey = data.copy()
    holey[2] = 0
    old[...] = holey
    for arr, want in ((plain, data), (old, holey)):
        tiles = TileArray(CheckedArray(arr, None, "P", "S", "tiles"))
        np.testing.assert_array_equal(tiles[0:5], want)
        np.testing.assert_array_equal(tiles.get_orthogonal_selection((np.array([4, 2]),)), want[[4, 2]])
    assert TileReader(plain).layout is None
    with pytest.raises(tile_reader.MissingChunk):
        TileReader(old).read(np.array([2]))


def test_pickles_without_its_cache(tmp_path, slide):
    tiles = _only(_store(slide, tmp_path / "s.zarr"))
    tiles[0]
    back = pickle.loads(pickle.dumps(tiles))
    assert back._reader._indexes == {}
    np.testing.assert_array_equal(back[3:5], tiles.array[3:5])

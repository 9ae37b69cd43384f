"""Whole-shard writes (pipeline._shards): the bytes zarr itself writes, read by plain zarr, SlideStore
and ``hlss verify``, on a folder and on an object store (moto S3 on loopback); damage still detected."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import _shards
from pipeline._shards import ShardLayout, write_shard
from pipeline.codecs import TileCompression
from pipeline.config import TilingParams
from pipeline.cohort import SlideSpec
from pipeline.store import SlideStore, StoreDamageError, StoreWriter, create_array
from pipeline.tiler import tile_slide
from store_snapshot import assert_unchanged, snapshot

import test_objstore

s3_endpoint = test_objstore.s3_endpoint  # the moto server fixture

T = 32
COMPRESSIONS = ("jpeg", "jpeg:80:420", "lossless", "lossless:zstd3", "none")


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB tiles (so JPEG has something image-like to code)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, T // 8, T // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(base.repeat(8, axis=1).repeat(8, axis=2))


def _pair(root: Path, compression: str, n: int, shard: int, index_location: str = "end"):
    """The same array twice: ``ours`` written shard by shard here, ``theirs`` by zarr."""
    group = zarr.open_group(root, mode="w")
    arrays = []
    for name in ("ours", "theirs"):
        kw = TileCompression.from_name(compression).codecs_for()
        if index_location == "end":
            arrays.append(create_array(group, name, shape=(n, T, T, 3), dtype="uint8", chunks=(1, T, T, 3),
                                       shards=(shard, T, T, 3), fill_value=0, **kw))
        else:  # a sharded array made elsewhere, index first: zarr's own codec objects
            sharding = zarr.codecs.ShardingCodec(chunk_shape=(1, T, T, 3), codecs=[kw["serializer"],
                                                 zarr.codecs.Crc32cCodec()], index_location=index_location)
            arrays.append(group.create_array(name, shape=(n, T, T, 3), dtype="uint8", chunks=(shard, T, T, 3),
                                             serializer=sharding, compressors=None, fill_value=0))
    return arrays


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_shards_are_the_bytes_zarr_writes(tmp_path, compression):
    """3 shards of 8 tiles, the last holding 4: every shard object equals zarr's, byte for byte."""
    n, shard = 20, 8
    ours, theirs = _pair(tmp_path, compression, n, shard)
    tiles = _tiles(n)
    layout = ShardLayout.of(ours)
    assert layout is not None and layout.n_shards == 3 and layout.tiles_in(2) == 4
    # threads explicitly: codec_pool() follows zarr's global threading.max_workers, which tests that
    # tile in this process (tile_one, as a worker does) may have set to 1 (then it is None: inline)
    with ThreadPoolExecutor(2, thread_name_prefix="tile-codec") as pool:
        for s in range(layout.n_shards):
            write_shard(layout, s, tiles[s * shard : (s + 1) * shard], pool)
    for s in range(3):
        theirs[s * shard : (s + 1) * shard] = tiles[s * shard : (s + 1) * shard]
    for s in range(3):
        key = layout.shard_key(s)
        assert (tmp_path / "ours" / key).read_bytes() == (tmp_path / "theirs" / key).read_bytes(), key
    back = zarr.open_group(tmp_path, mode="r")["ours"][...]
    if TileCompression.from_name(compression).lossy:
        np.testing.assert_array_equal(back, zarr.open_group(tmp_path, mode="r")["theirs"][...])
    else:
        np.testing.assert_array_equal(back, tiles)


def test_index_at_the_start_is_followed(tmp_path):
    """An array whose sharding codec puts the index first: same bytes as zarr's, offsets shifted."""
    ours, theirs = _pair(tmp_path, "none", 6, 4, index_location="start")
    tiles = _tiles(6, seed=1)
    layout = ShardLayout.of(ours)
    assert layout.index_at_start
    write_shard(layout, 0, tiles[:4])
    write_shard(layout, 1, tiles[4:])
    theirs[:4], theirs[4:] = tiles[:4], tiles[4:]
    for s in range(2):
        key = layout.shard_key(s)
        assert (tmp_path / "ours" / key).read_bytes() == (tmp_path / "theirs" / key).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours", mode="r")[...], tiles)


def test_unhandled_layouts_go_through_zarr(tmp_path):
    group = zarr.open_group(tmp_path, mode="w")
    plain = create_array(group, "plain", shape=(4, T, T, 3), dtype="uint8", chunks=(1, T, T, 3))
    split = create_array(group, "split", shape=(4, T, T, 3), dtype="uint8", chunks=(1, T // 2, T, 3),
                         shards=(2, T, T, 3))
    assert ShardLayout.of(plain) is None and ShardLayout.of(split) is None


def test_write_shard_refuses_a_short_shard(tmp_path):
    ours, _ = _pair(tmp_path, "none", 20, 8)
    with pytest.raises(ValueError, match="shard 1 holds 8 tiles, got 3"):
        write_shard(ShardLayout.of(ours), 1, _tiles(3))
    with pytest.raises(ValueError, match="shard 1 holds 8 tiles, got 7"):
        write_shard(ShardLayout.of(ours), 1, [_tiles(3), _tiles(4)])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_shard_from_block_pieces_is_the_shard_of_their_concatenation(tmp_path, compression):
    """Pieces of blocks (views, as the tiler hands them over, one of a single tile, one empty) encode
    to the bytes of the concatenated array, inline and in a pool, and write the same object."""
    ours, _ = _pair(tmp_path, compression, 20, 8)
    layout = ShardLayout.of(ours)
    blocks = [_tiles(5, seed=2), _tiles(9, seed=3)]
    pieces = [blocks[0][1:], blocks[1][:0], blocks[1][:1], blocks[1][4:7]]
    whole = np.concatenate(pieces)
    assert len(whole) == 8 and not any(p.flags.owndata for p in pieces)
    expected = layout.encode_shard(whole)
    assert layout.encode_shard(pieces) == expected
    with ThreadPoolExecutor(2, thread_name_prefix="tile-codec") as pool:
        assert layout.encode_shard(pieces, pool) == expected
    write_shard(layout, 0, pieces)
    assert (tmp_path / "ours" / layout.shard_key(0)).read_bytes() == expected


# -- the tiler's store path ---------------------------------------------------------------------

PARAMS = TilingParams(target_mpp=1.0, tile_size=64, shard_tiles=16)


def _tile(spec: SlideSpec, store, monkeypatch=None, through_zarr: bool = False) -> None:
    if through_zarr:  # the zarr-written path, as before whole-shard writes
        monkeypatch.setattr("pipeline.tiler.ShardLayout.of", classmethod(lambda cls, a: None))
        monkeypatch.setattr("pipeline.tiler.write_shard", lambda *a: pytest.fail("not the zarr path"))
    result = tile_slide(spec, StoreWriter(store), PARAMS)
    assert result.status == "complete", result.error
    if through_zarr:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def slide_spec(tmp_path_factory) -> SlideSpec:
    from pipeline.synthetic import write_he_slide

    path = write_he_slide(tmp_path_factory.mktemp("shards") / "s.svs", 1280, 1024, mpp=0.5, seed=4)
    return SlideSpec(path=path, patient_id="P1", slide_id="S1")


def _tiles_dir(store: Path) -> Path:
    return store / "patients/P1/slides/S1/tiles"


def test_tiled_store_matches_the_zarr_path_and_verifies(tmp_path, slide_spec, monkeypatch):
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    _tile(slide_spec, ours)
    _tile(slide_spec, theirs, monkeypatch, through_zarr=True)
    a, b = SlideStore(ours).tiles("P1", "S1"), SlideStore(theirs).tiles("P1", "S1")
    n = a.shape[0]
    assert n > 16 and n % 16, f"want a partly filled last shard, got {n} tiles"
    np.testing.assert_array_equal(a[...], b[...])
    np.testing.assert_array_equal(zarr.open_group(ours, mode="r")["patients/P1/slides/S1/tiles"][...], b[...])
    shards = sorted(p.relative_to(_tiles_dir(ours)) for p in (_tiles_dir(ours) / "c").rglob("*") if p.is_file())
    assert len(shards) == -(-n // 16)
    for rel in shards:
        assert (_tiles_dir(ours) / rel).read_bytes() == (_tiles_dir(theirs) / rel).read_bytes(), rel
    done = subprocess.run([sys.executable, "-m", "hlss", "verify", str(ours)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("where", ["chunk", "index"])
def test_a_damaged_shard_byte_is_detected(tmp_path, slide_spec, where):
    store = tmp_path / "store.zarr"
    _tile(slide_spec, store)
    shard = _tiles_dir(store) / "c/1/0/0/0"
    data = bytearray(shard.read_bytes())
    at = 100 if where == "chunk" else len(data) - 20  # inside tile 16, or inside the index
    data[at] ^= 0x5A
    shard.write_bytes(bytes(data))
    before = snapshot(store)
    tiles = SlideStore(store).tiles("P1", "S1")
    with pytest.raises(StoreDamageError, match=r"array 'tiles' is damaged: chunk \(16, 0, 0, 0\): checksum") as e:
        tiles[16]
    assert e.value.path.endswith("tiles/c/1/0/0/0")
    np.testing.assert_array_equal(tiles[0].shape, (64, 64, 3))  # the other shards still read
    done = subprocess.run([sys.executable, "-m", "hlss", "verify", str(store)], capture_output=True, text=True)
    assert done.returncode == 1 and "c/1/0/0/0" in done.stdout + done.stderr, done.stdout + done.stderr
    assert_unchanged(before, snapshot(store))


def test_object_store_gets_one_object_per_shard(tmp_path, slide_spec, s3_endpoint):
    """On S3 (moto): the same shard objects as in a folder, each one PUT, read back by SlideStore."""
    import s3fs

    local, url = tmp_path / "local.zarr", f"s3://{test_objstore._new_bucket(s3_endpoint)}/store"
    _tile(slide_spec, local)
    puts = []
    real = _shards.sync
    _shards_sync = lambda coro: puts.append(1) or real(coro)  # noqa: E731 - count the shard writes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_shards, "sync", _shards_sync)
        _tile(slide_spec, url)
    n = SlideStore(local).tiles("P1", "S1").shape[0]
    assert len(puts) == -(-n // 16)
    np.testing.assert_array_equal(SlideStore(url).tiles("P1", "S1")[...], SlideStore(local).tiles("P1", "S1")[...])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    remote = url[5:] + "/patients/P1/slides/S1/tiles"
    for p in sorted((_tiles_dir(local) / "c").rglob("*")):
        if p.is_file():
            assert fs.cat_file(f"{remote}/{p.relative_to(_tiles_dir(local)).as_posix()}") == p.read_bytes()



def test_the_published_layout_reads_the_tiles(tmp_path, slide_spec):
    """docs/hlss-jpeg.md's stand-alone reader (no zarr) gives zarr's pixels for every tile."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "hlss-jpeg.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    space: dict = {}
    exec(code, space)
    store = tmp_path / "store.zarr"
    _tile(slide_spec, store)
    tiles = zarr.open_group(store, mode="r")["patients/P1/slides/S1/tiles"]
    for i in range(tiles.shape[0]):
        np.testing.assert_array_equal(space["read_tile"](str(_tiles_dir(store)), i, tiles.shards[0]), tiles[i])

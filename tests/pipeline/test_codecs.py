"""Tile compression: the hlss.jpeg zarr 3 codec and TileCompression."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from pipeline.codecs import JPEG_CODEC_NAME, JpegCodec, TileCompression, psnr

REPO = Path(__file__).resolve().parents[2]
SLIDE = REPO / "tests" / "data" / "cmu_small_region.svs"
T = 256


# ---------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------


def smooth_he_tiles(n: int, size: int = T, seed: int = 0) -> np.ndarray:
    """Smooth H&E-like tiles: pink stroma gradients with soft purple nuclei, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    white = np.array([240, 235, 240], np.float32)
    eosin = np.array([225, 140, 190], np.float32)
    hema = np.array([95, 60, 150], np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        field = sum(
            np.sin(rng.uniform(-0.05, 0.05) * xx + rng.uniform(-0.05, 0.05) * yy + rng.uniform(0, 6.3))
            for _ in range(3)
        )
        d = (0.35 + 0.2 * (field - field.min()) / max(float(np.ptp(field)), 1e-6))[..., None]
        img = white * (1 - d) + eosin * d
        for _ in range(20):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(5, 10)
            alpha = np.clip((r - np.hypot(yy - cy, xx - cx)) / 3.0, 0, 1)[..., None] * 0.8
            img = img * (1 - alpha) + hema * alpha
        img += rng.normal(0, 1.0, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def smooth_tiles() -> np.ndarray:
    return smooth_he_tiles(10)


@pytest.fixture(scope="module")
def natural_tiles(smooth_tiles: np.ndarray) -> np.ndarray:
    """Real H&E tiles from the small Aperio slide when present (grid-aligned tissue tiles),
    else random noise on top of the smooth tiles (harder than real tissue)."""
    if SLIDE.exists():
        import tiffslide

        with tiffslide.TiffSlide(str(SLIDE)) as slide:
            region = np.asarray(slide.read_region((0, 0), 0, (4 * T, 3 * T), as_array=True))[..., :3]
        return np.stack(
            [region[y : y + T, x : x + T] for y in range(0, 3 * T, T) for x in range(0, 4 * T, T)]
        ).astype(np.uint8)
    rng = np.random.default_rng(1)
    noisy = smooth_tiles.astype(np.int16) + rng.integers(-40, 41, smooth_tiles.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def stored_bytes(array_dir: Path) -> int:
    return sum(f.stat().st_size for f in (array_dir / "c").rglob("*") if f.is_file())


def random_tiles(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, T, T, 3), dtype=np.uint8)


def make_array(path: Path, compression: TileCompression, n: int, shard: int = 4, store=None):
    group = zarr.open_group(store if store is not None else str(path), mode="w")
    return group.create_array(
        "tiles",
        shape=(n, T, T, 3),
        dtype="uint8",
        chunks=(1, T, T, 3),
        shards=(shard, T, T, 3),
        fill_value=0,
        **compression.codecs_for(),
    )


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "lossless", "lossless:zstd5", "lossless:lz4:bitshuffle"])
def test_lossless_round_trip_is_exact(tmp_path, name, natural_tiles):
    tiles = np.concatenate([natural_tiles[:5], random_tiles(2)])  # 7 tiles: last shard partial
    arr = make_array(tmp_path, TileCompression.from_name(name), len(tiles))
    arr[:] = tiles
    back = zarr.open_array(str(tmp_path / "tiles"), mode="r")
    np.testing.assert_array_equal(back[:], tiles)
    np.testing.assert_array_equal(back[3], tiles[3])


@pytest.mark.parametrize("name", ["jpeg", "jpeg:90:420", "jpeg:90:444"])
def test_jpeg_round_trip_quality_on_smooth_he(tmp_path, name, smooth_tiles):
    comp = TileCompression.from_name(name)
    assert comp.quality == 90
    arr = make_array(tmp_path, comp, len(smooth_tiles))
    arr[:] = smooth_tiles
    back = zarr.open_array(str(tmp_path / "tiles"), mode="r")[:]
    assert back.shape == smooth_tiles.shape and back.dtype == np.uint8
    value = psnr(smooth_tiles, back)
    assert value > 35.0, f"{name}: PSNR {value:.1f} dB"
    assert 0 < stored_bytes(tmp_path / "tiles") < smooth_tiles.nbytes / 5  # JPEG really compresses


def test_jpeg_on_natural_and_random_tiles(tmp_path, natural_tiles):
    tiles = np.concatenate([natural_tiles[:6], random_tiles(1)])
    arr = make_array(tmp_path, TileCompression(kind="jpeg", quality=95, subsampling="444"), len(tiles))
    arr[:] = tiles
    back = zarr.open_array(str(tmp_path / "tiles"), mode="r")[:]
    assert psnr(tiles[:6], back[:6]) > 30.0
    assert 5.0 < psnr(tiles[6], back[6]) < 40.0  # white noise: lossy but decodes to the right shape


def test_jpeg_quality_orders_size(tmp_path, smooth_tiles):
    sizes = []
    for q in (60, 95):
        comp = TileCompression(kind="jpeg", quality=q)
        arr = make_array(tmp_path / str(q), comp, 4)
        arr[:] = smooth_tiles[:4]
        sizes.append(stored_bytes(tmp_path / str(q) / "tiles"))
    assert sizes[0] < sizes[1]


def test_encode_array_gives_libjpeg_turbos_own_bytes(natural_tiles):
    """Encoding into the thread's reused buffer gives the bytes of a plain imagecodecs call, each
    result its own (the next encode does not change it), also for a stream larger than the buffer
    (random pixels at q100: bigger than the raw tile) and in several threads at once."""
    import imagecodecs
    from concurrent.futures import ThreadPoolExecutor

    codec = JpegCodec(quality=100, subsampling="444")
    noise = np.random.default_rng(0).integers(0, 256, (T, T, 3), dtype=np.uint8)
    tiles = [*natural_tiles[:4], noise, natural_tiles[0]]
    want = [imagecodecs.jpeg8_encode(t, level=100, subsampling="444") for t in tiles]
    assert len(want[4]) > noise.nbytes + 4096  # does not fit the buffer
    got = [codec.encode_array(t) for t in tiles]
    assert all(isinstance(g, bytes) for g in got) and got == want
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(codec.encode_array, tiles * 8)) == want * 8


def test_multi_tile_chunks_and_grayscale(tmp_path, smooth_tiles):
    # (4, T, T, 3) chunks are encoded as one (4T, T, 3) image; 2-D grayscale chunks also work
    group = zarr.open_group(str(tmp_path), mode="w")
    a = group.create_array(
        "rgb", shape=(8, T, T, 3), dtype="uint8", chunks=(4, T, T, 3),
        serializer=JpegCodec(quality=95, subsampling="444"), compressors=None,
    )
    a[:] = smooth_tiles[:8]
    assert psnr(smooth_tiles[:8], a[:]) > 35.0
    gray = smooth_tiles[0, ..., 1]
    g = group.create_array(
        "gray", shape=gray.shape, dtype="uint8", chunks=(128, 128),
        serializer=JpegCodec(quality=95), compressors=None,
    )
    g[:] = gray
    assert psnr(gray, g[:]) > 35.0


# ---------------------------------------------------------------------------------------------
# one tile = one chunk read
# ---------------------------------------------------------------------------------------------


class CountingStore(WrapperStore):
    """Records every (key, byte_range) read."""

    def __init__(self, store):
        super().__init__(store)
        self.reads: list[tuple[str, object]] = []

    async def get(self, key, prototype, byte_range=None):
        self.reads.append((key, byte_range))
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("name", ["jpeg", "lossless"])
def test_single_tile_read_fetches_only_that_chunk(tmp_path, name, natural_tiles):
    n, shard = 8, 8
    tiles = natural_tiles[:n] if len(natural_tiles) >= n else smooth_he_tiles(n)
    arr = make_array(tmp_path, TileCompression.from_name(name), n, shard=shard)
    arr[:] = tiles
    shard_file = tmp_path / "tiles" / "c" / "0" / "0" / "0" / "0"
    shard_size = shard_file.stat().st_size

    store = CountingStore(LocalStore(str(tmp_path), read_only=True))
    reader = zarr.open_array(store, path="tiles", mode="r")
    store.reads.clear()
    tile = reader[5]
    data_reads = [(k, r) for k, r in store.reads if k.startswith("tiles/c/")]
    ranges = [r for _, r in data_reads]
    assert all(r is not None for r in ranges), "a whole shard was read"
    lengths = [getattr(r, "end", 0) - getattr(r, "start", 0) for r in ranges]
    chunk_len = max(lengths)
    assert 0 < chunk_len < shard_size / (shard - 1), (ranges, shard_size)
    if name == "lossless":
        np.testing.assert_array_equal(tile, tiles[5])
        np.testing.assert_array_equal(reader[5, 10:20, 30:40], tiles[5, 10:20, 30:40])
        np.testing.assert_array_equal(reader[2:4, :, :, 1], tiles[2:4, :, :, 1])
    else:
        assert psnr(tiles[5], tile) > 28.0
        np.testing.assert_array_equal(reader[5, 10:20, 30:40], tile[10:20, 30:40])


# ---------------------------------------------------------------------------------------------
# metadata and registration
# ---------------------------------------------------------------------------------------------


def _inner_codecs(array_dir: Path) -> list[dict]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    return sharding["configuration"]["codecs"]


def test_zarr_json_holds_codec_configuration(tmp_path):
    make_array(tmp_path / "j", TileCompression.from_name("jpeg:95:444"), 4)
    assert _inner_codecs(tmp_path / "j" / "tiles") == [
        {"name": JPEG_CODEC_NAME, "configuration": {"quality": 95, "subsampling": "444"}}
    ]
    make_array(tmp_path / "l", TileCompression.from_name("lossless:zstd5:bitshuffle"), 4)
    codecs = _inner_codecs(tmp_path / "l" / "tiles")
    assert codecs[0]["name"] == "bytes"
    assert codecs[1]["name"] == "blosc"
    config = codecs[1]["configuration"]
    assert (config["cname"], config["clevel"], config["shuffle"]) == ("zstd", 5, "bitshuffle")
    make_array(tmp_path / "n", TileCompression.from_name("none"), 4)
    assert [c["name"] for c in _inner_codecs(tmp_path / "n" / "tiles")] == ["bytes"]


def test_codec_dict_round_trip_and_registry():
    codec = JpegCodec(quality=77, subsampling="422")
    assert JpegCodec.from_dict(codec.to_dict()) == codec
    assert JpegCodec.from_dict({"name": JPEG_CODEC_NAME}) == JpegCodec()
    with pytest.raises(ValueError, match="unknown"):
        JpegCodec.from_dict({"name": JPEG_CODEC_NAME, "configuration": {"qual": 3}})
    with pytest.raises(ValueError):
        JpegCodec(quality=0)
    with pytest.raises(ValueError):
        JpegCodec(subsampling="411")
    from zarr.registry import get_codec_class

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "several implementations" warning
        assert get_codec_class(JPEG_CODEC_NAME) is JpegCodec


def test_jpeg_rejects_bad_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="w")
    with pytest.raises(ValueError, match="uint8"):
        group.create_array("u16", shape=(2, 8, 8, 3), dtype="uint16", chunks=(1, 8, 8, 3),
                           serializer=JpegCodec(), compressors=None)
    with pytest.raises(ValueError, match="65535"):
        group.create_array("tall", shape=(300, 256, 256, 3), dtype="uint8",
                           chunks=(300, 256, 256, 3), serializer=JpegCodec(), compressors=None)


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True, text=True, cwd=str(REPO), env=env, timeout=60,
    )


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory, smooth_tiles):
    path = tmp_path_factory.mktemp("fresh")
    make_array(path, TileCompression.from_name("jpeg:90"), 4)[:] = smooth_tiles[:4]
    return path


# Run before ``import zarr`` in a subprocess: hide this package's ``zarr.codecs`` entry point, so
# that only the import-time registration can make hlss.jpeg known.
HIDE_ENTRY_POINT = f"""
import importlib.metadata as _md
_kept = _md.EntryPoints(
    ep for dist in _md.distributions() for ep in dist.entry_points
    if (ep.group, ep.name) != ("zarr.codecs", {JPEG_CODEC_NAME!r})
)
_md.entry_points = lambda **kw: _kept.select(**kw) if kw else _kept
"""


@pytest.mark.parametrize("imp", ["import pipeline", "import pipeline.codecs"])
def test_fresh_process_decodes_after_importing_pipeline(jpeg_store, imp):
    code = HIDE_ENTRY_POINT + f"""
{imp}
import numpy as np, zarr
g = zarr.open_group({str(jpeg_store)!r}, mode="r")
a = g["tiles"]
print(a.shape, int(a[:].astype(np.int64).sum()))
"""
    res = _run_fresh(code)
    assert res.returncode == 0, (
        f"{imp!r} must register the hlss.jpeg codec (pipeline/__init__.py should import "
        f"pipeline.codecs):\n{res.stderr[-2000:]}"
    )
    back = zarr.open_array(str(jpeg_store / "tiles"), mode="r")[:]
    assert res.stdout.split()[-1] == str(int(back.astype(np.int64).sum()))


def test_fresh_process_plain_zarr_without_entry_point_cannot_decode(jpeg_store):
    code = HIDE_ENTRY_POINT + f"""
import zarr
zarr.open_array({str(jpeg_store / "tiles")!r}, mode="r")[0]
"""
    res = _run_fresh(code)
    assert res.returncode != 0 and JPEG_CODEC_NAME in res.stderr, res.stderr[-2000:]


def test_fresh_process_plain_zarr_via_entry_point(jpeg_store):
    """Plain zarr, without importing pipeline, finds hlss.jpeg through the installed package's
    ``[project.entry-points."zarr.codecs"]`` entry and loads pipeline.codecs lazily."""
    if not any(ep.name == JPEG_CODEC_NAME for ep in entry_points(group="zarr.codecs")):
        pytest.skip("hlss-pipeline is not installed, so its zarr.codecs entry point is absent")
    code = f"""
import sys, zarr
a = zarr.open_array({str(jpeg_store / "tiles")!r}, mode="r")
a[0]
assert "pipeline.codecs" in sys.modules
print("ok")
"""
    res = _run_fresh(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# TileCompression API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("jpeg", {"kind": "jpeg", "quality": 90}),
        ("JPEG:95", {"kind": "jpeg", "quality": 95}),
        ("jpeg:80:420", {"kind": "jpeg", "quality": 80, "subsampling": "420"}),
        ("jpeg:85:4:4:4", None),  # rejected below: too many parts
        ("lossless", {"kind": "lossless"}),
        ("lossless:zstd5", {"kind": "lossless", "cname": "zstd", "level": 5, "shuffle": "bitshuffle"}),
        ("lossless:zstd", {"kind": "lossless", "cname": "zstd"}),
        ("lossless:lz4", {"kind": "lossless", "cname": "lz4"}),
        ("lossless:lz4-1:noshuffle", {"kind": "lossless", "cname": "lz4", "level": 1, "shuffle": "noshuffle"}),
        ("none", {"kind": "none"}),
        (" none ", {"kind": "none"}),
    ],
)
def test_from_name(name, expected):
    if expected is None:
        with pytest.raises(ValueError):
            TileCompression.from_name(name)
        return
    comp = TileCompression.from_name(name)
    for key, value in expected.items():
        assert getattr(comp, key) == value, (name, key)
    assert TileCompression.from_name(comp.name) == comp  # canonical name round-trips


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty"),
        ("gzip", "unknown compression"),
        ("jpeg:abc", "quality"),
        ("jpeg:0", "1..100"),
        ("jpeg:101", "1..100"),
        ("jpeg:90:411", "subsampling"),
        ("lossless:gzip", "lz4 or zstd"),
        ("lossless:zstd0", "1..9"),
        ("lossless:zstd12", "1..9"),
        ("lossless:zstd5:byteshuffle", "shuffle"),
        ("none:5", "no options"),
    ],
)
def test_from_name_errors(name, match):
    with pytest.raises(ValueError, match=match):
        TileCompression.from_name(name)


def test_dataclass_validation_dict_and_codecs():
    default = TileCompression()
    assert default.kind in ("jpeg", "lossless", "none")
    for comp in (TileCompression.from_name(n) for n in ("jpeg:92", "lossless:zstd3", "none")):
        d = comp.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert TileCompression.from_dict(d).to_dict() == d
        kwargs = comp.codecs_for()
        assert set(kwargs) == {"filters", "serializer", "compressors"}
    # unused fields do not leak into the dict (stable params hash)
    assert TileCompression(kind="none", quality=50).to_dict() == {"kind": "none"}
    assert TileCompression(kind="jpeg", level=9).to_dict() == TileCompression(kind="jpeg").to_dict()
    with pytest.raises(ValueError):
        TileCompression(kind="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TileCompression(kind="jpeg", quality=200)
    with pytest.raises(ValueError):
        TileCompression(kind="lossless", level=12)
    assert isinstance(TileCompression.from_name("jpeg").codecs_for()["serializer"], JpegCodec)

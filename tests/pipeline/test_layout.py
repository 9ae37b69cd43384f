"""The store layout module is the truth: a slide tiled now has exactly the nodes, dtypes, shapes and
units :mod:`pipeline.layout` describes, and no module outside the store chooses behaviour by
whether the store is local or on an object store."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import layout as L
from pipeline.cohort import SlideSpec
from pipeline.config import TilingParams
from pipeline.qc import QC_FIELDS
from pipeline.store import SlideStore, StoreWriter, tiles_version
from pipeline.tiler import tile_slide

ROOT = Path(__file__).resolve().parents[2]


def _meta(folder: Path) -> dict:
    return json.loads((folder / L.META).read_text())


def _children(folder: Path) -> set[str]:
    return {c.name for c in folder.iterdir() if c.is_dir()}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> tuple[Path, str, str]:
    """A tiny synthetic slide tiled into a new store, with one feature set and one attribute run."""
    from pipeline.synthetic import HETissueRenderer, write_slide

    tmp = tmp_path_factory.mktemp("layout")
    renderer = HETissueRenderer(1024, 768, tissue_class=0, stain_seed=0, seed=3)
    path = write_slide(tmp / "s.svs", 1024, 768, renderer, mpp=0.5)
    writer = StoreWriter(tmp / "s.zarr")
    result = tile_slide(SlideSpec(path, "P1", "S1", label="a"), writer, TilingParams(tile_size=128))
    assert result.status == L.COMPLETE, result.error
    attrs = writer.slide_attrs("P1", "S1")
    for group, name, width in ((L.FEATURES, "enc", 4), (L.ATTRIBUTES, "run", 3)):
        arr = writer.stage_features(result.n_tiles, width, chunk_rows=writer.feature_chunk_rows(16))
        arr[:] = np.ones((result.n_tiles, width), np.float32)
        writer.commit_features(arr, "P1", "S1", name, {"model": "m"}, tiles_version(attrs), group=group)
    writer.write_evaluation("knn-enc", {"accuracy": 1.0})
    return tmp / "s.zarr", "P1", "S1"


def test_store_root_has_the_layout_nodes_and_schema(tiled):
    store, p, s = tiled
    assert _children(store) == {L.PATIENTS, L.STAGING, L.EVALUATIONS}
    hlss = _meta(store)["attributes"][L.ROOT_ATTR]
    assert hlss["schema_version"] == L.SCHEMA_VERSION and L.SCHEMA_VERSION in L.READABLE_SCHEMAS
    assert (store / L.evaluation_key("knn-enc") / L.META).is_file()
    assert (store / L.slides_key(p)).is_dir() and (store / L.patient_key(p) / L.META).is_file()
    assert _meta(store / L.slide_key(p, s))["attributes"][L.STATUS] == L.COMPLETE


def test_slide_nodes_dtypes_shapes_and_units_are_the_layouts(tiled):
    store, p, s = tiled
    slide = store / L.slide_key(p, s)
    attrs = _meta(slide)["attributes"]
    n, t = attrs[L.N_TILES], attrs[L.TILE_SIZE]
    specs = {spec.name.split("/")[0]: spec for spec in L.SLIDE_ARRAYS}
    assert _children(slide) == set(specs)  # every node the layout names, and nothing else
    arrays = {name: slide / name for name in specs if "/" not in specs[name].name}
    arrays |= {f"{g}/{c}": slide / g / c for g in (L.TILE_QC, L.FEATURES, L.ATTRIBUTES) for c in _children(slide / g)}
    assert set(_children(slide / L.TILE_QC)) == set(QC_FIELDS) == set(L.TILE_QC_UNITS)
    sizes = {"N": n, "T": t, "3": 3, "2": 2}
    for name, folder in arrays.items():
        spec, meta = L.spec(name), _meta(folder)
        assert meta["node_type"] == "array" and meta["data_type"] == spec.dtype, name
        dims = spec.shape_doc.strip("()").replace(" ", "").rstrip(",").split(",")
        assert len(meta["shape"]) == len(dims), name
        for dim, size in zip(dims, meta["shape"]):
            if dim in sizes:
                assert size == sizes[dim], (name, spec.shape_doc, meta["shape"])
        if spec.per_tile:
            assert meta["shape"][0] == n, name
        units = meta["attributes"].get(L.UNITS)
        if name.startswith(f"{L.TILE_QC}/"):
            assert units == L.TILE_QC_UNITS[name.split("/")[1]]
        elif units is not None:
            assert units == spec.unit, name
    assert {L.COORDS, L.TISSUE} <= {k for k in arrays if _meta(arrays[k])["attributes"].get(L.UNITS)}
    for name in (L.THUMBNAIL, L.TISSUE_MASK, L.QC):
        assert L.SCALE in _meta(slide / name)["attributes"], name


def test_reader_and_layout_agree_on_required_arrays(tiled):
    store, p, s = tiled
    reader = SlideStore(store)
    for name, dtype in L.REQUIRED_DTYPES.items():
        assert np.dtype(reader.array(p, s, name).dtype) == np.dtype(dtype), name
    assert reader.feature_names(p, s) == ["enc"] and reader.attribute_runs(p, s) == ["run"]
    assert L.spec("tile_qc/focus").name == f"{L.TILE_QC}/<m>" and L.spec("features/x").dtype == "float32"
    for name in ("nope", "tiles/x"):
        with pytest.raises(KeyError, match="not an array"):
            L.spec(name)


# modules that may know whether a store is local or remote: the store itself and where the
# location kinds are defined; flows/settings.py checks that a *local* store path is writable before
# any store is opened (a pre-flight check on a path, not store behaviour); the store's tile reader
# reads a local folder's shards with pread and anything else through zarr's store (the same bytes)
_MAY_BRANCH = {"pipeline/store.py", "pipeline/location.py", "flows/settings.py", "pipeline/tile_reader.py"}


def _remote_branches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("is_remote", "_remote"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "is_remote" for a in node.names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports is_remote")
    return found


def test_no_module_outside_the_store_branches_on_local_versus_remote():
    files = [f for pkg in ("pipeline", "hlss_model", "flows", "hlss") for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert any(f.name == "extract.py" for f in files)  # the scan reaches the extraction module
    found = [hit for f in files if f.relative_to(ROOT).as_posix() not in _MAY_BRANCH
             for hit in _remote_branches(f)]
    assert found == [], "ask the store (e.g. StoreWriter.feature_chunk_rows) instead:\n" + "\n".join(found)

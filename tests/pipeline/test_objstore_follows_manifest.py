"""On an object store (moto S3 on loopback) a rerun moves a slide to its new patient by the commit
protocol (never complete under two patients), and the next run finishes a move killed half-way."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from pipeline.location import ObjectLocation  # noqa: E402
from pipeline.runner import tile_cohort  # noqa: E402
from pipeline.store import SlideStore  # noqa: E402
from test_objstore import PARAMS, _new_bucket, _objects, s3_endpoint  # noqa: E402,F401  (fixture)
from test_store_follows_manifest import _add_features, _manifest, rerun_expecting_moves  # noqa: E402


@pytest.mark.slow
def _killed_run(monkeypatch, method: str, fake, manifest, url) -> None:
    """A run killed inside ``ObjectLocation.<method>`` (``fake`` raises KeyboardInterrupt), then the
    real method back for the next run."""
    real = getattr(ObjectLocation, method)
    monkeypatch.setattr(ObjectLocation, method, fake)
    with pytest.raises(KeyboardInterrupt):
        tile_cohort(manifest, url, PARAMS)
    monkeypatch.setattr(ObjectLocation, method, real)


def test_move_on_an_object_store_and_recovery_of_a_killed_move(s3_endpoint, make_slide, tmp_path, monkeypatch):
    a = make_slide("a.svs", width=1024, height=768, seed=1)
    b = make_slide("b.svs", width=1024, height=768, seed=2)
    url = f"s3://{_new_bucket(s3_endpoint)}/c.zarr"
    manifest = _manifest(tmp_path / "m.csv", [(a, "P1", "S1", "x", ""), (b, "P2", "S2", "y", "")])
    assert tile_cohort(manifest, url, PARAMS).exit_code == 0
    _add_features(url, "P1", "S1")
    tiles_before = SlideStore(url).tiles("P1", "S1")[:]
    before = _objects(url)

    _manifest(manifest, [(a, "P3", "S1", "x", ""), (b, "P2", "S2", "y", "")])
    st = rerun_expecting_moves(manifest, url, ("P1", "P3", "S1"))
    assert st.slides("P1") == [] and st.slides("P3") == ["S1"] and st.feature_names("P3", "S1") == ["f"]
    np.testing.assert_array_equal(st.tiles("P3", "S1")[:], tiles_before)
    after = _objects(url)
    moved = {k.replace("patients/P1/slides/S1/", "patients/P3/slides/S1/"): v for k, v in before.items()
             if k.startswith("patients/P1/slides/S1/")}
    assert all(after[k] == v for k, v in moved.items())  # every object, byte for byte, under P3
    assert not [k for k in after if k.startswith("patients/P1/slides/S1")]

    # a move killed during the copy: the marker under P3 keeps the slide, the next run moves it again
    real_copy = ObjectLocation.copy

    def die_half_way(self, src, dst):
        real_copy(self, src[: len(src) // 2], dst[: len(dst) // 2])
        raise KeyboardInterrupt("killed")

    _manifest(manifest, [(a, "P6", "S1", "x", ""), (b, "P2", "S2", "y", "")])
    _killed_run(monkeypatch, "copy", die_half_way, manifest, url)
    st = SlideStore(url)
    assert st.slides("P3") == [] and st.slides("P6") == []  # never listed complete half-copied
    st = rerun_expecting_moves(manifest, url, ("P3", "P6", "S1"))  # moved again, not retiled
    assert st.slides("P3", status=None) == [] and st.feature_names("P6", "S1") == ["f"]
    np.testing.assert_array_equal(st.tiles("P6", "S1")[:], tiles_before)

    # a move killed after the copy, before the old objects are removed: marker left under P6
    real = ObjectLocation.remove_tree

    def die_on_the_old_slide(self, rel):
        if rel == "patients/P6/slides/S1":
            raise KeyboardInterrupt("killed")
        return real(self, rel)

    _manifest(manifest, [(a, "P4", "S1", "x", ""), (b, "P2", "S2", "y", "")])
    _killed_run(monkeypatch, "remove_tree", die_on_the_old_slide, manifest, url)
    st = SlideStore(url)
    assert st.slides("P6") == [] and st.slides("P4") == ["S1"]  # never complete under both
    assert st.slides("P6", status=None) == ["S1"]  # the "moving" marker and the copied objects

    report = tile_cohort(manifest, url, PARAMS)
    assert report.exit_code == 0 and not report.by_status("complete")
    assert "updated P4/S1: removed what an interrupted move left under patient P6" in report.table()
    st = SlideStore(url)
    assert st.slides("P6", status=None) == [] and st.feature_names("P4", "S1") == ["f"]
    np.testing.assert_array_equal(st.tiles("P4", "S1")[:], tiles_before)

"""A rerun makes the store follow the manifest: labels, splits and patients change without retiling;
the same slide file under two ids or patients is refused; a retile never drops derived data silently."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TilingParams
from pipeline.runner import tile_cohort
from pipeline.source import source_info
from pipeline.store import SlideStore, StoreWriter, tiles_version
from store_snapshot import assert_unchanged, snapshot

PARAMS = TilingParams(target_mpp=1.0, tile_size=64)


def _manifest(path: Path, rows: list[tuple]) -> Path:
    lines = ["slide_path,patient_id,slide_id,label,split"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cohort(make_slide, tmp_path):
    """Two slides of two patients tiled into a store; returns (slide paths, manifest, store)."""
    a = make_slide("a.svs", width=1024, height=768, seed=1)
    b = make_slide("b.svs", width=1024, height=768, seed=2)
    manifest = _manifest(tmp_path / "m.csv", [(a, "P1", "S1", "tumour", "train"), (b, "P2", "S2", "normal", "test")])
    store = tmp_path / "s.zarr"
    assert tile_cohort(manifest, store, PARAMS).exit_code == 0
    return (a, b), manifest, store


def _add_features(store: Path | str, patient: str, slide: str, name: str = "f") -> None:
    """A complete feature array for the slide, committed as an extraction does."""
    writer = StoreWriter(store)
    attrs = writer.slide_attrs(patient, slide)
    array = writer.stage_features(attrs["n_tiles"], 4)
    array[:] = np.ones((attrs["n_tiles"], 4), np.float32)
    writer.commit_features(array, patient, slide, name, {"model": "test"}, tiles_version(attrs))


def test_changed_label_and_split_reach_the_store_without_retiling(cohort, tmp_path):
    (a, b), manifest, store = cohort
    before = snapshot(store)
    _manifest(manifest, [(a, "P1", "S1", "normal", "test"), (b, "P2", "S2", "normal", "test")])
    report = tile_cohort(manifest, store, PARAMS)
    assert report.exit_code == 0 and len(report.by_status("skipped")) == 2
    table = report.table()
    assert "updated P1/S1: label 'tumour' -> 'normal'; split 'train' -> 'test'" in table
    assert "S2" not in table  # unchanged: no line
    st = SlideStore(store)
    assert st.patient_attrs("P1") == {"label": "normal", "split": "test"}
    assert st.slide_attrs("P1", "S1")["label"] == "normal" and st.slide_attrs("P1", "S1")["split"] == "test"
    # only the two metadata documents changed: no tile was rewritten
    assert_unchanged(before, snapshot(store), allow=("patients/P1/zarr.json", "patients/P1/slides/S1/zarr.json"))
    assert tile_cohort(manifest, store, PARAMS).table().count("updated") == 0  # a second rerun: nothing to do


def rerun_expecting_moves(manifest, store, *moves: tuple[str, str, str]) -> SlideStore:
    """Rerun ``manifest`` into ``store``: nothing retiled, and each ``(old patient, new patient, slide)``
    reported moved; the store as it is then."""
    report = tile_cohort(manifest, store, PARAMS)
    assert report.exit_code == 0 and not report.by_status("complete"), report.table()
    for old, new, slide in moves:
        assert f"updated {new}/{slide}: moved from patient {old}" in report.table()
    return SlideStore(store)


def test_changed_patient_moves_the_slide_with_its_features(cohort, tmp_path):
    (a, b), manifest, store = cohort
    _add_features(store, "P1", "S1")
    before = snapshot(store)
    _manifest(manifest, [(a, "P3", "S1", "tumour", "train"), (b, "P2", "S2", "normal", "test")])
    st = rerun_expecting_moves(manifest, store, ("P1", "P3", "S1"))
    assert st.slides("P1") == [] and st.slides("P3") == ["S1"]
    assert st.patient_attrs("P3") == {"label": "tumour", "split": "train"}
    assert st.feature_names("P3", "S1") == ["f"]
    after = snapshot(store)
    moved = {k.replace("patients/P1/slides/S1/", "patients/P3/slides/S1/"): v for k, v in before.items()}
    # every file of the slide is there, byte for byte, under its new patient; nothing else changed
    assert_unchanged(moved, after, allow=("patients/P3/zarr.json", "patients/P3/slides/zarr.json"))


def test_new_pixels_and_a_new_patient_move_then_retile(cohort, make_slide, tmp_path):
    (a, b), manifest, store = cohort
    make_slide("a.svs", width=1024, height=768, seed=42)  # re-scanned
    _manifest(manifest, [(a, "P5", "S1", "tumour", "train"), (b, "P2", "S2", "normal", "test")])
    report = tile_cohort(manifest, store, PARAMS)
    assert report.exit_code == 0 and [r.slide_id for r in report.by_status("complete")] == ["S1"]
    assert "updated P5/S1: moved from patient P1, then retiled" in report.table()
    st = SlideStore(store)
    assert st.slides("P1", status=None) == [] and st.slides("P5") == ["S1"]
    assert st.slide_attrs("P5", "S1")["source"]["fingerprint"] == source_info(a)["fingerprint"]


def test_same_file_under_two_slide_ids_in_one_manifest_is_refused(cohort, tmp_path):
    (a, b), manifest, store = cohort
    before = snapshot(store)
    _manifest(manifest, [(a, "P1", "S1", "tumour", "train"), (b, "P2", "S2", "normal", "test"),
                         (a, "P9", "S9", "normal", "test")])
    report = tile_cohort(manifest, store, PARAMS)
    assert report.exit_code == 1
    errors = {r.slide_id: r.error for r in report.by_status("failed")}
    assert set(errors) == {"S1", "S9"}
    assert "m.csv:2" in errors["S1"] and "P9/S9 (" in errors["S1"] and "m.csv:4" in errors["S1"]
    assert "P1/S1 (" in errors["S9"] and "leaks between training and the held-out set" in errors["S9"]
    assert_unchanged(before, snapshot(store))


def test_same_file_as_a_stored_slide_under_another_id_is_refused(cohort, tmp_path):
    (a, b), manifest, store = cohort
    before = snapshot(store)
    other = _manifest(tmp_path / "other.csv", [(a, "P7", "X7", "normal", "test")])
    report = tile_cohort(other, store, PARAMS)
    assert report.exit_code == 1
    [failed] = report.by_status("failed")
    assert "other.csv:2" in failed.error and "patients/P1/slides/S1" in failed.error
    assert_unchanged(before, snapshot(store))


def test_slide_stored_under_two_patients_is_refused_naming_both(cohort, tmp_path):
    (a, b), manifest, store = cohort
    # what main allowed: the same slide id committed under a second patient (here by hand)
    shutil.copytree(store / "patients/P1", store / "patients/P4")
    before = snapshot(store)
    report = tile_cohort(manifest, store, PARAMS)
    [failed] = report.by_status("failed")
    assert "patients/P1/slides/S1" in failed.error and "patients/P4/slides/S1" in failed.error
    assert_unchanged(before, snapshot(store))


def test_ids_that_differ_only_by_case_from_stored_ones_are_refused(cohort, make_slide, tmp_path):
    """On a case-insensitive file system, committing P1/s1 would replace the stored P1/S1."""
    (a, b), manifest, store = cohort
    c = make_slide("c.svs", width=1024, height=768, seed=3)
    d = make_slide("d.svs", width=1024, height=768, seed=4)
    before = snapshot(store)
    _manifest(tmp_path / "case.csv", [(c, "P1", "s1", "tumour", "train"), (d, "p2", "S4", "", "")])
    report = tile_cohort(tmp_path / "case.csv", store, PARAMS)
    errors = {r.slide_id: r.error for r in report.by_status("failed")}
    assert "differs only by case from the stored patients/P1/slides/S1" in errors["s1"] and "case.csv:2" in errors["s1"]
    assert "patient id 'p2' differs only by case from the stored patients/P2" in errors["S4"]
    assert_unchanged(before, snapshot(store))


def _tile_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hlss", "tile", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def test_retiling_a_slide_with_features_needs_drop_derived(cohort, make_slide, tmp_path):
    (a, b), manifest, store = cohort
    _add_features(store, "P1", "S1")
    _add_features(store, "P1", "S1", name="g")
    make_slide("a.svs", width=1024, height=768, seed=99)  # re-scanned: new pixels under the same name
    old = SlideStore(store).slide_attrs("P1", "S1")["source"]["fingerprint"]
    before = snapshot(store)
    args = (str(manifest), "--store", str(store), "--target-mpp", "1", "--tile-size", "64")
    run = _tile_cli(*args)
    assert run.returncode == 1, run.stderr
    assert "FAILED S1 (patient P1)" in run.stdout
    assert "features/f, features/g invalid" in run.stdout and "--drop-derived" in run.stdout
    assert_unchanged(before, snapshot(store))

    run = _tile_cli(*args, "--drop-derived")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dropped P1/S1: features/f, features/g (retiled; re-extract them)" in run.stdout
    st = SlideStore(store)
    assert st.feature_names("P1", "S1") == []
    assert st.slide_attrs("P1", "S1")["source"]["fingerprint"] != old


@pytest.mark.slow
def test_reprocess_flow_retiles_re_extracts_its_features_and_lists_the_rest(make_slide, tmp_path):
    """The flows share hlss tile's planning: relabels without retiling, and a retile re-extracts the
    features of the flow's own encoders and lists what it cannot make again."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.reprocess import reprocess
    from flows.summary import summary_markdown

    a = make_slide("a.svs", width=1024, height=768, seed=1)
    b = make_slide("b.svs", width=1024, height=768, seed=2)
    manifest = _manifest(tmp_path / "m.csv", [(a, "P1", "S1", "tumour", "train"), (b, "P2", "S2", "normal", "test")])
    store = tmp_path / "s.zarr"
    tiling = {"target_mpp": 1.0, "tile_size": 64}
    extraction = {"encoders": ["timm:resnet10t"], "random_init": True, "batch_size": 32, "device": "cpu"}
    with prefect_test_harness(server_startup_timeout=180):
        first = reprocess(source=str(manifest), store=str(store), tiling=tiling, extraction=extraction)
        assert first["slides"]["complete"] == 2
        _add_features(store, "P1", "S1", name="run1")  # stands for attribute scores of an explain run
        writer = StoreWriter(store)
        attrs = writer.slide_attrs("P1", "S1")
        scores = writer.stage_features(attrs["n_tiles"], 2)
        writer.commit_features(scores, "P1", "S1", "run1", {}, tiles_version(attrs), group="attributes")
        make_slide("a.svs", width=1024, height=768, seed=99)  # new pixels for S1
        _manifest(manifest, [(a, "P1", "S1", "tumour", "train"), (b, "P2", "S2", "tumour", "test")])
        second = reprocess(source=str(manifest), store=str(store), tiling=tiling, extraction=extraction)
    rows = {r["slide"]: r for r in second["slide_rows"]}
    assert rows["S1"]["status"] == "complete" and rows["S2"]["status"] == "skipped"
    assert rows["S2"]["reason"] == "label 'normal' -> 'tumour'"
    assert SlideStore(store).patient_attrs("P2")["label"] == "tumour"
    assert sorted((d["set"], d["remade"]) for d in second["dropped"]) == [
        ("attributes/run1", False), ("features/resnet10t", True), ("features/run1", False)]
    text = summary_markdown(second)
    assert "- P1/S1: attributes/run1 not re-extracted" in text and "- P1/S1: features/resnet10t re-extracted" in text
    assert "| P2 | S2 | skipped | 0 | label 'normal' -\\> 'tumour' |" in text


"""Names and the manifest are a contract: every name that becomes a store key is checked by one
validator, a bad manifest is an error naming file, line and column, and the CSV files the project
writes are safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cohort import ManifestError, discover_cohort
from pipeline.config import TilingParams
from pipeline.export import export_mil
from pipeline.files import spreadsheet_safe, write_csv
from pipeline.ids import InvalidIdError, validate_id
from pipeline.runner import tile_cohort
from pipeline.store import SlideStore, StoreWriter, tiles_version
from store_snapshot import assert_unchanged, snapshot
from test_store_follows_manifest import _add_features

PARAMS = TilingParams(target_mpp=1.0, tile_size=64)
HEADER = "slide_path,patient_id,slide_id,label,split\n"


@pytest.fixture
def tiled(make_slide, tmp_path):
    """One slide P1/S1 tiled into a store: (slide, other slide file, store)."""
    a = make_slide("a.svs", width=1024, height=768, seed=1)
    b = make_slide("b.svs", width=1024, height=768, seed=2)
    (tmp_path / "m.csv").write_text(HEADER + f"{a},P1,S1,x,train\n")
    store = tmp_path / "s.zarr"
    assert tile_cohort(tmp_path / "m.csv", store, PARAMS).exit_code == 0
    return a, b, store


@pytest.mark.parametrize("name", ["zarr.json", "ZARR.JSON", ".zattrs", ".zgroup", "__meta"])
def test_a_slide_named_like_zarr_metadata_is_refused_and_replaces_nothing(tiled, tmp_path, name):
    """On main a slide id 'zarr.json' was committed over patients/P1/slides/zarr.json: the metadata of
    the patient's slides group, so every other slide of P1 vanished from the store."""
    a, b, store = tiled
    before = snapshot(store)
    (tmp_path / "m.csv").write_text(HEADER + f"{a},P1,S1,x,train\n{b},P1,{name},x,train\n")
    report = tile_cohort(tmp_path / "m.csv", store, PARAMS)
    assert report.exit_code == 1
    [failed] = report.by_status("failed")
    assert failed.error.startswith(f"{tmp_path / 'm.csv'}:3: column slide_id: slide_id {name!r} is not allowed")
    assert "reserved" in failed.error
    assert SlideStore(store).slides("P1") == ["S1"]
    assert_unchanged(before, snapshot(store))


@pytest.mark.parametrize("kind, call", [
    ("feature name", lambda w, a, arr: w.commit_features(arr, "P1", "S1", "zarr.json", {}, tiles_version(a))),
    ("attribute run name", lambda w, a, arr: w.commit_features(arr, "P1", "S1", ".zarray", {}, tiles_version(a),
                                                                group="attributes")),
    ("evaluation name", lambda w, a, arr: w.write_evaluation("zarr.json", {"x": 1})),
])
def test_every_name_that_becomes_a_key_goes_through_the_validator(tiled, kind, call):
    _, _, store = tiled
    writer = StoreWriter(store)
    attrs = writer.slide_attrs("P1", "S1")
    array = writer.stage_features(attrs["n_tiles"], 2)
    before = snapshot(store)
    with pytest.raises(InvalidIdError, match=f"{kind} .* is not allowed"):
        call(writer, attrs, array)
    assert_unchanged(before, snapshot(store))
    writer.discard_array(array)


def test_a_feature_name_is_checked_before_any_extraction(tiled):
    from hlss_model.encoders import timm_encoder
    from hlss_model.extract import extract_features

    _, _, store = tiled
    before = snapshot(store)
    with pytest.raises(InvalidIdError, match="feature name 'zarr.json' is not allowed"):
        extract_features(store, [timm_encoder("test_resnet", name="zarr.json")], batch_size=8, device="cpu")
    assert_unchanged(before, snapshot(store))


def _tile_cli(manifest: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hlss", "tile", str(manifest), "--store", str(store),
                           "--target-mpp", "1", "--tile-size", "64", "--no-progress"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("header, message", [
    ("slide_path,patient_id,lable\n", r"m.csv:1: column 3 'lable' is not a manifest column \(did you mean 'label'\?\)"),
    ("slide_path,Patient_ID\n", r"missing column\(s\) patient_id .*column 2 'Patient_ID' .*did you mean 'patient_id'"),
    ("slide_path,patient_id,label,label\n", r"m.csv:1: column 'label' appears twice \(columns 3 and 4\)"),
    ("slide_path,patient_id,\n", r"m.csv:1: column 3 has no name"),
])
def test_unknown_misspelt_or_repeated_columns_stop_the_manifest(tiled, tmp_path, header, message):
    a, _, store = tiled
    (tmp_path / "m.csv").write_text(header + f"{a},P1,x,y\n")
    with pytest.raises(ManifestError, match=message) as e:
        discover_cohort(tmp_path / "m.csv")
    assert "allowed columns: slide_path, patient_id (required) and slide_id, label, split, mpp" in str(e.value)
    before = snapshot(store)
    run = _tile_cli(tmp_path / "m.csv", store)
    assert run.returncode == 2 and "hlss tile: error:" in run.stderr and "m.csv:1" in run.stderr
    assert "Traceback" not in run.stderr
    assert_unchanged(before, snapshot(store))


def test_a_manifest_that_is_not_utf8_names_the_line(tiled, tmp_path):
    a, _, store = tiled
    (tmp_path / "m.csv").write_bytes((HEADER + f"{a},P1,S1,x,train\n{a},P2,S2,caf\xe9,test\n").encode("latin-1"))
    with pytest.raises(ManifestError, match=r"m.csv:3: not UTF-8 text \(byte 0xe9 at character"):
        discover_cohort(tmp_path / "m.csv")
    before = snapshot(store)
    run = _tile_cli(tmp_path / "m.csv", store)
    assert run.returncode == 2 and "m.csv:3: not UTF-8" in run.stderr
    assert_unchanged(before, snapshot(store))


@pytest.mark.parametrize("row, column, message", [
    ("{a},P2,S2,x,training", "split", "split 'training' is not one of train (training) or"),
    ("{a},P2,S2,x\x07y,test", "label", "control or invisible characters"),
    ("{a},P2,S2,x,test,extra", None, "6 fields but the header has 5 columns"),
    ("{a},P2,-S2,x,test", "slide_id", "starting with a letter or digit"),
    ("{a},P2.,S2,x,test", "patient_id", "ends with '.'"),
    (",P2,S2,x,test", "slide_path", "empty slide_path"),
])
def test_bad_values_are_row_problems_naming_line_and_column(tiled, tmp_path, row, column, message):
    a, _, store = tiled
    (tmp_path / "m.csv").write_text(HEADER + f"{a},P1,S1,x,train\n" + row.format(a=a) + "\n")
    cohort = discover_cohort(tmp_path / "m.csv")
    assert [s.slide_id for s in cohort.slides] == ["S1"]
    [problem] = cohort.problems
    assert problem.source == f"{tmp_path / 'm.csv'}:3" and message in problem.error
    assert problem.error.startswith(f"column {column}:") if column else True
    before = snapshot(store)
    report = tile_cohort(tmp_path / "m.csv", store, PARAMS)
    assert report.exit_code == 1 and message in report.table() and "m.csv:3" in report.table()
    assert_unchanged(before, snapshot(store))


def test_ids_that_differ_only_by_case_are_refused_both_rows_named(make_slide, tmp_path):
    a = make_slide("a.svs", width=1024, height=768, seed=1)
    b = make_slide("b.svs", width=1024, height=768, seed=2)
    c = make_slide("c.svs", width=1024, height=768, seed=3)
    (tmp_path / "m.csv").write_text(HEADER + f"{a},P1,S1,,\n{b},P2,s1,,\n{c},p1,S3,,\n")
    cohort = discover_cohort(tmp_path / "m.csv")
    assert cohort.slides == []
    errors = {p.slide_id: p.error for p in cohort.problems}
    assert "differs only by case" in errors["s1"] and "P1/S1" in errors["s1"] and "m.csv:2" in errors["s1"]
    assert "patient id 'p1' differs only by case" in errors["S3"] and "m.csv:2" in errors["S3"]


def test_a_multi_line_quoted_value_keeps_line_numbers_right(make_slide, tmp_path):
    a = make_slide("a.svs", width=1024, height=768, seed=1)
    (tmp_path / "m.csv").write_text(HEADER + f'{a},P1,S1,"two\nlines",train\n{a},P2,S2,x,wrong\n')
    cohort = discover_cohort(tmp_path / "m.csv")
    sources = sorted(p.source.rsplit(":", 1)[1] for p in cohort.problems)
    assert sources == ["2", "4"]  # the label with a newline (line 2), the bad split on line 4


@pytest.mark.parametrize("cell, safe", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1+1", "'+1+1"), ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("-1", "-1"), ("+0.5", "+0.5"),
    ("tumour", "tumour"), (None, ""), (3, "3"),
])
def test_spreadsheet_safe_cells(cell, safe):
    assert spreadsheet_safe(cell) == safe


def test_exported_dataset_csv_carries_no_formula(tiled, tmp_path):
    a, _, store = tiled
    StoreWriter(store).update_labels("P1", "S1", {"label": "=cmd|' /C calc'!A0", "split": "train"})
    _add_features(store, "P1", "S1")
    report = export_mil(store, "f", "pt", tmp_path / "out")
    with open(report.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"case_id": "P1", "slide_id": "a", "label": "'=cmd|' /C calc'!A0", "split": "train",
                     "slide_path": str(a), "store_slide_id": "S1"}]


def test_write_csv_is_atomic_and_safe(tmp_path):
    write_csv(tmp_path / "t.csv", ["a", "=b"], [["@x", 1], ["-1", None]])
    assert (tmp_path / "t.csv").read_text() == "a,'=b\n'@x,1\n-1,\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "t.csv"]


# -- property: any manifest parses into slides and problems, or is a ManifestError naming the file --

_COLUMNS = st.sampled_from(["slide_path", "patient_id", "slide_id", "label", "split", "mpp", "lable", "Split", "",
                            "patient_id "])
_CELLS = st.one_of(st.text(st.characters(codec="utf-8"), max_size=12),
                   st.sampled_from(["a.svs", "P1", "S1", "zarr.json", "train", "test", "0.5", "-1", "..", '"', ","]))


@st.composite
def _manifests(draw) -> bytes:
    header = draw(st.lists(_COLUMNS, min_size=0, max_size=7))
    rows = draw(st.lists(st.lists(_CELLS, max_size=8), max_size=6))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode()
    if draw(st.booleans()):  # damage: random bytes in the middle (encodings, NULs, lone quotes)
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=6)) + data[at:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_manifests())
def test_any_manifest_gives_slides_and_problems_or_a_manifest_error(tmp_path, data):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(data)
    n_lines = len(data.splitlines()) + 1
    try:
        cohort = discover_cohort(manifest)
    except ManifestError as e:
        head, _, rest = str(e).partition(": ")
        line = head.rsplit(":", 1)[1] if head != str(manifest) else "1"
        assert head in (str(manifest), f"{manifest}:{line}") and 1 <= int(line) <= n_lines
        assert rest
        return
    for p in cohort.problems:
        assert p.source.startswith(f"{manifest}:") and 2 <= int(p.source.rsplit(":", 1)[1]) <= n_lines and p.error
    for s in cohort.slides:
        assert validate_id(s.patient_id) and validate_id(s.slide_id) and s.row.startswith(f"{manifest}:")


def test_a_staging_token_is_a_valid_name_whatever_the_host_is_called(tmp_path, monkeypatch):
    """A host called 'replaced ...' made tokens that clean_staging took for old versions and removed
    while they were written; a host name with spaces or a slash made a token that is not one node."""
    import socket

    writer = StoreWriter(tmp_path / "s.zarr")
    monkeypatch.setattr(socket, "gethostname", lambda: "replaced-box/2 ü")
    staged = writer.stage()
    assert validate_id(staged.token) and not staged.token.startswith("replaced")
    assert staged.path.parent == tmp_path / "s.zarr" / "_staging"
    assert writer.clean_staging() == [] and staged.path.is_dir()  # its writer (this process) is alive

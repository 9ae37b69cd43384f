from pathlib import Path

import pytest

from pipeline.cohort import ManifestError, discover_cohort


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_discovery_is_recursive_and_reads_tcga_ids(tmp_path):
    touch(tmp_path / "a" / "TCGA-02-0001-01Z-00-DX1.83fce43e-42ac-4dcd-b156-2908e75f2e47.svs")
    touch(tmp_path / "a" / "b" / "TCGA-02-0001-01Z-00-DX2.93fce43e-42ac-4dcd-b156-2908e75f2e47.svs")
    touch(tmp_path / "other.ndpi")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden" / "x.svs")
    touch(tmp_path / "dicom" / "case9" / "level_0.dcm")
    touch(tmp_path / "dicom" / "case9" / "level_1.dcm")
    cohort = discover_cohort(tmp_path)
    assert not cohort.problems
    ids = sorted((s.patient_id, s.slide_id) for s in cohort.slides)
    assert ids == [
        ("TCGA-02-0001", "TCGA-02-0001-01Z-00-DX1"),
        ("TCGA-02-0001", "TCGA-02-0001-01Z-00-DX2"),
        ("case9", "case9"),
        ("other", "other"),
    ]
    assert len(cohort.patients()["TCGA-02-0001"]) == 2


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    touch(tmp_path / "slides" / "s1.svs")
    (tmp_path / "m.csv").write_text(
        "slide_path,patient_id,slide_id,label,split,mpp\n"
        "slides/s1.svs,P1,S1,tumour,train,0.25\n"
        f"{tmp_path / 'slides' / 's2.svs'},P1,,tumour,train,\n"
    )
    cohort = discover_cohort(tmp_path / "m.csv")
    assert not cohort.problems
    s1, s2 = cohort.slides
    assert s1.path == tmp_path / "slides" / "s1.svs" and s1.mpp == 0.25 and s1.label == "tumour"
    assert s2.slide_id == "s2" and s2.mpp is None


def test_manifest_without_required_columns_is_unusable(tmp_path):
    (tmp_path / "m.csv").write_text("path,patient\nx.svs,P\n")
    with pytest.raises(ManifestError, match="missing column.*slide_path, patient_id"):
        discover_cohort(tmp_path / "m.csv")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no such folder"):
        discover_cohort(tmp_path / "nope")


def test_ids_that_escape_the_store_are_rejected_per_row(tmp_path):
    (tmp_path / "m.csv").write_text(
        "slide_path,patient_id,slide_id\n"
        "a.svs,../../outside,A\n"
        "b.svs,P2,../B\n"
        "c.svs,P3,C/../../D\n"
        "d.svs,P4,D\n"
        "e.svs,P5,E,\n"
    )
    cohort = discover_cohort(tmp_path / "m.csv")
    assert [s.slide_id for s in cohort.slides] == ["D", "E"]
    assert len(cohort.problems) == 3
    assert all("not allowed" in p.error for p in cohort.problems)
    assert cohort.problems[0].source.endswith("m.csv:2")


def test_duplicate_slide_ids_reject_every_copy(tmp_path):
    (tmp_path / "m.csv").write_text("slide_path,patient_id,slide_id\na.svs,P1,S\nb.svs,P2,S\nc.svs,P3,T\n")
    cohort = discover_cohort(tmp_path / "m.csv")
    assert [s.slide_id for s in cohort.slides] == ["T"]
    errors = sorted(p.error for p in cohort.problems)
    assert len(errors) == 2 and all("duplicate slide id 'S'" in e for e in errors)
    assert "b.svs" in errors[0] or "b.svs" in errors[1]


def test_patient_with_two_labels_is_rejected(tmp_path):
    (tmp_path / "m.csv").write_text("slide_path,patient_id,label\na.svs,P1,x\nb.svs,P1,y\nc.svs,P2,x\n")
    cohort = discover_cohort(tmp_path / "m.csv")
    assert [s.patient_id for s in cohort.slides] == ["P2"]
    assert all("conflicting labels" in p.error for p in cohort.problems)


@pytest.mark.parametrize("bad", ["abc", "-1", "0", "1e9", "nan"])
def test_bad_mpp_in_manifest_is_a_row_problem(tmp_path, bad):
    (tmp_path / "m.csv").write_text(f"slide_path,patient_id,mpp\na.svs,P1,{bad}\n")
    cohort = discover_cohort(tmp_path / "m.csv")
    assert not cohort.slides and "mpp" in cohort.problems[0].error


def test_single_slide_file_is_a_cohort_of_one(tmp_path):
    slide = touch(tmp_path / "TCGA-02-0001-01Z-00-DX1.svs")
    cohort = discover_cohort(slide)
    assert [(s.patient_id, s.slide_id) for s in cohort.slides] == [("TCGA-02-0001", "TCGA-02-0001-01Z-00-DX1")]

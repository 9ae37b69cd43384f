import pytest

from pipeline.ids import InvalidIdError, ids_from_filename, sanitize_id, validate_id


@pytest.mark.parametrize("good", ["TCGA-02-0001", "a", "slide_1.v2", "A-b_c.9"])
def test_valid_ids_pass_unchanged(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "a..b", "__x", "has space", "é", "x" * 129, "a\\b"])
def test_invalid_ids_are_rejected_with_the_value_named(bad):
    with pytest.raises(InvalidIdError, match="slide_id"):
        validate_id(bad, kind="slide_id")


def test_sanitize_maps_explicitly_and_always_gives_a_valid_id():
    assert sanitize_id("my slide (1).svs") == "my_slide_1_.svs"
    assert sanitize_id("../../etc/passwd") == "etc_passwd"
    assert sanitize_id("__init") == "init"
    for raw in ["", "...", "///", "a..b", "ü" * 300]:
        validate_id(sanitize_id(raw))


def test_tcga_barcodes_give_patient_and_slide():
    assert ids_from_filename("/x/TCGA-02-0001-01Z-00-DX1.83fce43e-42ac-4dcd-b156-2908e75f2e47.svs") == (
        "TCGA-02-0001",
        "TCGA-02-0001-01Z-00-DX1",
    )
    assert ids_from_filename("TCGA-A1-A0SB-01A-01-TS1.svs") == ("TCGA-A1-A0SB", "TCGA-A1-A0SB-01A-01-TS1")


def test_other_names_use_the_stem_for_both():
    assert ids_from_filename("/data/case 7/slide-3.ndpi") == ("slide-3", "slide-3")
    assert ids_from_filename("weird name.tiff") == ("weird_name", "weird_name")

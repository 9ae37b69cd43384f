from pathlib import PurePosixPath, PureWindowsPath

import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ids import RESERVED_NAMES, InvalidIdError, ids_from_filename, sanitize_id, validate_id


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


# -- properties (hypothesis) -----------------------------------------------------------------------

_ALPHABET = st.characters(codec="utf-8")  # any character a manifest could hold
_NAMES = st.one_of(
    st.text(_ALPHABET, max_size=140),
    st.text("abcXYZ019._-/\\ :", max_size=12),  # near the rules: dots, dashes, separators
    st.sampled_from(sorted(RESERVED_NAMES) + ["ZARR.JSON", "__x", "..", ".", "a.", "a..b", "c:", "x" * 129]),
)


def _is_safe_node_name(name: str) -> bool:
    """A name that is one path component on POSIX and Windows, not hidden, not reserved by Zarr."""
    return (
        isinstance(name, str) and 1 <= len(name) <= 128 and name.isascii()
        and PurePosixPath(name).parts == (name,) and PureWindowsPath(name).parts == (name,)
        and name[0].isalnum() and not name.endswith(".") and ".." not in name
        and name.lower() not in RESERVED_NAMES and not any(c in name for c in " /\\:*?\"<>|\0")
    )


@settings(max_examples=400, deadline=None)
@given(_NAMES)
def test_validate_id_accepts_only_safe_single_node_names(name):
    try:
        out = validate_id(name, kind="slide_id")
    except InvalidIdError as e:
        assert "slide_id" in str(e)
        return
    assert out == name and _is_safe_node_name(name)


@settings(max_examples=400, deadline=None)
@given(_NAMES)
def test_sanitize_id_always_gives_a_valid_stable_id(raw):
    clean = sanitize_id(raw)
    assert validate_id(clean) == clean and _is_safe_node_name(clean)
    assert sanitize_id(clean) == clean


@settings(max_examples=40, deadline=None)
@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"))
def test_every_accepted_id_is_a_zarr_group_of_its_own(name):
    try:
        validate_id(name)
    except InvalidIdError:
        return
    root = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    root.create_group("other")
    root.create_group(name)
    assert sorted(k for k, _ in root.groups()) == sorted({"other", name})

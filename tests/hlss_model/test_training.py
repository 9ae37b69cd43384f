"""Sampler, model, training loop (checkpoints, exact resume), run encoders and kNN from the store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from hlss_model.augment import AugmentParams
from hlss_model.config import ConfigError, TrainConfig
from hlss_model.data import CohortIndex, HierarchicalBatchSampler, PatientDataset, collate_patients, draw_patient
from hlss_model.model import HLSSModel
from hlss_model.runs import load_run_model, run_encoder
from hlss_model.train import lr_factor, train
from pipeline.store import SlideStore
from tiny_training import tiny_config

IDENTITY = dict(p_crop=0.0, p_flip=0.0, p_rot90=0.0, p_color_jitter=0.0, p_hed_jitter=0.0, p_blur=0.0,
                p_noise=0.0, p_erase=0.0)


# -- sampling ---------------------------------------------------------------------------------


def test_index_groups_slides_by_patient(train_store):
    index = CohortIndex.from_store(train_store)
    store = SlideStore(train_store)
    assert list(index.patient_ids) == store.patients()
    for i, p in enumerate(index.patient_ids):
        assert [index.slide_keys[g] for g in index.patient_slides[i]] == [(p, s) for s in store.slides(p)]
        assert index.class_names[index.labels[i]] == store.patient_attrs(p)["label"]


def test_items_have_the_hierarchy_and_the_stored_pixels(train_store):
    index = CohortIndex.from_store(train_store)
    ds = PatientDataset(index, slides=2, tiles=3, views=2, augment=AugmentParams(out_size=64, **IDENTITY))
    store = SlideStore(train_store)
    mean = torch.tensor(ds.augment.params.mean).view(3, 1, 1)
    std = torch.tensor(ds.augment.params.std).view(3, 1, 1)
    for patient in range(index.n_patients):
        item = ds[(patient, 1000 + patient)]
        assert item["images"].shape == (2, 3, 2, 3, 64, 64)
        assert int(item["patient"]) == patient
        for s, g in enumerate(item["slides"].tolist()):
            assert g in index.patient_slides[patient]  # every slide belongs to the item's patient
            for t in range(3):
                key = int(item["tiles"][s, t])
                assert key >> 32 == g  # every tile belongs to its slide
                row = key & 0xFFFFFFFF
                assert row < index.slide_tiles[g]
                stored = torch.from_numpy(store.tiles(*index.slide_keys[g])[row]).permute(2, 0, 1).float() / 255
                np.testing.assert_allclose(item["images"][s, t, 0] * std + mean, stored, atol=1e-5)
        if len(index.patient_slides[patient]) == 1:  # a one-slide patient repeats its slide
            assert item["slides"][0] == item["slides"][1]


def test_tiles_are_drawn_without_replacement_where_possible():
    index = CohortIndex("x", ("p",), ((0,),), (("p", "s"),), (5,), (0,), ("a",), (None,))
    slides, rows = draw_patient(index, 0, slides=2, tiles=2, rng=np.random.default_rng(0))
    assert slides.tolist() == [0, 0]
    assert len(set(rows.ravel().tolist())) == 4  # the repeated slide gets fresh tiles


def test_batch_collation_shapes(train_store):
    index = CohortIndex.from_store(train_store)
    ds = PatientDataset(index, slides=2, tiles=2, views=3, augment=AugmentParams(out_size=32))
    batch = collate_patients([ds[key] for key in HierarchicalBatchSampler(index.labels, 4, seed=0).batch(0)])
    assert batch["images"].shape == (4, 2, 2, 3, 3, 32, 32)
    assert batch["slides"].shape == (4, 2) and batch["tiles"].shape == (4, 2, 2)
    assert batch["patient"].shape == batch["label"].shape == (4,)


def test_batch_sampler_is_a_function_of_seed_and_step():
    labels = (0, 1) * 10
    a = HierarchicalBatchSampler(labels, 4, seed=3)
    resumed = iter(HierarchicalBatchSampler(labels, 4, seed=3, start_step=7))
    assert next(resumed) == a.batch(7)
    epoch = [p for step in range(5) for p, _ in a.batch(step)]
    assert sorted(epoch) == list(range(20))  # one epoch visits every patient once
    assert a.batch(0) != HierarchicalBatchSampler(labels, 4, seed=4).batch(0)
    ranks = [HierarchicalBatchSampler(labels, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [x for r in ranks for x in next(iter(r))] == a.batch(0)[0::2] + a.batch(0)[1::2]


def test_balanced_sampler_evens_out_classes():
    labels = (0,) * 18 + (1,) * 2
    sampler = HierarchicalBatchSampler(labels, 4, seed=0, balanced=True)
    drawn = np.array([labels[p] for step in range(200) for p, _ in sampler.batch(step)])
    assert 0.4 < drawn.mean() < 0.6
    plain = HierarchicalBatchSampler(labels, 4, seed=0)
    assert np.mean([labels[p] for step in range(200) for p, _ in plain.batch(step)]) < 0.2


def test_batch_larger_than_cohort_is_refused():
    with pytest.raises(ValueError, match="batch of 5 patients but the cohort has 4"):
        HierarchicalBatchSampler((0, 1, 0, 1), 5)


# -- model and schedule -------------------------------------------------------------------------


def test_heads_start_from_the_attribute_embeddings():
    emb = {"patch": torch.nn.functional.normalize(torch.randn(5, 16) + 2, dim=1),
           "slide": torch.nn.functional.normalize(torch.randn(3, 16) + 2, dim=1)}
    raw = HLSSModel("resnet10t", 16, emb, head_init="raw")
    out = raw(torch.randn(2, 3, 32, 32))
    assert out["features"].shape == (2, raw.feature_dim) and out["z"].shape == (2, 16)
    assert torch.allclose(out["z"].norm(dim=1), torch.ones(2), atol=1e-5)
    for level, e in emb.items():
        assert torch.equal(raw.heads[level].weight, e) and not raw.heads[level].bias.any()
        cos = torch.nn.functional.normalize(out["z"] @ e.T, dim=1)
        assert torch.allclose(out["heads"][level], cos, atol=1e-5)
    centered = HLSSModel("resnet10t", 16, emb)
    for level, e in emb.items():
        rows = torch.nn.functional.normalize(e - e.mean(0), dim=1)
        torch.testing.assert_close(centered.heads[level].weight.data, rows)
        # the shared direction is gone: the rows no longer all point the same way
        assert (rows @ rows.T).mean() < 0.5 < (e @ e.T).mean()


def test_lr_warms_up_then_decays_by_cosine():
    f = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.01, abs=1e-3)


def test_config_rejects_typos_and_bad_values(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("sampler: {batch_sise: 4}\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="method"):
        TrainConfig.from_dict({"method": "simclr"})
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig.from_dict({"augment": {"p_flip": 1.5}})
    cfg = TrainConfig.from_dict({"optim": {"betas": [0.8, 0.9]}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# -- training -----------------------------------------------------------------------------------


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_train_writes_a_run_and_resume_is_exact(train_store, tiny_text_model, tmp_path):
    cfg = tiny_config(tiny_text_model)
    full = tmp_path / "full"
    result = train(train_store, full, cfg, progress=False)
    assert result.steps == 4 and np.isfinite(result.final_loss)
    meta = json.loads((full / "run.json").read_text())
    assert meta["method"] == "hlss" and meta["embed_dim"] == 32 and set(meta["attributes"]) == {"patch", "slide", "patient"}
    assert set(meta["split"].values()) == {"train", "test"}
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert {"hvc_patch", "hvc_slide", "hvc_patient", "ha_patch", "ha", "loss", "lr"} <= set(lines[0])
    ckpt = full / "checkpoints" / "step_00000002"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2 and (ckpt / "optimizer.pt").is_file()
    assert json.loads((full / "latest.json").read_text())["step"] == 4

    # stop after 2 steps (a 2-step run of the same config, then extend its step count by resuming)
    part = tmp_path / "part"
    interrupted = []

    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(train_store, part, cfg, progress=False, on_step=lambda s, r: (interrupted.append(s), stop_at_2(s, r)))
    assert json.loads((part / "latest.json").read_text())["step"] == 2
    train(train_store, part, None, resume=True, progress=False)
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    with pytest.raises(FileExistsError, match="--resume"):
        train(train_store, full, cfg, progress=False)
    with pytest.raises(ConfigError, match="differs"):
        train(train_store, full, cfg.replace(seed=8), resume=True, progress=False)


def test_hidisc_mode_trains_without_text(train_store, tmp_path):
    cfg = TrainConfig.from_dict({
        "method": "hidisc", "steps": 2, "device": "cpu", "log_every": 1, "checkpoint_every": 2,
        "sampler": {"batch_size": 4, "num_workers": 1, "tiles_per_slide": 2},
        "model": {"backbone": "resnet10t", "proj_dim": 24}, "augment": {"out_size": 32},
    })
    train(train_store, tmp_path / "r", cfg, progress=False)
    assert not (tmp_path / "r" / "attributes.safetensors").exists()
    model, meta = load_run_model(tmp_path / "r")
    assert meta["embed_dim"] == 24 and len(model.heads) == 0
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"patient", "slide", "patch", "loss"} <= set(line)


def test_run_encoder_rebuilds_initial_and_trained_backbones(train_store, tiny_text_model, tmp_path):
    train(train_store, tmp_path / "r", tiny_config(tiny_text_model, steps=2), progress=False)
    trained, initial = run_encoder(tmp_path / "r"), run_encoder(tmp_path / "r", initial=True)
    assert trained.fingerprint != initial.fingerprint and trained.image_size == 32
    torch.manual_seed(7)
    fresh = HLSSModel("resnet10t", 32, {k: torch.zeros(n, 32) for k, n in (("patch", 1), ("slide", 1), ("patient", 1))},
                      head_init="raw")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(initial.model(x), fresh.eval().backbone(x))


def test_torchrun_two_processes_train_with_gathered_embeddings(train_store, tiny_text_model, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    cfg = tiny_config(tiny_text_model, steps=2).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*torchrun, "-m", "hlss", "train", "--store", str(train_store), "--out",
                          str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained 2 steps") == 1  # only rank 0 reports
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    model, _ = load_run_model(tmp_path / "r")
    assert model.feature_dim > 0


def test_backbone_and_encoder_load_local_weights(tmp_path):
    from safetensors.torch import save_file

    from hlss_model.model import create_backbone
    from hlss_model.encoders import timm_encoder

    torch.manual_seed(1)
    source = create_backbone("resnet10t")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    loaded = create_backbone("resnet10t", weights)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    enc = timm_encoder("resnet10t", weights, name="w")
    assert enc.fingerprint == timm_encoder("resnet10t", weights).fingerprint != timm_encoder("resnet10t").fingerprint
    with pytest.raises(ValueError, match="do not fit"):
        create_backbone("test_resnet", weights)


def test_training_needs_only_the_store_and_clips_gradients(train_store, tmp_path):
    import shutil

    store = tmp_path / "alone.zarr"
    shutil.copytree(train_store, store)  # the slide files stay behind: training must not need them
    cfg = TrainConfig.from_dict({
        "method": "hidisc", "steps": 2, "device": "cpu", "log_every": 1, "checkpoint_every": 2,
        "sampler": {"batch_size": 4, "num_workers": 0}, "model": {"backbone": "resnet10t"},
        "optim": {"grad_clip": 0.5}, "augment": {"out_size": 32},
    })
    from unittest import mock

    with mock.patch("pipeline.reader.open_slide", side_effect=AssertionError("a slide file was opened")):
        train(store, tmp_path / "r", cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm" in x and np.isfinite(x["grad_norm"]) for x in lines)


def test_items_open_each_slide_array_once(train_store, monkeypatch):
    """Array metadata is read once per slide and process (on an object store, every read is a request);
    building the index opens each slide's tiles once more, to leave damaged slides out before training."""
    calls = []
    real = SlideStore.tiles
    index = CohortIndex.from_store(train_store)
    monkeypatch.setattr(SlideStore, "tiles", lambda self, p, s: calls.append((p, s)) or real(self, p, s))
    ds = PatientDataset(index, slides=2, tiles=2, views=1, augment=AugmentParams(out_size=32))
    for seed in range(4):
        for patient in range(index.n_patients):
            ds[(patient, seed)]
    assert calls and len(calls) == len(set(calls))


# -- restarting a start that never reached a checkpoint -------------------------------------------


def _files(folder):
    """``{relative path: bytes}`` of every file under a run folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_start_is_restarted_with_the_corrected_config(train_store, tiny_text_model, tmp_path, capsys):
    from hlss.cli import main
    from store_snapshot import assert_unchanged, snapshot

    before = snapshot(train_store)
    run = tmp_path / "run"
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump(tiny_config(tiny_text_model, sampler={"batch_size": 99}).to_dict()))
    good.write_text(yaml.safe_dump(tiny_config(tiny_text_model, steps=2).to_dict()))
    assert main(["train", "--store", str(train_store), "--out", str(run), "--config", str(bad), "--no-progress"]) == 2
    assert "batch of 99 patients" in capsys.readouterr().err
    assert (run / "run.json").is_file() and not (run / "checkpoints").exists()  # the state that blocked reruns

    assert main(["train", "--store", str(train_store), "--out", str(run), "--config", str(good), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{run}: restarted the run that never reached its first checkpoint (step 0 of 4;" in out
    assert "sampler.batch_size 99 -> 4" in out and "steps 4 -> 2" in out and "trained 2 steps" in out
    assert TrainConfig.from_yaml(run / "config.yaml").steps == 2
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert_unchanged(before, snapshot(train_store))


def test_resume_of_a_start_without_checkpoint_takes_a_changed_config(train_store, tiny_text_model, tmp_path):
    run = tmp_path / "run"

    def stop(step, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after one step, before the checkpoint at step 2
        train(train_store, run, tiny_config(tiny_text_model), progress=False, on_step=stop)
    assert (run / "metrics.jsonl").is_file() and not (run / "latest.json").exists()
    result = train(train_store, run, tiny_config(tiny_text_model, steps=2, seed=9), resume=True, progress=False)
    assert result.steps == 2 and "seed 7 -> 9" in result.restarted and "steps 4 -> 2" in result.restarted
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "run.json").read_text())["seed"] == 9
    fresh = train(train_store, tmp_path / "fresh", tiny_config(tiny_text_model), progress=False)
    assert fresh.restarted is None


def test_a_run_with_a_checkpoint_is_never_restarted(train_store, tiny_text_model, tmp_path, capsys):
    from hlss.cli import main

    run = tmp_path / "run"

    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the checkpoint of step 2 is written, then the run dies
        train(train_store, run, tiny_config(tiny_text_model), progress=False, on_step=stop_at_2)
    before = _files(run)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_config(tiny_text_model, steps=2).to_dict()))
    assert main(["train", "--store", str(train_store), "--out", str(run), "--config", str(other), "--no-progress"]) == 2
    assert "already holds a run with checkpoints; pass --resume" in capsys.readouterr().err
    assert main(["train", "--store", str(train_store), "--out", str(run), "--resume", "--steps", "2",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's own config.yaml (steps 4 -> 2)" in err and "keeps its config" in err
    assert _files(run) == before  # nothing of the run was touched, the checkpoint least of all


def test_unusable_device_or_weights_in_a_config_are_refused_before_the_run_folder_is_touched(
        train_store, tiny_text_model, tmp_path, capsys):
    from hlss.cli import main

    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"definitely not tensors")
    with pytest.raises(ConfigError, match=r"model.weights: .*w.safetensors: not a safetensors file"):
        tiny_config(tiny_text_model, model={"weights": str(garbage)})
    with pytest.raises(ConfigError, match="device 'gpu0' is not one of auto, cpu, cuda, cuda:N or mps"):
        tiny_config(tiny_text_model, device="gpu0")
    if torch.cuda.is_available():
        return
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(tiny_text_model).to_dict()))  # a failed start
    before = _files(run)
    cuda = tmp_path / "cuda.yaml"
    cuda.write_text(yaml.safe_dump(tiny_config(tiny_text_model, device="cuda").to_dict()))
    assert main(["train", "--store", str(train_store), "--out", str(run), "--config", str(cuda), "--no-progress"]) == 2
    assert "device 'cuda' asked for but CUDA is not available" in capsys.readouterr().err
    assert _files(run) == before


def test_a_start_whose_config_no_longer_reads_is_restarted(train_store, tiny_text_model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("sampler: {batch_sise: 4}\n")  # e.g. written by an older version
    (run / "notes.txt").write_text("mine")
    result = train(train_store, run, tiny_config(tiny_text_model, steps=1), progress=False)
    assert result.steps == 1 and "its config.yaml was missing or unreadable" in result.restarted
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    for done in ("latest.json", "model.safetensors", "checkpoints"):  # back to a start without a checkpoint
        shutil.rmtree(run / done) if (run / done).is_dir() else (run / done).unlink()
    (run / "config.yaml").write_text("sampler: {batch_sise: 4}\n")
    with pytest.raises(ConfigError, match="batch_sise"):  # resuming it has no config to resume with
        train(train_store, run, None, resume=True, progress=False)

"""Views made on the training device (``sampler.views_on: device``): the batched augmentation gives
the per-view CPU augmentation's views for the same draws, the workers' stored bytes decode to the
stored tiles, and training on either path follows the same losses. On a CUDA machine the GPU path
is also compared with the CPU one (skipped elsewhere)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hlss_model.augment import AugmentParams, HEAugment
from hlss_model.config import ConfigError, SamplerConfig
from hlss_model.data import CohortIndex, PatientDataset, collate_patients
from hlss_model.device_views import DeviceViews, decode_tiles, views_on
from hlss_model.train import train
from tests.tiny_training import tiny_config

EVERY_STEP = AugmentParams(out_size=48, p_noise=0.5, p_blur=0.5, p_erase=0.5, p_hed_jitter=0.5)


def _tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal((200, 140, 190), 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("params", [EVERY_STEP, AugmentParams(out_size=48), replace(EVERY_STEP, hue=0.0, contrast=0.0),
                                    AugmentParams(out_size=64, **{k: 0.0 for k in ("p_crop", "p_flip", "p_rot90")})])
def test_batched_views_are_the_per_view_views_of_the_same_draws(params):
    aug = HEAugment(params)
    tiles = [torch.from_numpy(t).permute(2, 0, 1) for t in _tiles(5, 64)] + \
            [torch.from_numpy(t).permute(2, 0, 1) for t in _tiles(2, 80, seed=1)]  # tiles of two sizes
    gen = torch.Generator().manual_seed(3)
    which = [i % len(tiles) for i in range(60)]
    draws = [aug.draw(*tiles[t].shape[1:], gen) for t in which]
    # each step is taken by some views and skipped by others
    for field in ("crop", "jitter", "hed", "blur", "noise", "erase"):
        taken = sum(getattr(d, field) is not None for d in draws)
        p = getattr(params, {"jitter": "p_color_jitter", "hed": "p_hed_jitter"}.get(field, f"p_{field}"))
        assert (0 < taken < len(draws)) if 0 < p < 1 else True
    expected = torch.stack([aug.apply(tiles[t], d) for t, d in zip(which, draws)])
    got = aug.apply_batch(tiles, draws, which)
    assert got.shape == (60, 3, params.out_size, params.out_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_draw_then_apply_is_the_augmentation():
    aug = HEAugment(EVERY_STEP)
    tile = _tiles(1, 64)[0]
    direct = aug(tile, torch.Generator().manual_seed(9))
    d = aug.draw(64, 64, torch.Generator().manual_seed(9))
    assert torch.equal(direct, aug.apply(torch.from_numpy(tile).permute(2, 0, 1), d))


def test_stored_bytes_decode_to_the_stored_tiles(train_store):
    from pipeline.store import SlideStore

    store = SlideStore(train_store)
    rec = next(iter(store.records("complete")))
    tiles = store.tiles(rec.patient_id, rec.slide_id)
    rows = np.array([3, 0, 3, tiles.shape[0] - 1])
    streams = tiles.jpeg_bytes(rows)
    assert [s[:2] for s in streams] == [b"\xff\xd8"] * 4
    decoded = decode_tiles(streams + [tiles[1]], torch.device("cpu"))
    for got, want in zip(decoded, [*tiles.get_orthogonal_selection((rows,)), tiles[1]]):
        assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1))


def test_encoded_items_make_the_decoded_items_views(train_store):
    index = CohortIndex.from_store(train_store)
    decoded = PatientDataset(index, 2, 3, 2, EVERY_STEP)
    encoded = PatientDataset(index, 2, 3, 2, EVERY_STEP, encoded=True)
    keys = [(p, 1000 + p) for p in range(4)]
    want = collate_patients([decoded[k] for k in keys])
    batch = collate_patients([encoded[k] for k in keys])
    assert len(batch["encoded"]) == 4 * 2 * 3 and len(batch["draws"]) == 4 * 2 * 3 * 2
    assert all(isinstance(e, bytes) for e in batch["encoded"])  # the CPU only read bytes
    got = DeviceViews(EVERY_STEP, torch.device("cpu"), 2, 3, 2)(batch)
    assert got.shape == want["images"].shape
    torch.testing.assert_close(got, want["images"], atol=2e-5, rtol=0)
    for k in ("patient", "slides", "tiles", "label"):
        assert torch.equal(batch[k], want[k])


def test_a_lossless_store_sends_pixels(tmp_path):
    from pipeline.config import TileCompression, TilingParams
    from pipeline.runner import tile_cohort
    from pipeline.synthetic import make_demo_cohort

    manifest = make_demo_cohort(tmp_path / "slides", n_patients=2, slides_per_patient=(1, 1), width=512, height=512,
                                seed=1)
    params = TilingParams(target_mpp=1.0, tile_size=64, compression=TileCompression.from_name("lossless"))
    assert tile_cohort(manifest, tmp_path / "s.zarr", params).exit_code == 0
    index = CohortIndex.from_store(tmp_path / "s.zarr")
    item = PatientDataset(index, 1, 2, 2, EVERY_STEP, encoded=True)[(0, 5)]
    assert all(isinstance(e, np.ndarray) and e.shape == (64, 64, 3) for e in item["encoded"])
    want = PatientDataset(index, 1, 2, 2, EVERY_STEP)[(0, 5)]["images"]
    got = DeviceViews(EVERY_STEP, torch.device("cpu"), 1, 2, 2)(collate_patients([item]))[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_views_on_setting():
    assert views_on("auto", torch.device("cpu")) == "workers"
    assert views_on("auto", torch.device("cuda", 0)) == "device"
    assert views_on("device", torch.device("cpu")) == "device"
    with pytest.raises(ConfigError, match="sampler.views_on must be one of auto, workers, device"):
        SamplerConfig(views_on="gpu")


def test_training_on_device_views_or_thread_workers_follows_the_worker_views_losses(train_store, tiny_text_model,
                                                                                   tmp_path):
    losses = {}
    for where, kind in (("workers", "process"), ("device", "process"), ("workers", "thread")):
        cfg = tiny_config(tiny_text_model, steps=3, sampler={"views_on": where, "num_workers": 1, "worker_kind": kind})
        train(train_store, tmp_path / f"{where}-{kind}", cfg, progress=False)
        lines = (tmp_path / f"{where}-{kind}" / "metrics.jsonl").read_text().splitlines()
        losses[where, kind] = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses["workers", "process"]) == 3
    np.testing.assert_allclose(losses["device", "process"], losses["workers", "process"], rtol=1e-4)
    np.testing.assert_allclose(losses["workers", "thread"], losses["workers", "process"], rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_views_match_the_cpu_views(train_store):
    index = CohortIndex.from_store(train_store)
    encoded = PatientDataset(index, 2, 3, 4, EVERY_STEP, encoded=True)
    batch = collate_patients([encoded[(p, 77 + p)] for p in range(4)])
    cpu = DeviceViews(EVERY_STEP, torch.device("cpu"), 2, 3, 4)(batch).flatten(0, 3)
    gpu = DeviceViews(EVERY_STEP, torch.device("cuda"), 2, 3, 4)(batch).flatten(0, 3).cpu()
    noisy = torch.tensor([d.noise is not None for d in batch["draws"]])
    # nvJPEG's IDCT and CUDA's kernels differ from the CPU's by about a level in places
    diff = (gpu - cpu).abs()
    assert diff[~noisy].mean() < 0.02 and diff[~noisy].quantile(0.99) < 0.1
    # noisy views: another generator's field of the same spread
    for i in torch.flatnonzero(noisy).tolist():
        std = batch["draws"][i].noise[0] / min(EVERY_STEP.std)
        assert diff[i].std() < 2 * 2**0.5 * std + 0.05


@pytest.mark.parametrize("encoded", [False, True])
def test_thread_workers_give_the_process_workers_batches(train_store, encoded):
    from hlss_model.data import ThreadLoader, make_loader

    index = CohortIndex.from_store(train_store)
    params = AugmentParams(out_size=32)
    got = {}
    for kind in ("process", "thread"):
        loader = make_loader(index, 2, 2, 2, params, batch_size=4, seed=5, start_step=3, num_workers=2,
                             encoded=encoded, worker_kind=kind)
        assert isinstance(loader, ThreadLoader) == (kind == "thread")
        it = iter(loader)
        got[kind] = [next(it) for _ in range(3)]
        del it
    for a, b in zip(got["process"], got["thread"]):
        assert a.keys() == b.keys()
        for k in a:
            if k == "encoded":
                assert a[k] == b[k]
            elif k == "draws":
                assert a[k] == b[k]
            else:
                assert torch.equal(a[k], b[k]), k


def test_worker_kind_setting():
    assert SamplerConfig(worker_kind="thread").worker_kind == "thread"
    with pytest.raises(ConfigError, match="sampler.worker_kind must be one of process, thread"):
        SamplerConfig(worker_kind="fiber")

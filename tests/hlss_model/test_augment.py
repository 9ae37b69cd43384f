"""Per-view H&E augmentation and the eval transform: shapes, determinism, every probability in use,
the HED maths against skimage, and parameter validation."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed, rgb2hsv
from torchvision.transforms.v2 import functional as TF

from hlss_model.augment import (
    AugmentParams,
    EvalTransform,
    HEAugment,
    _gaussian_blur,
    _hed_jitter,
    _hed_to_rgb,
    _rgb_to_hed,
    _rotate_hue,
)

SIZE = 32  # small views keep the statistical tests fast
ALL_OFF = {
    "p_crop": 0.0,
    "p_flip": 0.0,
    "p_rot90": 0.0,
    "p_color_jitter": 0.0,
    "p_hed_jitter": 0.0,
    "p_blur": 0.0,
    "p_noise": 0.0,
    "p_erase": 0.0,
}
# ranges whose every draw visibly changes the image (blur sigma 0.1 or noise std 0 would not)
# (and a crop of the whole 40 px tile is likely when crop_scale reaches 1)
VISIBLE = {"crop_scale": (0.3, 0.8), "blur_sigma": (0.5, 1.5), "noise_std": (0.01, 0.03)}


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    """A 40 x 40 pink-purple noisy tile: no symmetry, so every transform changes it."""
    rng = np.random.default_rng(0)
    return np.clip(rng.normal((200, 140, 190), 40, (40, 40, 3)), 0, 255).astype(np.uint8)


def _only(name: str, p: float, **extra) -> HEAugment:
    return HEAugment(AugmentParams(out_size=SIZE, **{**ALL_OFF, **VISIBLE, name: p, **extra}))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_shape_dtype_and_any_tile_size():
    aug = HEAugment(AugmentParams())
    rng = np.random.default_rng(1)
    for shape in [(256, 256, 3), (300, 200, 3), (100, 120, 3)]:
        tile = rng.integers(0, 256, shape, dtype=np.uint8)
        for t in (tile, torch.from_numpy(tile)):
            out = aug(t, _gen(0))
            assert out.shape == (3, 224, 224) and out.dtype == torch.float32
            assert out.is_contiguous() and torch.isfinite(out).all()


def test_same_seed_same_view_other_seed_other_view(tile):
    aug = HEAugment(AugmentParams(out_size=SIZE))
    assert torch.equal(aug(tile, _gen(7)), aug(tile, _gen(7)))
    assert not torch.equal(aug(tile, _gen(7)), aug(tile, _gen(8)))
    # a pickled copy (as DataLoader workers get it) draws the same views
    assert torch.equal(pickle.loads(pickle.dumps(aug))(tile, _gen(7)), aug(tile, _gen(7)))
    # generator=None uses torch's default generator (seeded per DataLoader worker)
    torch.manual_seed(3)
    first = aug(tile)
    torch.manual_seed(3)
    assert torch.equal(aug(tile), first)


def test_input_is_not_modified_and_read_only_arrays_are_accepted(tile):
    ro = tile.copy()
    ro.flags.writeable = False
    aug = HEAugment(AugmentParams(out_size=SIZE, p_erase=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug(ro, _gen(0))
    assert np.array_equal(ro, tile)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)]
)
def test_bad_tiles_are_rejected(bad):
    with pytest.raises(ValueError, match="uint8 RGB tile"):
        HEAugment(AugmentParams(out_size=SIZE))(bad)


@pytest.mark.parametrize("tile_size", [40, SIZE])
def test_all_probabilities_zero_is_the_eval_transform(tile_size):
    tile = np.random.default_rng(2).integers(0, 256, (tile_size, tile_size, 3), dtype=np.uint8)
    aug = HEAugment(AugmentParams(out_size=SIZE, **ALL_OFF))
    expected = EvalTransform(SIZE)(tile)
    for seed in range(3):
        torch.testing.assert_close(aug(tile, _gen(seed)), expected, atol=1e-5, rtol=0)


def _flipped_h(out: torch.Tensor, identity: torch.Tensor) -> bool:
    return any(torch.equal(out, v) for v in (identity.flip(-1), identity.flip(-1).flip(-2)))


@pytest.mark.parametrize("name", list(ALL_OFF))
@pytest.mark.parametrize(
    ("p", "draws", "low", "high"), [(0.0, 50, 0.0, 0.0), (0.3, 400, 0.2, 0.4), (1.0, 50, 1.0, 1.0)]
)
def test_each_probability_is_the_application_rate(tile, name, p, draws, low, high):
    identity = EvalTransform(SIZE)(tile)
    # flips: count the horizontal one alone (the vertical one is an independent p_flip draw)
    applied = _flipped_h if name == "p_flip" else (lambda out, ident: not torch.equal(out, ident))
    aug, g = _only(name, p), _gen(11)
    rate = sum(applied(aug(tile, g), identity) for _ in range(draws)) / draws
    assert low <= rate <= high, f"{name}={p}: applied to {rate:.1%} of {draws} views"


def test_flips_and_rot90_only_move_pixels(tile):
    identity = EvalTransform(SIZE)(tile)
    flips = {identity.flip(-1), identity.flip(-2), identity.flip(-1).flip(-2)}
    rotations = {torch.rot90(identity, k, dims=(-2, -1)) for k in (1, 2, 3)}
    for name, allowed in (("p_flip", flips), ("p_rot90", rotations)):
        for seed in range(10):
            out = _only(name, 1.0)(tile, _gen(seed))
            assert out.equal(identity) or any(out.equal(a) for a in allowed)


def test_hed_round_trip_matches_skimage():
    img = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    hed = _rgb_to_hed(rgb)
    # skimage scales OD by 1/-log(1e-6) and clips negative stain amounts; ours keeps them so that
    # the round trip is exact
    skimage_units = -math.log(1e-6)
    ours_hed = hed.clamp(min=0).permute(1, 2, 0).numpy() / skimage_units
    np.testing.assert_allclose(ours_hed, rgb2hed(img), atol=1e-6)
    ref_hed = rgb2hed(img)
    ours_rgb = _hed_to_rgb(torch.from_numpy(ref_hed * skimage_units).permute(2, 0, 1).float())
    np.testing.assert_allclose(ours_rgb.permute(1, 2, 0).numpy(), hed2rgb(ref_hed), atol=1e-5)
    torch.testing.assert_close(_hed_to_rgb(hed), rgb, atol=1e-5, rtol=0)


def test_hed_jitter_without_spread_is_identity_and_moves_stains_with_it():
    rgb = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (3, 48, 48), dtype=np.uint8)).float() / 255
    torch.testing.assert_close(_hed_jitter(rgb, (1.0,) * 3, (0.0,) * 3), rgb, atol=1 / 255, rtol=0)
    jittered = _hed_jitter(rgb, (1.05, 0.95, 1.0), (0.02, -0.01, 0.0))
    assert 1e-3 < (jittered - rgb).abs().mean() < 0.1


def test_hue_rotation_shifts_hsv_hue_and_keeps_intensity():
    rng = np.random.default_rng(5)
    rgb = torch.from_numpy(rng.uniform(0.3, 0.7, (3, 16, 16))).float()  # mid-saturation, no clipping
    torch.testing.assert_close(_rotate_hue(rgb, 0.0), rgb, atol=1e-6, rtol=0)
    for turns in (0.03, -0.05):
        out = _rotate_hue(rgb, turns)
        torch.testing.assert_close(out.mean(0), rgb.mean(0), atol=1e-5, rtol=0)
        shift = rgb2hsv(out.permute(1, 2, 0).numpy())[..., 0] - rgb2hsv(rgb.permute(1, 2, 0).numpy())[..., 0]
        shift = (shift + 0.5) % 1.0 - 0.5
        assert abs(np.median(shift) - turns) < 0.01


@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.5])
def test_blur_matches_torchvision(sigma):
    x = torch.rand(3, 40, 36, generator=_gen(0))
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    torch.testing.assert_close(_gaussian_blur(x, sigma), expected, atol=1e-5, rtol=0)


def test_erase_fills_a_rectangle_with_the_mean(tile):
    identity = EvalTransform(SIZE)(tile)
    out = _only("p_erase", 1.0, erase_scale=(0.1, 0.1))(tile, _gen(0))
    changed = (out != identity).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert (out[:, changed] == 0).all() and changed.sum() == box
    assert 0.05 * SIZE * SIZE < box < 0.2 * SIZE * SIZE


def test_params_dict_round_trip():
    params = AugmentParams(out_size=128, p_flip=0.25, crop_scale=(0.4, 1.0))
    d = params.to_dict()
    assert d["out_size"] == 128 and d["crop_scale"] == (0.4, 1.0) and d["mean"] == (0.485, 0.456, 0.406)
    assert AugmentParams.from_dict(d) == params
    as_yaml = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # what a YAML load gives
    loaded = AugmentParams.from_dict(as_yaml)
    assert loaded == params and hash(loaded) == hash(params) and loaded.noise_std == (0.0, 0.03)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"p_flip": 1.5}, "p_flip"),
        ({"p_erase": -0.1}, "p_erase"),
        ({"p_crop": "often"}, "p_crop"),
        ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_ratio": (1.0,)}, "crop_ratio"),
        ({"erase_scale": (0.1, 1.5)}, "erase_scale"),
        ({"noise_std": (-0.01, 0.02)}, "noise_std"),
        ({"blur_sigma": (0.1, 20.0), "out_size": 32}, "blur_sigma"),
        ({"brightness": 1.5}, "brightness"),
        ({"hue": 0.6}, "hue"),
        ({"hed_sigma": -0.1}, "hed_sigma"),
        ({"out_size": 0}, "out_size"),
        ({"out_size": 224.0}, "out_size"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentParams(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown AugmentParams keys: bogus, p_flipp"):
        AugmentParams.from_dict({"p_flip": 0.5, "bogus": 1, "p_flipp": 0.5})
    with pytest.raises(ValueError, match="mapping"):
        AugmentParams.from_dict([("p_flip", 0.5)])


@pytest.mark.parametrize("tile_size", [40, SIZE])
def test_eval_batch_equals_per_item(tile_size):
    batch = np.random.default_rng(6).integers(0, 256, (5, tile_size, tile_size, 3), dtype=np.uint8)
    ev = EvalTransform(SIZE)
    out = ev(batch)
    assert out.shape == (5, 3, SIZE, SIZE) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, torch.stack([ev(t) for t in batch]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ev(torch.from_numpy(batch)), out, atol=0, rtol=0)


def test_eval_normalises_without_resizing_at_size():
    tile = np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = torch.from_numpy(tile).permute(2, 0, 1).float() / 255
    expected = (rgb - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(EvalTransform(SIZE, mean, std)(tile), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8 RGB tile"):
        EvalTransform(SIZE)(tile.astype(np.float32))
    with pytest.raises(ValueError, match="std"):
        EvalTransform(SIZE, std=(0.2, -0.1, 0.2))

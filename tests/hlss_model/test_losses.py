"""hlss_model.losses against slow loop-per-anchor references, gradchecks, label semantics and edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hlss_model.losses import (
    AlignmentLoss,
    HiDiscLoss,
    HLSSLoss,
    HVCLoss,
    SupConLoss,
    hierarchy_labels,
)

LEVELS = ("patient", "slide", "patch")


def unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# --- references: plain Python over rows, written from the papers' formulas --------------------------


def ref_supcon(features: torch.Tensor, keys: list, tau: float, base_tau: float | None = None) -> float:
    """Khosla et al. L_out with math.exp/log; `keys[i] == keys[j]` marks positives."""
    base_tau = tau if base_tau is None else base_tau
    z = features.tolist()
    n = len(z)

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(z[i], z[j])) / tau

    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and keys[p] == keys[i]]
        if not positives:
            continue
        denominator = sum(math.exp(sim(i, a)) for a in range(n) if a != i)
        total = sum(math.log(math.exp(sim(i, p)) / denominator) for p in positives)
        losses.append(-(tau / base_tau) * total / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def ref_keys(shape: tuple[int, int, int, int], patient_ids=None, slide_ids=None, tile_ids=None):
    """Per-row (patient, slide, tile) identities of a (B, S, T, V) batch, in row-major order."""
    b_, s_, t_, v_ = shape
    keys = {level: [] for level in LEVELS}
    for b in range(b_):
        for s in range(s_):
            for t in range(t_):
                for _ in range(v_):
                    patient = b if patient_ids is None else ("id", int(patient_ids[b]))
                    slide = (b, s) if slide_ids is None else (patient, int(slide_ids[b][s]))
                    tile = (b, s, t) if tile_ids is None else (slide, int(tile_ids[b][s][t]))
                    keys["patient"].append(patient)
                    keys["slide"].append(slide)
                    keys["patch"].append(tile)
    return keys


def ref_alignment(z: torch.Tensor, attributes: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
    def softmax(v: list[float]) -> list[float]:
        m = max(v)
        e = [math.exp((x - m) / tau) for x in v]
        return [x / sum(e) for x in e]

    out = {}
    for level, texts in attributes.items():
        texts_l = texts.tolist()
        total = 0.0
        for row in z.tolist():
            scores = [sum(a * b for a, b in zip(row, e)) for e in texts_l]
            nearest = texts_l[scores.index(max(scores))]
            p, q = softmax(row), softmax(nearest)
            kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
            total += kl_pq + kl_qp
        out[level] = total / z.shape[0]
    out["loss"] = sum(out.values()) / len(attributes)
    return out


def random_ids(shape_bst: tuple[int, int, int], seed: int):
    """Ids with repeats: shared patients, repeated slides and tiles."""
    g = torch.Generator().manual_seed(seed)
    b, s, t = shape_bst
    return (
        torch.randint(0, max(b - 1, 1), (b,), generator=g),
        torch.randint(0, 2, (b, s), generator=g),
        torch.randint(0, 2, (b, s, t), generator=g),
    )


# --- SupCon -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("tau", "base_tau"), [(0.07, None), (0.5, 0.07), (1.0, 2.0)])
def test_supcon_matches_reference(seed, tau, base_tau):
    n = 12 + seed
    features = unit(n, 5, seed=seed)
    # few distinct labels: all have positives; many: several anchors have none
    for num_classes in (3, n - 2):
        labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
        got = SupConLoss(tau, base_tau)(features, labels)
        want = ref_supcon(features, labels.tolist(), tau, base_tau)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want, abs=1e-6, rel=1e-6)


def test_supcon_no_positives_is_connected_zero():
    features = unit(6, 4, seed=0).requires_grad_()
    loss = SupConLoss()(features, torch.arange(6))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_supcon_single_positive_pair_among_singletons():
    features = unit(5, 3, seed=1)
    labels = torch.tensor([0, 1, 2, 0, 3])
    want = ref_supcon(features, labels.tolist(), 0.07)
    assert SupConLoss()(features, labels).item() == pytest.approx(want, abs=1e-6, rel=1e-6)


def test_supcon_gradcheck():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # label 2 has no positive
    raw = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = SupConLoss(0.5)
    assert torch.autograd.gradcheck(lambda x: loss(F.normalize(x, dim=-1), labels), (raw.requires_grad_(),))


def test_supcon_bf16_and_fp16_compute_in_float32():
    features = unit(16, 8, seed=2, dtype=torch.float32)
    labels = torch.arange(16) % 4
    want = SupConLoss()(features, labels)
    for dtype in (torch.bfloat16, torch.float16):
        x = features.to(dtype).requires_grad_()
        got = SupConLoss()(x, labels)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(want.item(), rel=2e-2)
        got.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_supcon_stable_at_small_temperature():
    features = unit(8, 4, seed=3).float()
    loss = SupConLoss(temperature=1e-3)(features, torch.arange(8) % 2)
    assert torch.isfinite(loss)


def test_supcon_clustered_beats_random():
    labels = torch.arange(32) % 4
    clustered = F.one_hot(labels, 8).double()  # orthogonal class centres, views identical
    loss = SupConLoss()
    assert loss(clustered, labels) < loss(unit(32, 8, seed=4), labels)


def test_supcon_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError):
        SupConLoss()(unit(4, 3, seed=0), torch.arange(5))
    with pytest.raises(ValueError):
        SupConLoss(temperature=0.0)


# --- hierarchy labels and HiDisc --------------------------------------------------------------------


def positives(labels: torch.Tensor, row: int) -> set[int]:
    return {j for j in range(len(labels)) if j != row and labels[j] == labels[row]}


def test_hierarchy_labels_semantics():
    labels = hierarchy_labels((2, 2, 2), None, None, None, views=2)
    # rows are (b, s, t, v) row-major: row 0 is patient 0, slide 0, tile 0, view 0
    assert positives(labels["patient"], 0) == set(range(1, 8))
    assert positives(labels["patient"], 9) == set(range(8, 16)) - {9}
    assert positives(labels["slide"], 0) == {1, 2, 3}
    assert positives(labels["patch"], 0) == {1}

    # a one-slide patient repeats its slide: both slide positions are one slide, tiles stay distinct
    labels = hierarchy_labels((2, 2, 2), None, torch.tensor([[5, 5], [5, 6]]), None, views=2)
    assert positives(labels["slide"], 0) == set(range(1, 8))
    assert positives(labels["slide"], 8) == {9, 10, 11}  # same slide id, other patient
    assert positives(labels["patch"], 0) == {1}

    # a repeated tile id joins the views of both tile positions
    tiles = torch.tensor([[[0, 0], [0, 1]], [[0, 1], [0, 1]]])
    labels = hierarchy_labels((2, 2, 2), None, None, tiles, views=2)
    assert positives(labels["patch"], 0) == {1, 2, 3}
    assert positives(labels["patch"], 4) == {5}  # tile id 0 again, but another slide

    # the same patient at two batch positions
    labels = hierarchy_labels((2, 1, 1), torch.tensor([3, 3]), None, None, views=2)
    assert positives(labels["patient"], 0) == {1, 2, 3}
    assert positives(labels["slide"], 0) == {1}


def test_hierarchy_labels_rejects_bad_shapes():
    with pytest.raises(ValueError):
        hierarchy_labels((2, 2, 2), torch.arange(3), None, None, views=2)
    with pytest.raises(ValueError):
        hierarchy_labels((2, 2, 2), None, torch.zeros(2, 3, dtype=torch.long), None, views=2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_ids", [False, True])
def test_hidisc_matches_reference(seed, with_ids):
    shape = (2, 2, 2, 2) if seed != 2 else (3, 2, 1, 2)
    emb = unit(*shape, 6, seed=seed)
    ids = random_ids(shape[:3], seed) if with_ids else (None, None, None)
    weights = (1.0, 0.5, 2.0)
    loss = HiDiscLoss(0.1, *weights)
    out = loss(emb, *ids)
    keys = ref_keys(shape, *ids)
    flat = emb.reshape(-1, 6)
    for level in LEVELS:
        assert out[level].item() == pytest.approx(ref_supcon(flat, keys[level], 0.1), abs=1e-6, rel=1e-6)
    want = sum(w * out[level] for w, level in zip(weights, LEVELS))
    assert out["loss"].item() == pytest.approx(want.item(), abs=1e-12)
    assert set(out) == {*LEVELS, "loss"}


def test_hidisc_zero_lambda_skips_level():
    emb = unit(2, 2, 2, 2, 4, seed=0)
    out = HiDiscLoss(lambda_slide=0.0)(emb)
    assert out["slide"].item() == 0.0 and torch.is_tensor(out["slide"])
    assert out["loss"].item() == pytest.approx((out["patient"] + out["patch"]).item(), abs=1e-12)


def test_hidisc_single_view_patch_level_has_no_positives():
    emb = unit(2, 1, 2, 1, 4, seed=0).requires_grad_()
    out = HiDiscLoss()(emb)
    assert out["patch"].item() == 0.0 and out["patch"].grad_fn is not None
    out["loss"].backward()
    assert torch.isfinite(emb.grad).all()


def test_hidisc_gradcheck():
    raw = torch.randn(2, 1, 2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = HiDiscLoss(0.5)
    assert torch.autograd.gradcheck(
        lambda x: loss(F.normalize(x, dim=-1))["loss"], (raw.requires_grad_(),)
    )


def test_hidisc_bf16():
    emb = unit(2, 2, 2, 2, 8, seed=5, dtype=torch.float32)
    want = HiDiscLoss()(emb)["loss"].item()
    got = HiDiscLoss()(emb.bfloat16())["loss"]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=2e-2)


# --- HVC ----------------------------------------------------------------------------------------------

ATTRIBUTE_COUNTS = {"patch": 5, "slide": 4, "patient": 3}


def make_heads(shape: tuple[int, int, int, int], seed: int) -> dict[str, torch.Tensor]:
    return {level: unit(*shape, a, seed=seed + i) for i, (level, a) in enumerate(ATTRIBUTE_COUNTS.items())}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_ids", [False, True])
def test_hvc_matches_reference(seed, with_ids):
    shape = (2, 2, 2, 2)
    heads = make_heads(shape, seed)
    ids = random_ids(shape[:3], seed + 10) if with_ids else (None, None, None)
    out = HVCLoss(0.2, 0.3, 1.0, 1.5)(heads, *ids)
    keys = ref_keys(shape, *ids)
    want = {}
    for level in LEVELS:
        flat = heads[level].reshape(-1, ATTRIBUTE_COUNTS[level])
        want[level] = ref_supcon(flat, keys[level], 0.2)
        assert out[level].item() == pytest.approx(want[level], abs=1e-6, rel=1e-6)
    total = 0.3 * want["patient"] + 1.0 * want["slide"] + 1.5 * want["patch"]
    assert out["loss"].item() == pytest.approx(total, abs=1e-6, rel=1e-6)


def test_hvc_gradcheck():
    g = torch.Generator().manual_seed(2)
    raws = [torch.randn(2, 1, 2, 2, a, dtype=torch.float64, generator=g) for a in ATTRIBUTE_COUNTS.values()]
    loss = HVCLoss(0.5)

    def f(*xs):
        heads = {level: F.normalize(x, dim=-1) for level, x in zip(ATTRIBUTE_COUNTS, xs)}
        return loss(heads)["loss"]

    assert torch.autograd.gradcheck(f, tuple(r.requires_grad_() for r in raws))


def test_hvc_rejects_mismatched_heads():
    heads = make_heads((2, 2, 2, 2), 0)
    heads["slide"] = unit(2, 2, 2, 3, 4, seed=0)
    with pytest.raises(ValueError):
        HVCLoss()(heads)


# --- alignment and HLSS ------------------------------------------------------------------------------


def make_attributes(dim: int, seed: int) -> dict[str, torch.Tensor]:
    return {level: unit(a, dim, seed=100 + seed + i) for i, (level, a) in enumerate(ATTRIBUTE_COUNTS.items())}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_alignment_matches_reference(seed, tau):
    z = unit(10, 6, seed=seed)
    attributes = make_attributes(6, seed)
    out = AlignmentLoss(tau)(z, attributes)
    want = ref_alignment(z, attributes, tau)
    assert set(out) == {*ATTRIBUTE_COUNTS, "loss"}
    for key, value in want.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6, rel=1e-6)


def test_alignment_gradcheck():
    raw = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    attributes = make_attributes(5, 0)
    loss = AlignmentLoss(0.5)
    assert torch.autograd.gradcheck(
        lambda x: loss(F.normalize(x, dim=-1), attributes)["loss"], (raw.requires_grad_(),)
    )


def test_alignment_gradient_reaches_z_not_attributes():
    z = unit(6, 5, seed=0).requires_grad_()
    attributes = {k: v.requires_grad_() for k, v in make_attributes(5, 0).items()}
    AlignmentLoss()(z, attributes)["loss"].backward()
    assert z.grad.abs().sum() > 0
    assert all(v.grad is None for v in attributes.values())


def hlss_inputs(raw_z: torch.Tensor, seed: int):
    """Heads as a (fixed) linear text head per level on z, as in HLSS."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(raw_z, dim=-1)
    heads = {
        level: F.normalize(z @ torch.randn(z.shape[-1], a, dtype=z.dtype, generator=g), dim=-1)
        for level, a in ATTRIBUTE_COUNTS.items()
    }
    return heads, z


def test_hlss_alignment_changes_gradient_of_z():
    raw = torch.randn(2, 2, 2, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attributes = make_attributes(6, 0)
    grads = {}
    for weight in (0.0, 1.0):
        x = raw.clone().requires_grad_()
        heads, z = hlss_inputs(x, seed=1)
        out = HLSSLoss(HVCLoss(0.1), AlignmentLoss(), alignment_weight=weight)(heads, z, attributes)
        out["loss"].backward()
        grads[weight] = x.grad
    assert not torch.allclose(grads[0.0], grads[1.0])

    x = raw.clone().requires_grad_()
    z = F.normalize(x, dim=-1)
    AlignmentLoss()(z.reshape(-1, 6), attributes)["loss"].backward()
    assert x.grad.abs().sum() > 0


def test_hlss_output_keys_and_sum():
    raw = torch.randn(2, 2, 2, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    heads, z = hlss_inputs(raw, seed=2)
    attributes = make_attributes(6, 1)
    ids = random_ids((2, 2, 2), 3)
    hvc, alignment = HVCLoss(0.1, 1.0, 0.5, 2.0), AlignmentLoss(0.5)
    out = HLSSLoss(hvc, alignment, alignment_weight=0.25)(heads, z, attributes, *ids)
    assert set(out) == {
        "hvc_patient", "hvc_slide", "hvc_patch", "ha_patch", "ha_slide", "ha_patient", "hvc", "ha", "loss"
    }
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in out.values())
    want_hvc = hvc(heads, *ids)
    want_ha = alignment(z.reshape(-1, 6), attributes)
    for level in LEVELS:
        assert torch.equal(out[f"hvc_{level}"], want_hvc[level])
        assert torch.equal(out[f"ha_{level}"], want_ha[level])
    assert out["loss"].item() == pytest.approx((want_hvc["loss"] + 0.25 * want_ha["loss"]).item(), abs=1e-12)


def test_hlss_gradcheck():
    raw = torch.randn(2, 1, 2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    attributes = make_attributes(4, 2)
    loss = HLSSLoss(HVCLoss(0.5), AlignmentLoss(0.5))
    assert torch.autograd.gradcheck(
        lambda x: loss(*hlss_inputs(x, seed=5), attributes)["loss"], (raw.requires_grad_(),)
    )


def test_hlss_visual_term_adds_hidisc_on_z():
    torch.manual_seed(0)
    B, S, T, V, D = 3, 2, 2, 2, 8
    z = F.normalize(torch.randn(B, S, T, V, D, dtype=torch.float64), dim=-1)
    heads = {lvl: F.normalize(torch.randn(B, S, T, V, n, dtype=torch.float64), dim=-1)
             for lvl, n in (("patch", 5), ("slide", 4), ("patient", 3))}
    attrs = {lvl: F.normalize(torch.randn(n, D, dtype=torch.float64), dim=-1) for lvl, n in (("patch", 5), ("slide", 4))}
    plain = HLSSLoss(HVCLoss(), AlignmentLoss(), alignment_weight=0.5)(heads, z, attrs)
    mixed = HLSSLoss(HVCLoss(), AlignmentLoss(), alignment_weight=0.5, visual=HiDiscLoss(), visual_weight=2.0)(heads, z, attrs)
    hidisc = HiDiscLoss()(z)
    assert "vis" not in plain
    torch.testing.assert_close(mixed["vis"], hidisc["loss"])
    torch.testing.assert_close(mixed["loss"], plain["loss"] + 2.0 * hidisc["loss"])

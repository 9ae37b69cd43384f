import json
import math

import numpy as np
import pytest
import torch

from hlss_model.knn import FeatureTable, knn_evaluate, knn_scores, split_patients


def _reference_scores(train, labels, query, n_classes, k, temperature):
    """Explicit-loop weighted kNN: sort all neighbours by cosine, weight the top k by exp(sim / T)."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train = [unit(row) for row in train.tolist()]
    out = []
    for q in query.tolist():
        q = unit(q)
        sims = sorted(((sum(a * b for a, b in zip(q, t)), i) for i, t in enumerate(train)), reverse=True)
        row = [0.0] * n_classes
        for sim, i in sims[:k]:
            row[int(labels[i])] += math.exp(sim / temperature)
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize(
    "n, m, k, chunk_size, as_torch",
    [(50, 23, 7, 5, False), (12, 9, 200, 4, True), (30, 17, 30, 4096, False)],
)
def test_knn_scores_match_loop_reference(n, m, k, chunk_size, as_torch):
    rng = np.random.default_rng(n)
    train = rng.normal(size=(n, 8)) * rng.uniform(0.5, 3, size=(n, 1))  # norms vary: cosine must ignore them
    labels = rng.integers(0, 4, size=n)
    query = rng.normal(size=(m, 8))
    args = (train, labels, query)
    if as_torch:
        args = tuple(torch.as_tensor(a) for a in args)
    got = knn_scores(*args, n_classes=4, k=k, temperature=0.1, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (m, 4)
    want = _reference_scores(train, labels, query, 4, min(k, n), 0.1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_knn_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        knn_scores(np.zeros((0, 4)), np.zeros(0, int), np.ones((2, 4)), 2)
    with pytest.raises(ValueError, match="labels"):
        knn_scores(np.ones((3, 4)), np.array([0, 1, 2]), np.ones((2, 4)), 2)


def _clustered_table(rng, n_patients_per_class, n_classes=3, slides=2, tiles=5, noise=0.05, start=0):
    centers = np.eye(n_classes, 16) * 5
    feats, labels, slide_ids, patient_ids = [], [], [], []
    for c in range(n_classes):
        for p in range(n_patients_per_class):
            pid = f"P{c}-{start + p}"
            for s in range(slides):
                feats.append(centers[c] + noise * rng.normal(size=(tiles, 16)))
                labels += [c] * tiles
                slide_ids += [f"{pid}-S{s}"] * tiles
                patient_ids += [pid] * tiles
    return FeatureTable(np.concatenate(feats), np.array(labels), slide_ids, patient_ids)


def test_separated_clusters_are_perfect_at_every_level():
    rng = np.random.default_rng(0)
    train = _clustered_table(rng, 4)
    test = _clustered_table(rng, 2, start=10)
    report = knn_evaluate(train, test, ["a", "b", "c"], k=20)
    assert set(report.levels) == {"tile", "slide", "patient"}
    for level, n in (("tile", 60), ("slide", 12), ("patient", 6)):
        r = report.levels[level]
        assert (r.n, r.accuracy, r.mean_class_accuracy) == (n, 1.0, 1.0)
        assert r.per_class == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert (report.n_train_tiles, report.n_test_tiles) == (120, 60)


def test_slide_decision_sums_scores_rather_than_voting():
    # one training tile per class, k=2: a tile's scores are (exp(cos_0 / T), exp(cos_1 / T))
    train = FeatureTable(np.eye(2), np.array([0, 1]), ["t0", "t1"], ["tp0", "tp1"])
    # two tiles lean barely to class 1, one sits squarely on class 0
    feats = np.array([[1.0, 1.1], [1.0, 1.1], [1.0, 0.0]])
    test = FeatureTable(feats, np.array([0, 0, 0]), ["S"] * 3, ["P"] * 3)

    scores = knn_scores(train.features, train.labels, feats, 2, k=2)
    assert scores.argmax(1).tolist() == [1, 1, 0]  # majority vote would say class 1
    assert scores.sum(0).argmax().item() == 0  # summed scores say class 0

    report = knn_evaluate(train, test, ["neg", "pos"], k=2)
    assert report.levels["tile"].accuracy == pytest.approx(1 / 3)
    assert report.levels["slide"].accuracy == 1.0
    assert report.levels["patient"].accuracy == 1.0


def test_mean_class_accuracy_on_imbalanced_test_set():
    rng = np.random.default_rng(1)
    centers = np.array([[5.0, 0, 0], [0, 5.0, 0]])
    train_feats = np.concatenate([c + 0.05 * rng.normal(size=(10, 3)) for c in centers])
    train = FeatureTable(train_feats, np.repeat([0, 1], 10), [f"s{i}" for i in range(20)], [f"p{i}" for i in range(20)])
    # 8 class-0 tiles, 2 class-1 tiles of which one lies in the class-0 cluster; one tile per slide/patient
    test_feats = centers[[0] * 8 + [1, 0]] + 0.05 * rng.normal(size=(10, 3))
    ids = [f"q{i}" for i in range(10)]
    test = FeatureTable(test_feats, np.array([0] * 8 + [1, 1]), ids, ids)

    report = knn_evaluate(train, test, ["x", "y", "unused"], k=5)
    for level in ("tile", "slide", "patient"):
        r = report.levels[level]
        assert r.accuracy == pytest.approx(9 / 10)
        assert r.per_class == {"x": 1.0, "y": 0.5}  # absent classes are not averaged in
        assert r.mean_class_accuracy == pytest.approx((8 / 8 + 1 / 2) / 2)


@pytest.mark.parametrize("mixed", ["slide", "patient"])
def test_mixed_label_group_raises(mixed):
    rng = np.random.default_rng(2)
    train = _clustered_table(rng, 2, n_classes=2)
    slides = ["S0", "S0", "S1", "S1"] if mixed == "slide" else ["S0", "S1", "S2", "S3"]
    test = FeatureTable(rng.normal(size=(4, 16)), np.array([0, 1, 1, 1]), slides, ["P0", "P0", "P1", "P1"])
    with pytest.raises(ValueError, match=f"{mixed}.*mix"):
        knn_evaluate(train, test, ["a", "b"])


def test_empty_test_set_raises():
    rng = np.random.default_rng(3)
    train = _clustered_table(rng, 1, n_classes=2)
    empty = FeatureTable(np.zeros((0, 16)), np.zeros(0, dtype=int), [], [])
    with pytest.raises(ValueError, match="empty"):
        knn_evaluate(train, empty, ["a", "b"])


def test_report_table_and_json():
    rng = np.random.default_rng(4)
    report = knn_evaluate(_clustered_table(rng, 2), _clustered_table(rng, 1, start=5), ["a", "b", "c"], k=10)
    table = report.table()
    lines = table.splitlines()
    assert len(lines) == 4 and "accuracy" in lines[0] and "MCA" in lines[0]
    for level, line in zip(("tile", "slide", "patient"), lines[1:]):
        assert line.split()[0] == level and "100.0%" in line
    assert len({len(line) for line in lines}) == 1  # fixed width

    loaded = json.loads(report.to_json())
    assert loaded == report.to_dict()
    assert loaded["levels"]["slide"]["n"] == 6 and loaded["k"] == 10


def test_split_patients_follows_manifest():
    labels = {"a": 0, "b": 0, "c": 1, "d": 1}
    manifest = {"a": "train", "b": "Val", "c": "heldout", "d": "train", "other": "test"}
    assert split_patients(labels, manifest) == {"a": "train", "b": "test", "c": "test", "d": "train"}


def test_split_patients_rejects_partial_manifest_and_unknown_values():
    labels = {"a": 0, "b": 0, "c": 1}
    with pytest.raises(ValueError, match=r"no split.*\['b', 'c'\]"):
        split_patients(labels, {"a": "train", "b": None})
    with pytest.raises(ValueError, match="'bogus'.*'c'"):
        split_patients(labels, {"a": "train", "b": "test", "c": "bogus"})


def test_stratified_split_is_seeded_and_keeps_classes_on_both_sides():
    labels = {f"p{i:02d}": ("tumour" if i % 3 else "normal") for i in range(20)}
    labels["solo"] = "rare"
    labels["duo1"] = labels["duo2"] = "pair"
    empty = {p: None for p in labels}

    split = split_patients(labels, empty, held_out_fraction=0.3, seed=7)
    shuffled = dict(sorted(labels.items(), reverse=True))
    assert split_patients(shuffled, {}, held_out_fraction=0.3, seed=7) == split
    assert any(split_patients(labels, {}, seed=s) != split for s in range(1, 5))

    assert set(split) == set(labels) and set(split.values()) == {"train", "test"}
    for cls, n_test in (("normal", 2), ("tumour", 4), ("pair", 1), ("rare", 0)):
        members = [p for p, c in labels.items() if c == cls]
        assert sum(split[p] == "test" for p in members) == n_test, cls  # round(0.3 * 7) = 2, round(0.3 * 13) = 4

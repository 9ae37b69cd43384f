"""Feature extraction into the store: alignment, one read for several encoders, resume, failures,
retiling, kNN from stored features and the ``extract`` / ``knn`` / ``train`` commands."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hlss_model import extract as features_mod
from hlss.cli import main
from hlss_model.encoders import timm_encoder
from hlss_model.extract import extract_features
from pipeline.store import SlideStore, StoreError, StoreWriter, tiles_version

BATCH = 16


def _copy(train_store: Path, tmp_path: Path, name: str = "store.zarr", patients: int | None = None) -> Path:
    """A private copy of the session-shared store (tests must never modify ``train_store`` itself).

    ``patients`` keeps only the first few patients (fewer slides, faster extraction).
    """
    keep = None if patients is None else set(SlideStore(train_store).patients()[:patients])

    def ignore(folder, names):
        if keep is None or Path(folder).name != "patients":
            return []
        return [n for n in names if (Path(folder) / n).is_dir() and n not in keep]

    dst = tmp_path / name
    shutil.copytree(train_store, dst, ignore=ignore)
    return dst


def _slides(store: Path) -> list[tuple[str, str]]:
    return [(r.patient_id, r.slide_id) for r in SlideStore(store).records(status="complete")]


def _staged_dirs(store: Path) -> list[Path]:
    staging = store / "_staging"
    return sorted(p for p in staging.iterdir() if p.is_dir()) if staging.exists() else []


def _features(store: Path, name: str) -> dict[tuple[str, str], np.ndarray]:
    st = SlideStore(store)
    return {(p, s): st.features(p, s, name)[:] for p, s in _slides(store)}


# -- alignment and attributes -------------------------------------------------------------------


def test_features_are_aligned_with_tiles_and_attributed(train_store, tmp_path):
    store = _copy(train_store, tmp_path, patients=3)
    enc = timm_encoder("resnet10t", name="r10")
    report = extract_features(store, [enc], batch_size=BATCH, device="cpu")
    slides = _slides(store)
    assert report.exit_code == 0 and not report.failed and not report.skipped
    assert report.extracted == slides
    st = SlideStore(store)
    assert report.tiles == sum(st.slide_attrs(p, s)["n_tiles"] for p, s in slides)

    p, s = slides[0]
    arr = st.features(p, s, "r10")
    tiles = st.tiles(p, s)
    n = tiles.shape[0]
    assert n > BATCH  # several batches, so batch boundaries are exercised
    assert arr.shape == (n, enc.dim) == (st.coords(p, s).shape[0], 512)
    assert arr.dtype == np.float32
    a = dict(arr.attrs)
    assert a["model"] == enc.source and a["model"].startswith("timm:resnet10t")
    assert a["weights_fingerprint"] == enc.fingerprint
    assert a["dtype"] == "float32" and a["complete"] is True and a["n"] == n
    assert a["tiles_version"] == tiles_version(st.slide_attrs(p, s))
    assert st.feature_names(p, s) == ["r10"]

    stored = arr[:]
    ref = timm_encoder("resnet10t")  # same seed, same weights, untouched by extraction
    assert ref.fingerprint == enc.fingerprint
    with torch.inference_mode():
        for i in (0, 1, BATCH - 1, BATCH, n - 1):  # one tile at a time: row i must be tile i
            direct = ref.model.eval()(ref.preprocess(torch.from_numpy(tiles[i:i + 1]))).numpy()[0]
            np.testing.assert_allclose(stored[i], direct, rtol=1e-4, atol=1e-4, err_msg=f"row {i}")
        # a shuffled row would not match: the tiles differ enough for the features to differ
        other = ref.model(ref.preprocess(torch.from_numpy(tiles[1:2]))).numpy()[0]
        assert not np.allclose(stored[0], other, rtol=1e-4, atol=1e-4)


# -- several encoders, one read ---------------------------------------------------------------


def _count_reads(monkeypatch) -> tuple[Counter, Counter]:
    """Count tile-array reads (calls) and tile rows read, per slide, during extraction."""
    calls, rows = Counter(), Counter()
    real = features_mod.SlideStore.tiles

    class Counting:
        def __init__(self, arr, key):
            self.arr, self.key = arr, key

        def __getitem__(self, index):
            block = self.arr[index]
            calls[self.key] += 1
            rows[self.key] += len(block)
            return block

    def tiles(self, p, s):
        return Counting(real(self, p, s), (p, s))

    monkeypatch.setattr(features_mod.SlideStore, "tiles", tiles)
    return calls, rows


def test_several_encoders_read_each_slide_once(train_store, tmp_path, monkeypatch):
    both = _copy(train_store, tmp_path, "both.zarr", patients=3)
    calls, rows = _count_reads(monkeypatch)
    report = extract_features(both, [timm_encoder("test_resnet", name="a"), timm_encoder("test_convnext", name="b")],
                              batch_size=BATCH, device="cpu")
    slides = _slides(both)
    assert report.exit_code == 0 and report.extracted == slides
    st = SlideStore(both)
    n = {key: st.slide_attrs(*key)["n_tiles"] for key in slides}
    assert dict(calls) == {key: -(-n[key] // BATCH) for key in slides}  # one read per batch, whatever the encoders
    assert dict(rows) == n  # every tile read exactly once
    for p, s in slides:
        assert st.feature_names(p, s) == ["a", "b"]

    # each array equals what a single-encoder run writes
    monkeypatch.undo()
    single = {}
    for name, model in (("a", "test_resnet"), ("b", "test_convnext")):
        one = _copy(train_store, tmp_path, f"{name}.zarr", patients=3)
        assert extract_features(one, [timm_encoder(model, name=name)], batch_size=BATCH, device="cpu").exit_code == 0
        single[name] = _features(one, name)
    for name in ("a", "b"):
        got = _features(both, name)
        assert got.keys() == single[name].keys()
        for key in got:
            np.testing.assert_allclose(got[key], single[name][key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")

    # adding an encoder later reads each slide once more and leaves the finished one alone
    calls, rows = _count_reads(monkeypatch)
    before = {key: dict(st.features(*key, "a").attrs) for key in slides}
    report = extract_features(both, [timm_encoder("test_resnet", name="a"), timm_encoder("resnet10t", name="c")],
                              batch_size=BATCH, device="cpu")
    assert report.extracted == slides and dict(rows) == n
    st = SlideStore(both)
    for key in slides:
        assert st.feature_names(*key) == ["a", "b", "c"]
        assert dict(st.features(*key, "a").attrs) == before[key]
        np.testing.assert_allclose(st.features(*key, "a")[:], single["a"][key], rtol=1e-5, atol=1e-6)


def test_encoder_names_must_differ_and_dtype_is_checked(train_store):
    enc = timm_encoder("test_resnet", name="x")
    with pytest.raises(ValueError, match="differ"):
        extract_features(train_store, [enc, timm_encoder("test_convnext", name="x")], device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        extract_features(train_store, [enc], dtype="int8", device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        extract_features(train_store, [], device="cpu")


# -- rerun, force, new weights, float16 ---------------------------------------------------------


def test_rerun_skips_force_and_new_weights_recompute_float16(train_store, tmp_path):
    store = _copy(train_store, tmp_path, patients=3)
    slides = _slides(store)
    first = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu")
    assert first.extracted == slides
    f0 = _features(store, "f")
    fp0 = timm_encoder("test_resnet").fingerprint

    seen = []
    again = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu",
                             on_slide=lambda p, s, status: seen.append(status))
    assert again.skipped == slides and not again.extracted and again.tiles == 0 and again.exit_code == 0
    assert seen == ["skipped"] * len(slides)

    forced = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu",
                              force=True)
    assert forced.extracted == slides and not forced.skipped
    for key, v in _features(store, "f").items():
        np.testing.assert_allclose(v, f0[key], rtol=1e-5, atol=1e-6)

    other = timm_encoder("test_resnet", name="f", seed=1)
    assert other.fingerprint != fp0
    changed = extract_features(store, [other], batch_size=BATCH, device="cpu")
    assert changed.extracted == slides and not changed.skipped
    st = SlideStore(store)
    p, s = slides[0]
    assert st.features(p, s, "f").attrs["weights_fingerprint"] == other.fingerprint
    assert "seed=1" in st.features(p, s, "f").attrs["model"]
    assert not np.allclose(st.features(p, s, "f")[:], f0[(p, s)])

    half = extract_features(store, [timm_encoder("test_resnet", name="h")], batch_size=BATCH, device="cpu",
                            dtype="float16")
    assert half.extracted == slides
    st = SlideStore(store)
    for key in slides:
        arr = st.features(*key, "h")
        assert arr.dtype == np.float16 and arr.attrs["dtype"] == "float16"
        np.testing.assert_allclose(arr[:].astype(np.float32), f0[key], rtol=1e-2, atol=1e-2)
    # float16 features are finished work too
    assert extract_features(store, [timm_encoder("test_resnet", name="h")], batch_size=BATCH, device="cpu",
                            dtype="float16").skipped == slides


# -- interruption -------------------------------------------------------------------------------


def _mark_owner_dead(staged: Path) -> None:
    """Make a staging group look like it belongs to a process that has exited (as after Ctrl-C)."""
    meta = staged / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["owner"]["pid"] = 2 ** 22 + 12345  # above the default pid_max: never a live process
    meta.write_text(json.dumps(doc))


def test_interrupted_run_resumes_with_the_remainder(train_store, tmp_path):
    store = _copy(train_store, tmp_path, patients=3)
    slides = _slides(store)
    done: list[tuple[str, str]] = []

    def on_slide(p, s, status):
        assert status == "extracted"
        done.append((p, s))

    def on_tiles(n):
        if done:  # the first batch after the first slide finished
            raise KeyboardInterrupt

    enc = timm_encoder("test_resnet", name="f")
    with pytest.raises(KeyboardInterrupt):
        extract_features(store, [enc], batch_size=BATCH, device="cpu", on_slide=on_slide, on_tiles=on_tiles)
    assert done == slides[:1]
    st = SlideStore(store)
    first, second = slides[0], slides[1]
    assert st.feature_names(*first) == ["f"]
    arr = st.features(*first, "f")
    assert arr.attrs["complete"] is True and arr.shape == (st.slide_attrs(*first)["n_tiles"], enc.dim)
    assert st.feature_names(*second) == []
    assert not (store / "patients" / second[0] / "slides" / second[1] / "features").exists()
    for p, s in slides[1:]:
        assert st.feature_names(p, s) == []

    # what is left in _staging (at most the interrupted slide's unfinished array) is never marked complete
    left = _staged_dirs(store)
    assert len(left) <= 1
    for d in left:
        for meta in d.rglob("zarr.json"):
            doc = json.loads(meta.read_text())
            assert not doc.get("attributes", {}).get("complete")

    for d in left:
        _mark_owner_dead(d)
    resumed = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu")
    assert resumed.skipped == slides[:1] and resumed.extracted == slides[1:] and not resumed.failed
    assert _staged_dirs(store) == []
    st = SlideStore(store)
    assert all(st.feature_names(p, s) == ["f"] for p, s in slides)


def test_interrupt_discards_staged_arrays_in_a_live_process(train_store, tmp_path):
    store = _copy(train_store, tmp_path, patients=1)

    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu",
                         on_tiles=stop)
    extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu")
    assert _staged_dirs(store) == []


# -- a bad slide ----------------------------------------------------------------------------------


def test_a_corrupt_slide_fails_alone(train_store, tmp_path):
    store = _copy(train_store, tmp_path, patients=3)
    slides = _slides(store)
    bad = slides[2]
    chunk_dir = store / "patients" / bad[0] / "slides" / bad[1] / "tiles" / "c"
    files = [f for f in chunk_dir.rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())

    statuses = {}
    report = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu",
                              on_slide=lambda p, s, status: statuses.__setitem__((p, s), status))
    assert report.exit_code == 1
    assert [(p, s) for p, s, _ in report.failed] == [bad]
    assert report.failed[0][2]  # the error is named
    assert report.extracted == [key for key in slides if key != bad]
    assert statuses[bad] == "failed" and all(statuses[k] == "extracted" for k in slides if k != bad)
    st = SlideStore(store)
    assert st.feature_names(*bad) == []
    assert all(st.feature_names(*k) == ["f"] for k in slides if k != bad)
    assert _staged_dirs(store) == []  # the failed slide's staged array was discarded


# -- retiling -------------------------------------------------------------------------------------


def test_retiling_a_slide_drops_its_features(train_store, tmp_path):
    from pipeline.config import TilingParams
    from pipeline.runner import tile_cohort

    store = _copy(train_store, tmp_path, patients=3)
    slides = _slides(store)
    assert extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH,
                            device="cpu").exit_code == 0
    target = slides[0]
    old_version = tiles_version(SlideStore(store).slide_attrs(*target))

    # a one-slide manifest (absolute paths) retiles only that slide, with other parameters
    manifest = train_store.parent / "slides" / "manifest.csv"
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if (r["patient_id"], r["slide_id"]) == target)
    row["slide_path"] = str((manifest.parent / row["slide_path"]).resolve())
    one = tmp_path / "one.csv"
    with one.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    # stage an array for the slide as an extraction would, from the tiles it had before retiling
    writer = StoreWriter(store)
    n_old = SlideStore(store).slide_attrs(*target)["n_tiles"]
    staged = writer.stage_features(n_old, 4)
    staged[:] = 1.0

    params = TilingParams(target_mpp=1.0, tile_size=64, min_tissue=0.6)
    refused = tile_cohort(one, store, params)  # retiling would drop "f": only when asked
    assert refused.exit_code == 1 and "features/f" in refused.table() and "--drop-derived" in refused.table()
    assert tiles_version(SlideStore(store).slide_attrs(*target)) == old_version
    report = tile_cohort(one, store, params, drop_derived=True)
    assert report.exit_code == 0 and report.dropped == {target: ["features/f"]}
    st = SlideStore(store)
    new_attrs = st.slide_attrs(*target)
    assert tiles_version(new_attrs) != old_version
    assert st.feature_names(*target) == []  # gone with the replaced group
    assert all(st.feature_names(*k) == ["f"] for k in slides[1:])

    with pytest.raises(StoreError, match="changed"):
        writer.commit_features(staged, *target, "late", {"model": "x"}, old_version)
    assert SlideStore(store).feature_names(*target) == []
    assert _staged_dirs(store) == []

    # the next extraction computes the retiled slide only, aligned with its new tiles
    again = extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH, device="cpu")
    assert again.extracted == [target] and again.skipped == slides[1:]
    arr = SlideStore(store).features(*target, "f")
    assert arr.shape[0] == new_attrs["n_tiles"] and arr.attrs["tiles_version"] == tiles_version(new_attrs)


# -- kNN from stored features ---------------------------------------------------------------------


def test_knn_from_stored_features(train_store, tmp_path):
    from hlss_model.evaluate import knn_from_store

    store = _copy(train_store, tmp_path)
    with pytest.raises(KeyError, match="hlss extract"):
        knn_from_store(store, features="f", k=5, device="cpu")
    assert extract_features(store, [timm_encoder("test_resnet", name="f")], batch_size=BATCH,
                            device="cpu").exit_code == 0
    report = knn_from_store(store, features="f", k=5, device="cpu")
    assert list(report.levels) == ["tile", "slide", "patient"]
    st = SlideStore(store)
    test_patients = [p for p in st.patients() if st.patient_attrs(p).get("split") == "test"]
    assert report.levels["patient"].n == len(test_patients)
    assert report.n_train_tiles + report.n_test_tiles == sum(
        st.slide_attrs(p, s)["n_tiles"] for p, s in _slides(store))
    for r in report.levels.values():
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.mean_class_accuracy <= 1.0
    with pytest.raises(ValueError, match="exactly one"):
        knn_from_store(store, k=5, device="cpu")

    # stored features and the same encoder run on the fly give the same evaluation, subsampled alike
    stored = knn_from_store(store, features="f", k=5, max_tiles_per_slide=10, device="cpu")
    live = knn_from_store(store, encoder=timm_encoder("test_resnet"), k=5, max_tiles_per_slide=10, device="cpu")
    assert stored.n_train_tiles == live.n_train_tiles and stored.n_test_tiles == live.n_test_tiles
    for level in ("tile", "slide", "patient"):
        assert stored.levels[level].n == live.levels[level].n
        assert stored.levels[level].accuracy == pytest.approx(live.levels[level].accuracy, abs=0.02)


# -- command line -------------------------------------------------------------------------------


def test_cli_extract_and_knn(train_store, tmp_path, capsys):
    store = _copy(train_store, tmp_path)
    code = main(["extract", "--store", str(store), "--random-init", "--encoder", "timm:resnet10t", "--name", "a",
                 "--encoder", "timm:test_resnet", "--name", "b", "--no-progress", "--batch-size", "16",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "a (512-d)" in out and "b (96-d)" in out and "0 failed" in out
    slides = _slides(store)
    assert all(SlideStore(store).feature_names(p, s) == ["a", "b"] for p, s in slides)

    code = main(["extract", "--store", str(store), "--random-init", "--encoder", "timm:test_resnet", "--name", "b",
                 "--no-progress", "--device", "cpu"])
    assert code == 0 and f"{len(slides)} already done" in capsys.readouterr().out

    # --tile-filter: only tiles within the QC limits get features; the other rows are NaN
    code = main(["extract", "--store", str(store), "--random-init", "--encoder", "timm:test_resnet", "--name", "qc",
                 "--tile-filter", "min_tissue=0.6, max_pen=1", "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr()
    reader = SlideStore(store)
    for p, s in slides:
        feats = reader.features(p, s, "qc")
        assert feats.attrs["tile_filter"] == {"min_tissue": 0.6, "max_pen": 1.0}
        assert np.array_equal(~np.isnan(feats[:]).any(axis=1), reader.tissue(p, s) >= 0.6)
    capsys.readouterr()

    code = main(["knn", "--store", str(store), "--features", "a", "--k", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "accuracy" in out and "MCA" in out
    assert all(any(line.startswith(level) for line in out.splitlines()) for level in ("tile", "slide", "patient"))

    js = tmp_path / "out.json"
    code = main(["knn", "--store", str(store), "--features", "b", "--k", "5", "--device", "cpu", "--json", str(js)])
    assert code == 0
    doc = json.loads(js.read_text())
    assert set(doc["levels"]) == {"tile", "slide", "patient"} and doc["k"] == 5
    capsys.readouterr()

    code = main(["knn", "--store", str(store), "--features", "missing", "--k", "5", "--device", "cpu"])
    assert code == 2 and "hlss extract" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [
    ("foo", "expected timm:NAME"),
    ("timm:", "expected timm:NAME"),
    ("timm:resnet10t:missing.safetensors", "missing.safetensors not found"),
    ("timm:no_such_model_xyz", "no_such_model_xyz"),
])
def test_cli_bad_encoder_exits_2(train_store, tmp_path, capsys, spec, message):
    code = main(["extract", "--store", str(train_store), "--encoder", spec, "--no-progress", "--random-init"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hlss extract: error:" in err and message in err


def test_cli_extract_usage_errors(train_store, tmp_path, capsys):
    assert main(["extract", "--store", str(train_store), "--no-progress"]) == 2
    assert "--checkpoint RUN or --encoder" in capsys.readouterr().err
    assert main(["extract", "--store", str(train_store), "--random-init", "--encoder", "timm:test_resnet", "--name", "a",
                 "--name", "b", "--no-progress"]) == 2
    assert "2 --name for 1 encoders" in capsys.readouterr().err
    for bad, message in (("min_focus", "'min_focus' is not KEY=NUMBER"), ("min_focus=abc", "is not KEY=NUMBER"),
                         ("min_blur=3", "unknown tile_filter keys ['min_blur']")):
        assert main(["extract", "--store", str(train_store), "--random-init", "--encoder", "timm:test_resnet", "--tile-filter", bad,
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert main(["knn", "--store", str(train_store), "--features", "a", "--initial"]) == 2
    assert "--initial needs --checkpoint" in capsys.readouterr().err
    assert main(["extract", "--store", str(tmp_path / "nowhere"), "--random-init", "--encoder", "timm:test_resnet",
                 "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # extract never creates a store


def test_cli_train_then_extract_and_knn_from_the_run(train_store, tiny_text_model, tmp_path, capsys):
    store = _copy(train_store, tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "method: hlss\n"
        "steps: 2\n"
        "device: cpu\n"
        "checkpoint_every: 2\n"
        "log_every: 1\n"
        "sampler: {batch_size: 4, num_workers: 0}\n"
        f"model: {{backbone: resnet10t, text_encoder: {json.dumps(str(tiny_text_model))}}}\n"
        "augment: {out_size: 32}\n"
    )
    run = tmp_path / "run"
    code = main(["train", "--store", str(store), "--out", str(run), "--config", str(cfg)])  # with progress bars
    out = capsys.readouterr().out
    assert code == 0 and "trained 2 steps" in out
    assert (run / "model.safetensors").is_file()

    code = main(["extract", "--store", str(store), "--checkpoint", str(run), "--device", "cpu",
                 "--batch-size", "16"])  # with a progress bar
    out = capsys.readouterr().out
    assert code == 0, out
    name = f"hlss-{run.resolve().name}"
    assert name in out
    st = SlideStore(store)
    p, s = _slides(store)[0]
    attrs = st.features(p, s, name).attrs
    assert attrs["model"].startswith("hlss-run:") and attrs["complete"] is True

    code = main(["knn", "--store", str(store), "--checkpoint", str(run), "--k", "5", "--device", "cpu"])
    trained = capsys.readouterr().out
    assert code == 0 and "patient" in trained
    code = main(["knn", "--store", str(store), "--checkpoint", str(run), "--initial", "--k", "5", "--device", "cpu"])
    initial = capsys.readouterr().out
    assert code == 0 and "patient" in initial

    code = main(["train", "--store", str(store), "--out", str(run), "--config", str(cfg), "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err

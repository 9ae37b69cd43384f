import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from hlss.cli import build_parser, main
from hlss.options import resolve_store


def test_tile_and_info_exit_codes(make_slide, tmp_path, capsys):
    folder = tmp_path / "slides"
    make_slide("a.svs", folder=folder)
    store = tmp_path / "s.zarr"
    assert main(["tile", str(folder), "--store", str(store), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "failed" in out
    (folder / "broken.svs").write_text("nope")
    assert main(["tile", str(folder), "--store", str(store), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED broken" in out and "not a readable slide" in out
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 slides (1 complete, 1 failed)" in out and "FAILED broken" in out and "target_mpp" in out
    assert main(["info", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_complete"] == 1 and summary["n_tiles"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-tissue", "2"], "--min-tissue"),
        (["--target-mpp", "0"], "--target-mpp"),
        (["--compression", "gif"], "--compression"),
        (["--workers", "0"], "workers"),
    ],
)
def test_unusable_arguments_exit_2(make_slide, tmp_path, capsys, args, message):
    slide = make_slide("a.svs")
    assert main(["tile", str(slide), "--store", str(tmp_path / "s.zarr"), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err.lower()


def test_missing_source_and_file_store_exit_2(make_slide, tmp_path, capsys):
    assert main(["tile", str(tmp_path / "nothing"), "--store", str(tmp_path / "s.zarr")]) == 2
    assert "no such folder" in capsys.readouterr().err
    slide = make_slide("a.svs")
    (tmp_path / "file").write_text("x")
    assert main(["tile", str(slide), "--store", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nostore")]) == 2


def test_argparse_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "hlss", "tile"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--store" in proc.stderr


def test_demo_cohort_command(tmp_path, capsys):
    assert main(["demo-cohort", str(tmp_path / "d"), "--patients", "3", "--slides-per-patient", "1",
                 "--width", "1024", "--height", "768", "--seed", "4"]) == 0
    manifest = tmp_path / "d" / "manifest.csv"
    assert manifest.exists() and len(manifest.read_text().strip().splitlines()) == 4
    assert main(["demo-cohort", str(tmp_path / "e"), "--slides-per-patient", "x"]) == 2


# -- bad values are refused before any work (hlss/argtypes.py) -------------------------------------

_NO_CUDA = "CUDA is not available on this machine; use auto or cpu"
BAD_VALUES = [  # (argv, the option named, what the message says is allowed or wrong)
    (["tile", "{tmp}/slides", "--store", "{new}", "--workers", "0"], "--workers", "0 is not a positive integer"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--threads", "-1"], "--threads", "not a positive integer"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--tile-size", "8"], "--tile-size", "outside 16-4096 px"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--target-mpp", "nan"], "--target-mpp", "not a finite number"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--mask-mpp", "0"], "--mask-mpp", "outside 0.5-64 µm/px"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--min-tissue", "1.5"], "--min-tissue", "outside 0-1"),
    (["tile", "{tmp}/slides", "--store", "{new}", "--compression", "gif"], "--compression", "jpeg"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--batch-size", "0"], "--batch-size",
     "not a positive integer"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--device", "gpu"], "--device",
     "not one of auto, cpu, cuda, cuda:N or mps"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t:{tmp}/missing.safetensors"], "--encoder",
     "missing.safetensors not found"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t:{tmp}/garbage.safetensors"], "--encoder",
     "not a safetensors file"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t:{tmp}/notes.txt"], "--encoder",
     "expected one of .safetensors, .pt"),
    (["extract", "--store", "{store}", "--encoder", "resnet10t"], "--encoder", "expected timm:NAME"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--tile-filter", "min_focus=nan"],
     "--tile-filter", "tile_filter.min_focus must be a number"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--tile-filter", "max_pen=inf"],
     "--tile-filter", "tile_filter.max_pen must be a number"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--tile-filter", "min_fokus=3"],
     "--tile-filter", "unknown tile_filter keys ['min_fokus']; known:"),
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--tile-filter", "min_focus"],
     "--tile-filter", "'min_focus' is not KEY=NUMBER"),
    (["knn", "--store", "{store}", "--features", "f", "--k", "0"], "--k", "not a positive integer"),
    (["knn", "--store", "{store}", "--features", "f", "--temperature", "0"], "--temperature", "must be > 0"),
    (["knn", "--store", "{store}", "--features", "f", "--temperature=-inf"], "--temperature", "not a finite"),
    (["knn", "--store", "{store}", "--features", "f", "--max-tiles-per-slide", "0"], "--max-tiles-per-slide",
     "not a positive integer"),
    (["train", "--store", "{store}", "--out", "{new}", "--steps", "0"], "--steps", "not a positive integer"),
    (["train", "--store", "{store}", "--out", "{new}", "--device", "cuda:x"], "--device", "not one of auto"),
    (["train", "--store", "{store}", "--out", "{new}", "--config", "{tmp}/missing.yaml"], "--config",
     "missing.yaml not found"),
    (["explain", "--store", "{store}", "--checkpoint", "{new}", "--slide", "s", "--top", "0"], "--top",
     "not a positive integer"),
    (["explain", "--store", "{store}", "--checkpoint", "{new}", "--slide", "s", "--batch-size", "many"],
     "--batch-size", "'many' is not an integer"),
    (["report", "{store}", "--out", "{new}", "--max-px", "8"], "--max-px", "outside 16-8192 px"),
    (["serve", "--limit", "0"], "--limit", "not a positive integer"),
    (["serve", "--cron", "61 * * * *"], "--cron", "is not a cron schedule"),
    (["deploy", "--pool", "p", "--config", "{tmp}/missing.yaml"], "--config", "no such file"),
    (["run", "--store", "{new}", "--steps", "0"], "--steps", "not a positive integer"),
    (["run", "--store", "{new}", "--workers", "0"], "--workers", "not a positive integer"),
    (["run", "--store", "{new}", "--encoder", "timm:resnet10t:{tmp}/missing.pt"], "--encoder", "no such file"),
    (["run", "--store", "{new}", "--encoder", "run:{tmp}/norun"], "--encoder", "is not a training run folder"),
    (["demo-cohort", "{new}", "--classes", "5"], "--classes", "outside 1-4"),
    (["demo-cohort", "{new}", "--slides-per-patient", "3-1"], "--slides-per-patient", "1 <= MIN <= MAX"),
    (["demo-cohort", "{new}", "--patients", "0"], "--patients", "not a positive integer"),
]
NO_CUDA = [
    (["extract", "--store", "{store}", "--encoder", "timm:resnet10t", "--device", "cuda"], "--device", _NO_CUDA),
    (["knn", "--store", "{store}", "--features", "f", "--device", "cuda:0"], "--device", _NO_CUDA),
    (["train", "--store", "{store}", "--out", "{new}", "--device", "cuda"], "--device", _NO_CUDA),
    (["explain", "--store", "{store}", "--checkpoint", "{new}", "--slide", "s", "--device", "cuda"], "--device",
     _NO_CUDA),
]


def _bad_value_case(argv, option, allowed, train_store, tmp_path, capsys) -> None:
    from store_snapshot import assert_unchanged, snapshot

    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file at all")
    (tmp_path / "notes.txt").write_text("weights?")
    before = snapshot(train_store)
    args = [a.format(tmp=tmp_path, new=tmp_path / "new", store=train_store) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"hlss {argv[0]}: error: argument {option}" in err and allowed in err, err
    assert not (tmp_path / "new").exists()  # refused before any work
    assert_unchanged(before, snapshot(train_store))


@pytest.mark.parametrize("argv, option, allowed", BAD_VALUES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_values_are_refused_before_any_work(argv, option, allowed, train_store, tmp_path, capsys):
    _bad_value_case(argv, option, allowed, train_store, tmp_path, capsys)


@pytest.mark.parametrize("argv, option, allowed", NO_CUDA, ids=lambda v: v if isinstance(v, str) else None)
def test_cuda_without_cuda_is_refused_up_front(argv, option, allowed, train_store, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _bad_value_case(argv, option, allowed, train_store, tmp_path, capsys)


def test_good_values_pass_the_argument_types(tmp_path):
    """The types keep what they check: ranges are inclusive, specs are parsed, defaults still parse."""
    from pipeline.codecs import TileCompression
    from pipeline.qc import TileFilter

    (tmp_path / "w.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    p = build_parser()
    t = p.parse_args(["tile", "src", "--store", "s", "--tile-size", "16", "--min-tissue", "1", "--compression", "none"])
    assert (t.tile_size, t.min_tissue, t.compression) == (16, 1.0, TileCompression(kind="none"))
    e = p.parse_args(["extract", "--store", "s", "--encoder", f"timm:resnet10t:{tmp_path / 'w.safetensors'}",
                      "--tile-filter", "min_focus=2,max_pen=0.5", "--device", "cpu"])
    assert [(s.kind, s.ref, s.weights) for s in e.encoder] == [("timm", "resnet10t", str(tmp_path / "w.safetensors"))]
    assert e.device == "cpu"
    assert e.tile_filter == TileFilter(min_focus=2.0, max_pen=0.5)
    d = p.parse_args(["demo-cohort", "d"])
    assert d.slides_per_patient == (1, 2) and d.classes == 2


# -- hlss info on any path; output closed early ---------------------------------------------------


def test_info_on_a_folder_that_is_not_a_store_reads_only(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 not a store")
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"hlss info: error: {folder}: is not an hlss store (no zarr.json with hlss attributes)" in err
    assert "write" not in err and "refusing" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


def test_info_works_on_a_read_only_store(train_store, tmp_path, capsys):
    from store_snapshot import assert_unchanged, snapshot

    store = tmp_path / "ro.zarr"
    shutil.copytree(train_store, store)
    before = snapshot(store, skip=())
    modes = [(p, p.stat().st_mode) for p in [store, *store.rglob("*")]]
    for p, mode in modes:
        p.chmod(mode & ~0o222)
    try:
        assert main(["info", str(store)]) == 0
        assert "8 patients" in capsys.readouterr().out
    finally:
        for p, mode in reversed(modes):
            p.chmod(mode)
    assert_unchanged(before, snapshot(store, skip=()))


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_output_piped_into_a_closed_reader_ends_quietly(train_store, extra):
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` that has already exited
    try:
        proc = subprocess.run([sys.executable, "-m", "hlss", "info", str(train_store), *extra],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141
    shell = subprocess.run(["bash", "-c", f"{sys.executable} -m hlss info {train_store} {' '.join(extra)} "
                                          "| head -1"], capture_output=True, text=True, timeout=120)
    assert shell.stderr == "" and len(shell.stdout.splitlines()) == 1


def test_error_messages_show_control_characters(tmp_path, capsys):
    hostile = tmp_path / "x\x1b[2J\x1b]0;pwned\x07\r\u202eevil"
    assert main(["info", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\r\\u202eevil: no such store" in err
    assert not any(ch in err for ch in "\x1b\x07\r\u202e")


# -- the store: positional (preferred) or --store, the same for every command -----------------------

STORE_COMMANDS = {  # command -> (argv before the store, argv after it)
    "tile": (["tile", "src"], []), "info": (["info"], []), "verify": (["verify"], []),
    "qc": (["qc"], ["--out", "o"]), "report": (["report"], ["--out", "r.html"]),
    "export-mil": (["export-mil"], ["--features", "f", "--out", "o"]), "train": (["train"], ["--out", "run"]),
    "extract": (["extract"], ["--encoder", "timm:resnet10t"]), "knn": (["knn"], ["--features", "f"]),
    "explain": (["explain"], ["--checkpoint", "run", "--slide", "s"]), "run": (["run"], []),
    "export-geojson": (["export-geojson"], ["--out", "o"]),
}


def test_every_command_with_a_store_has_both_forms():
    """A command added later that takes a store must take it both ways too (and be listed above)."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_store = set()
    for command, parser in subparsers.choices.items():
        dests = {a.dest: a for a in parser._actions}
        if "store" in dests or "store_option" in dests:
            with_store.add(command)
            assert not dests["store"].option_strings and dests["store_option"].option_strings == ["--store"], command
    assert with_store == set(STORE_COMMANDS)


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
def test_the_store_is_positional_or_an_option(command):
    head, tail = STORE_COMMANDS[command]
    for argv in (head + ["S"] + tail, head + ["--store", "S"] + tail, head + ["S", "--store", "S"] + tail):
        args = build_parser().parse_args(argv)
        resolve_store(args)
        assert args.store == "S", argv


@pytest.mark.parametrize("command", ["tile", "info", "verify", "report", "export-mil", "knn", "extract", "train"])
def test_two_different_stores_are_refused_before_any_work(command, train_store, tmp_path, capsys):
    from store_snapshot import assert_unchanged, snapshot

    head, tail = STORE_COMMANDS[command]
    head = [a.replace("src", str(train_store)) for a in head]
    tail = [str(tmp_path / "out" / a) if a in ("o", "r.html", "run") else a for a in tail]
    before = snapshot(train_store)
    assert main([*head, str(train_store), "--store", str(tmp_path / "other.zarr"), *tail]) == 2
    err = capsys.readouterr().err
    assert f"hlss {command}: error: two stores given ({train_store} and --store {tmp_path / 'other.zarr'}); " \
           "give one" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither store nor output written
    assert_unchanged(before, snapshot(train_store))


@pytest.mark.parametrize("command, usage", [("knn", "hlss knn STORE"), ("tile", "hlss tile SOURCE STORE"),
                                            ("qc", "hlss qc STORE --out DIR")])
def test_no_store_is_a_usage_error_naming_both_forms(command, usage, tmp_path, capsys):
    head, tail = STORE_COMMANDS[command]
    assert main([*head, *tail]) == 2
    err = capsys.readouterr().err
    assert f"hlss {command}: error: give the store: {usage}" in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_tile_source_store_positionally_then_info_with_either_form(make_slide, tmp_path, capsys):
    slide = make_slide("a.svs", width=1024, height=768)
    store = tmp_path / "s.zarr"
    assert main(["tile", str(slide), str(store), "--target-mpp", "2", "--tile-size", "64", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    positional = capsys.readouterr().out
    assert main(["info", "--store", str(store)]) == 0
    assert capsys.readouterr().out == positional and "1 slides (1 complete, 0 failed)" in positional


def test_python_dash_m_hlss_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "hlss", "knn", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "[STORE]" in proc.stdout and "--store STORE" in proc.stdout


def test_version_names_the_package():
    proc = subprocess.run([sys.executable, "-m", "hlss", "--version"], capture_output=True, text=True)
    from pipeline import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"hlss-pipeline {__version__}"


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_tile_with_no_slides_exits_2_naming_the_source_and_makes_no_store(tmp_path, capsys, source):
    src = tmp_path / "slides"
    src.mkdir()
    (src / "notes.txt").write_text("not a slide")
    if source == "manifest":
        src = tmp_path / "manifest.csv"
        src.write_text("slide_path,patient_id\n\n")
    store = tmp_path / "s.zarr"
    assert main(["tile", str(src), str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err
    assert ("no slide files" in err and ".svs" in err) if source == "folder" else "no slide rows" in err
    assert not store.exists()


def test_info_lists_features_attribute_runs_and_evaluations(train_store, tmp_path, capsys):
    import numpy as np

    from pipeline.store import SlideStore, StoreWriter, tiles_version

    store = tmp_path / "s.zarr"
    shutil.copytree(train_store, store)
    assert main(["info", str(store)]) == 0
    assert "no features, attribute runs or evaluations yet" in capsys.readouterr().out
    st, w = SlideStore(store), StoreWriter(store)
    recs = list(st.records(status="complete"))[:2]
    for rec in recs:
        for name, group, dim in (("enc-a", "features", 8), ("run-1", "attributes", 3)):
            arr = w.stage_features(rec.n_tiles, dim)
            arr[:] = np.ones((rec.n_tiles, dim), np.float32)
            w.commit_features(arr, rec.patient_id, rec.slide_id, name,
                              {"model": "timm:resnet18 weights=r18.safetensors", "dim": dim, "n": rec.n_tiles},
                              tiles_version(rec.attrs), group=group)
    w.write_evaluation("knn-enc-a", {"feature": "enc-a", "evaluated": "2026-12-02T00:00:00+00:00",
                                     "levels": {"tile": {"accuracy": 0.8125, "mean_class_accuracy": 0.75, "n": 32},
                                                "patient": {"accuracy": 1.0, "mean_class_accuracy": 1.0, "n": 2}}})
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "features enc-a: 2 slides, 8-d, timm:resnet18 weights=r18.safetensors" in out
    assert "attribute run run-1: 2 slides" in out
    assert ("evaluation knn-enc-a: features enc-a, 2026-12-02T00:00:00+00:00; tile 81.2% (MCA 75.0%, n=32), "
            "patient 100.0% (MCA 100.0%, n=2)") in out
    assert main(["info", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["features"] == {"enc-a": {"slides": 2, "dim": 8, "model": "timm:resnet18 weights=r18.safetensors"}}
    assert summary["attribute_runs"] == {"run-1": 2}
    assert summary["evaluations"]["knn-enc-a"]["tile"] == {"accuracy": 0.8125, "mean_class_accuracy": 0.75, "n": 32}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_with_an_unreachable_dask_scheduler_is_one_line_and_starts_nothing(make_slide, tmp_path):
    folder = tmp_path / "slides"
    make_slide("a.svs", folder=folder)
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    proc = subprocess.run([sys.executable, "-m", "hlss", "run", "--source", str(folder), "--store",
                           str(tmp_path / "s.zarr"), "--run-dir", str(tmp_path / "run"), "--scheduler-address",
                           address], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "telemetry" not in proc.stderr.lower()
    assert f"Dask scheduler {address}: cannot connect" in proc.stderr and "dask scheduler" in proc.stderr
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "run").exists()


# -- encoders: the registry, and random weights only on request ---------------------------------------

def test_hlss_encoders_and_silent_random_init_refused_in_a_real_process(train_store, tmp_path):
    """``hlss encoders --json`` lists the registry; ``hlss extract --encoder timm:NAME`` without weights
    exits 2 naming the ways to give them (and ``knn`` too), and the store is left as it was."""
    from store_snapshot import assert_unchanged, snapshot

    listed = subprocess.run([sys.executable, "-m", "hlss", "encoders", "--json"], capture_output=True, text=True,
                            timeout=120, check=True)
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["uni"]["weights_file"] == "pytorch_model.bin" and rows["conch-v1.5"]["dim"] == 768
    before = snapshot(train_store)
    for command in (["extract", "--no-progress"], ["knn"]):
        proc = subprocess.run([sys.executable, "-m", "hlss", *command, str(train_store), "--encoder", "timm:resnet10t",
                               "--device", "cpu"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2, proc.stderr
        assert "encoder timm:resnet10t: no weights" in proc.stderr and "--random-init" in proc.stderr
    assert_unchanged(before, snapshot(train_store))

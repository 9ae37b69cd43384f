import json
import subprocess
import sys

import pytest

from pipeline.cli import main


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
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "tile"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--store" in proc.stderr


def test_demo_cohort_command(tmp_path, capsys):
    assert main(["demo-cohort", str(tmp_path / "d"), "--patients", "3", "--slides-per-patient", "1",
                 "--width", "1024", "--height", "768", "--seed", "4"]) == 0
    manifest = tmp_path / "d" / "manifest.csv"
    assert manifest.exists() and len(manifest.read_text().strip().splitlines()) == 4
    assert main(["demo-cohort", str(tmp_path / "e"), "--slides-per-patient", "x"]) == 2

"""``hlss extract --devices``: one worker process per device, as a user runs it, and its refusals."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from hlss.cli import main
from store_snapshot import assert_unchanged, snapshot


def test_extract_on_two_cpu_workers_then_rerun_on_one(train_store, tmp_path):
    store = shutil.copytree(train_store, tmp_path / "store.zarr")
    proc = subprocess.run([sys.executable, "-m", "hlss", "extract", str(store), "--encoder", "timm:resnet10t", "--random-init",
                           "--devices", "cpu,cpu", "--batch-size", "16", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = re.fullmatch(r"features resnet10t \(512-d\): 12 slides extracted, 0 already done, 0 failed; "
                        r"(\d+) tiles in [\d.]+ s \([\d.]+ tiles/s\)", lines[0])
    assert head, proc.stdout
    workers = [re.fullmatch(r"  cpu: (\d+) slides \((\d+) tiles\), (\d+) tiles extracted in [\d.]+ s "
                            r"\([\d.]+ tiles/s\)", line) for line in lines[1:]]
    assert len(workers) == 2 and all(workers), proc.stdout
    assert sum(int(m[1]) for m in workers) == 12
    assert sum(int(m[3]) for m in workers) == sum(int(m[2]) for m in workers) == int(head[1])

    again = subprocess.run([sys.executable, "-m", "hlss", "extract", str(store), "--encoder", "timm:resnet10t", "--random-init",
                            "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 slides extracted, 12 already done, 0 failed" in again.stdout  # same weights, same features


@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu", "--devices", "cpu,cpu"], "give --device or --devices, not both"),
    (["--devices", "cpu,"], "argument --devices: 'cpu,': expected DEVICE[,DEVICE...] (e.g. cuda:0,cuda:1) or all"),
    (["--devices", "cpu,gpu"], "argument --devices: device 'gpu' is not one of"),
    (["--devices", "cpu", "--encoder", "timm:no_such_model"],
     "encoders could not be built for cpu: ValueError: timm model 'no_such_model'"),
])
def test_bad_devices_are_refused_before_any_write(extra, message, train_store, capsys):
    before = snapshot(train_store)
    encoder = ["--random-init"] + ([] if "--encoder" in extra else ["--encoder", "timm:resnet10t"])
    assert main(["extract", str(train_store), *encoder, *extra, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert_unchanged(before, snapshot(train_store))


def test_devices_all_or_cuda_without_cuda_is_refused(train_store, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(train_store)
    for devices, message in (("all", "'all': no CUDA device is visible on this machine"),
                             ("cpu,cuda:1", "'cuda:1': CUDA is not available on this machine")):
        assert main(["extract", str(train_store), "--encoder", "timm:resnet10t", "--random-init", "--devices", devices]) == 2
        assert f"argument --devices: {message}" in capsys.readouterr().err
    assert_unchanged(before, snapshot(train_store))

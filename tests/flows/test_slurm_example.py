"""examples/slurm_cluster.py renders the SLURM job script the README promises (nothing is submitted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("dask_jobqueue")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "slurm_cluster.py"


def _example():
    spec = importlib.util.spec_from_file_location("slurm_cluster_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip()]


def test_slurm_example_renders_cpu_and_gpu_job_scripts(tmp_path, monkeypatch):
    """CPU jobs: one one-thread worker per core with memory/cores each, spilling to node-local
    ``$TMPDIR``; GPU jobs: one worker holding the GPU, declaring the ``GPU`` resource the flows ask for."""
    monkeypatch.chdir(tmp_path)  # the example's log folder goes here
    example = _example()
    with example.slurm_cluster(partition="cpu", account="lab", cores=8, memory="32GiB", walltime="04:00:00",
                               port=0) as cluster:
        lines = _lines(cluster.job_script())
        address = cluster.scheduler_address
    for directive in ("-p cpu", "-A lab", "--cpus-per-task=8", "--mem=32G", "-t 04:00:00", "-J hlss-worker"):
        assert f"#SBATCH {directive}" in lines, (directive, lines)
    assert not any("--gres" in line for line in lines)
    (worker,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert f"dask_worker {address} " in worker
    for arg in ("--nworkers 8", "--nthreads 1", "--memory-limit 4.00GiB", "--nanny", "--local-directory $TMPDIR",
                "--lifetime 230m --lifetime-stagger 4m"):
        assert arg in worker, (arg, worker)
    assert "--resources" not in worker
    assert (tmp_path / "slurm-logs").is_dir()

    with example.slurm_cluster(partition="gpu", gpus=1, cores=8, memory="64GiB", port=0,
                               prologue=["module load cuda"]) as cluster:
        lines = _lines(cluster.job_script())
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH -p gpu" in lines and "module load cuda" in lines
    (worker,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert "--resources GPU=1" in worker and "--nthreads 8" in worker and "--nworkers" not in worker



def test_slurm_example_refuses_a_walltime_it_cannot_retire_workers_before():
    example = _example()
    with pytest.raises(ValueError, match=r"walltime '4h': expected HH:MM:SS"):
        example.slurm_cluster(walltime="4h", port=0)
    with pytest.raises(ValueError, match=r"walltime '00:12:00': give at least 15 minutes"):
        example.slurm_cluster(walltime="00:12:00", port=0)

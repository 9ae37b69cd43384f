"""A Dask cluster of SLURM jobs (dask-jobqueue) for the hlss flows: the scheduler runs here (a login
node), each job is a ``dask worker`` on a compute node, and the flows get its address.

    pip install 'hlss-pipeline[cluster]'
    python examples/slurm_cluster.py --jobs 8 --partition cpu             # tiling: one slide per core
    python examples/slurm_cluster.py --jobs 2 --partition gpu --gpus 1    # extraction on GPU nodes
    python examples/slurm_cluster.py --partition cpu --print-script       # show the sbatch script only

It prints the scheduler address and keeps ``--jobs`` jobs running (resubmitting ended ones) until Ctrl-C. Point the flows at it with
``HLSS_SCHEDULER_ADDRESS=tcp://<login-node>:8786 hlss serve ...`` (or ``scheduler_address:`` in the
flow settings file, or ``--param scheduler_address=...`` on one run), and set ``workers`` to the
slides wanted at once (at most the cluster's worker threads). The store, the slides and the run
folder must be at the same path on every node (a shared filesystem), or the store an ``s3://`` URL.
"""

from __future__ import annotations

import argparse
import time

from dask_jobqueue import SLURMCluster

__all__ = ["slurm_cluster", "main"]


def slurm_cluster(
    *,
    partition: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "32GiB",
    walltime: str = "04:00:00",
    gpus: int = 0,
    local_directory: str = "$TMPDIR",
    log_directory: str | None = "slurm-logs",
    interface: str | None = None,
    port: int = 8786,
    prologue: list[str] | None = None,
) -> SLURMCluster:
    """A SLURMCluster whose every job is one node's share of per-slide work (nothing is submitted
    until ``scale`` or ``adapt``).

    CPU jobs (``gpus=0``) run ``cores`` one-thread worker processes, one slide each, with
    ``memory / cores`` apiece (4 GiB by default).
    GPU jobs run one worker process with ``cores`` threads that declares ``--resources GPU=<gpus>``,
    the resource the flows' extraction asks for, so each GPU runs one extraction at a time.
    ``local_directory``: where workers spill, node-local scratch (``$TMPDIR`` is expanded by the job's
    shell). ``walltime`` as ``HH:MM:SS``: workers retire 10 minutes (staggered by up to 4) before it
    (``--lifetime``), so a job leaves before SLURM kills it and the slides it was tiling are redone
    on the other workers without counting as a worker death. ``interface``: the network interface (``ib0``) workers
    and scheduler talk over.
    ``prologue``: shell lines run before the worker starts (``module load``, activating the venv).
    """
    directives = [f"--gres=gpu:{gpus}"] if gpus else []
    retire = ["--lifetime", _lifetime(walltime), "--lifetime-stagger", "4m"]
    return SLURMCluster(
        queue=partition,
        account=account,
        cores=cores,
        processes=1 if gpus else cores,
        memory=memory,
        walltime=walltime,
        job_name="hlss-worker",
        job_extra_directives=directives,
        worker_extra_args=retire + (["--resources", f"GPU={gpus}"] if gpus else []),
        local_directory=local_directory,
        log_directory=log_directory,
        interface=interface,
        job_script_prologue=prologue or [],
        scheduler_options={"port": port, "dashboard_address": ":8787"},
    )


def _lifetime(walltime: str, margin_min: int = 10) -> str:
    """A worker lifetime ``margin_min`` minutes short of a SLURM ``HH:MM:SS`` walltime, as ``<n>m``."""
    try:
        h, m, s = (int(part) for part in walltime.split(":"))
    except ValueError:
        raise ValueError(f"walltime {walltime!r}: expected HH:MM:SS, e.g. 04:00:00") from None
    minutes = h * 60 + m + s // 60 - margin_min
    if minutes < 5:
        raise ValueError(f"walltime {walltime!r}: give at least {margin_min + 5} minutes")
    return f"{minutes}m"


def main(argv: list[str] | None = None) -> None:
    """Start the cluster, keep ``--jobs`` jobs running (ended ones are resubmitted) until Ctrl-C."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes' shares) to keep running")
    ap.add_argument("--partition", help="SLURM partition (sbatch -p)")
    ap.add_argument("--account", help="SLURM account (sbatch -A)")
    ap.add_argument("--cores", type=int, default=8, help="cores per job")
    ap.add_argument("--memory", default="32GiB", help="memory per job")
    ap.add_argument("--walltime", default="04:00:00", help="time limit per job, HH:MM:SS")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per job (extraction workers)")
    ap.add_argument("--interface", help="network interface for workers and scheduler, e.g. ib0")
    ap.add_argument("--port", type=int, default=8786, help="scheduler port")
    ap.add_argument("--print-script", action="store_true", help="print the job script and exit")
    args = ap.parse_args(argv)
    cluster = slurm_cluster(partition=args.partition, account=args.account, cores=args.cores, memory=args.memory,
                            walltime=args.walltime, gpus=args.gpus, interface=args.interface, port=args.port)
    with cluster:
        if args.print_script:
            print(cluster.job_script())
            return
        cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)  # unlike scale(), replaces ended jobs
        print(f"scheduler: {cluster.scheduler_address}   dashboard: {cluster.dashboard_link}")
        print(f"run the flows with HLSS_SCHEDULER_ADDRESS={cluster.scheduler_address} (Ctrl-C stops the jobs)")
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

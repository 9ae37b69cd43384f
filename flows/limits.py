"""One device, one job: a Prefect global concurrency limit per (host, device) for training and extraction.

Two flow runs that both want ``cuda:0`` on the same machine (a nightly ``reprocess`` landing during
a ``tile-and-train``) would otherwise share its memory and compute; with the limit the second waits,
visibly, in the Prefect UI (Concurrency -> Global). Raise a limit there to allow more.
"""

from __future__ import annotations

import re
import socket
from contextlib import contextmanager
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

__all__ = ["device_limit_name", "device_slot"]


def device_limit_name(device: str, host: str | None = None) -> str:
    """``hlss-device-<host>-<device>``, e.g. ``hlss-device-gpu01-cuda-0``."""
    raw = f"hlss-device-{host or socket.gethostname()}-{device}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).lower()


@contextmanager
def device_slot(device: str, limit: int = 1) -> Iterator[str]:
    """Hold one slot of this host's limit for ``device`` (created with ``limit`` slots if missing)."""
    name = device_limit_name(device)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # created once; a limit raised later in the UI is left alone
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:  # another run created it at the same moment
                pass
    with concurrency(name, occupy=1, strict=True):
        yield name

"""Where a cohort store lives: a local or shared folder, or an object store reached through fsspec.

A location is a ``str`` or :class:`~pathlib.Path`. A string with a scheme (``s3://bucket/prefix``,
also ``gs://``, ``az://``, ``memory://``: anything fsspec knows) is an object store; a plain path,
``~/...`` or ``file:///...`` is a folder, written with the POSIX protocol of :mod:`pipeline.store`.

Credentials and settings come from the usual places only, never from the URL: for S3 the botocore
chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws/credentials`` and ``~/.aws/config``, instance roles), an endpoint (MinIO, Ceph, moto...) from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, and anything else through fsspec's configuration
(``FSSPEC_S3_...`` variables or ``~/.config/fsspec/*.json``). Worker processes inherit the
environment, so they authenticate the same way; only the URL string travels to them (pickling,
``CohortIndex.store_path``). A URL with ``user:password@`` is refused. Messages made here name the
store URL and never hold a secret: known secret values are masked (:func:`scrub`).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

__all__ = ["StoreError", "ObjectLocation", "is_remote", "local_path", "scrub"]


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message names the path or URL (never a secret)."""


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is an object-store URL rather than a local or shared folder."""
    if isinstance(location, Path):
        return False
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_path(location: str | Path) -> Path:
    """The folder of a local location (``file://`` stripped, ``~`` expanded)."""
    if isinstance(location, str) and location.startswith("file://"):
        location = location[len("file://"):]
    return Path(location).expanduser()


# environment variables whose values must never appear in a message
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
_USERINFO = re.compile(r"(://)[^/@\s\"']+@")


def scrub(text: str) -> str:
    """``text`` with known secret values and any ``user:password@`` of a URL masked."""
    text = _USERINFO.sub(r"\1***@", str(text))
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _storage_options(protocol: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        # other processes add slides: a cached listing would hide them (the fs instance lives on)
        "use_listings_cache": False,
    }
    if protocol in ("s3", "s3a"):
        # recent botocore reads these itself; passing the endpoint explicitly also serves older
        # ones, and keys fsspec's instance cache on it
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def _endpoint(protocol: str) -> str | None:
    if protocol in ("s3", "s3a"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return scrub(ep) if ep else None
    return None


_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")


def _bucket_missing(e: BaseException) -> bool:
    text = str(e).lower()
    return "nosuchbucket" in text or "bucket does not exist" in text or "bucket not found" in text


def _connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
        "ClientConnectorError", "ServerDisconnectedError", "ConnectionError", "FSTimeoutError",
        "TimeoutError", "gaierror",
    })


class ObjectLocation:
    """A store on an object store: plain object operations with clear errors, and a zarr store on it.

    Keys given to the methods are relative to the store root (``patients/P/slides/S/zarr.json``).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise StoreError(f"{scrub(url)}: credentials in the store URL are refused; use the environment "
                             "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or ~/.aws/credentials")
        self.protocol = parts.scheme
        self.url = url.rstrip("/")
        self.bucket = parts.netloc if self.protocol in _BUCKET_PROTOCOLS else None
        if self.bucket is not None and not self.bucket:
            raise StoreError(f"{self.url}: no bucket in the store URL (expected {self.protocol}://bucket/prefix)")
        self._opts = _storage_options(self.protocol)
        try:
            from fsspec.core import url_to_fs

            self.fs, root = url_to_fs(self.url, **self._opts)
        except ImportError as e:
            raise StoreError(f"{self.url}: {self.protocol}:// stores need an extra package ({e})") from None
        except ValueError as e:
            raise StoreError(f"{self.url}: not a usable store URL ({scrub(e)})") from None
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"ObjectLocation({self.url!r})"

    # -- errors ------------------------------------------------------------------------------
    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Turn unreachable endpoints, missing buckets and denied access into a :class:`StoreError`.

        A missing object (plain FileNotFoundError) passes through: callers decide what it means.
        """
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as e:
            if _bucket_missing(e):
                raise StoreError(f"{self.url}: bucket {self.bucket!r} does not exist (while {action}); "
                                 "create it, or check the URL and the endpoint") from None
            raise
        except PermissionError as e:
            raise StoreError(f"{self.url}: access denied while {action} ({scrub(e)}); check the credentials "
                             "(AWS_PROFILE, AWS_ACCESS_KEY_ID...) and the bucket's policy") from None
        except Exception as e:
            name = type(e).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                raise StoreError(f"{self.url}: no usable credentials while {action} ({name}); set AWS_PROFILE or "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or use ~/.aws/credentials") from None
            if _connection_error(e):
                ep = _endpoint(self.protocol)
                where = f" at {ep}" if ep else ""
                hint = " (AWS_ENDPOINT_URL)" if ep else ""
                raise StoreError(f"{self.url}: cannot reach the object store{where} while {action} "
                                 f"({name}); check the endpoint{hint} and the network") from None
            if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
                raise StoreError(f"{self.url}: {action} failed ({name}: {scrub(e)})") from None
            raise

    # -- objects -----------------------------------------------------------------------------
    def key(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def read_json(self, rel: str) -> dict | None:
        """The JSON object at ``rel``, or None when there is none (or it is not JSON)."""
        with self.errors(f"reading {rel}"):
            try:
                # start=0: one ranged GET (s3fs asks for the size first without a range)
                raw = self.fs.cat_file(self.key(rel), start=0)
            except FileNotFoundError as e:
                if _bucket_missing(e):
                    raise
                return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def write_json(self, rel: str, doc: dict) -> None:
        """One PUT: readers see the old object or the new one, never a mix."""
        with self.errors(f"writing {rel}"):
            self.fs.pipe_file(self.key(rel), json.dumps(doc, indent=2).encode())

    def find(self, rel: str, detail: bool = False) -> list[str] | dict[str, dict]:
        """Every object under the prefix ``rel/`` (full keys)."""
        with self.errors(f"listing {rel or 'the store'}"):
            try:
                return self.fs.find(self.key(rel), detail=detail)
            except FileNotFoundError as e:
                if _bucket_missing(e):
                    raise
                return {} if detail else []

    def children(self, rel: str) -> list[str]:
        """Names directly under the prefix ``rel/`` (objects and sub-prefixes)."""
        with self.errors(f"listing {rel or 'the store'}"):
            try:
                names = self.fs.ls(self.key(rel), detail=False)
            except FileNotFoundError as e:
                if _bucket_missing(e):
                    raise
                return []
        base = self.key(rel).rstrip("/") + "/"
        return sorted({n.rstrip("/")[len(base):] for n in names if n.startswith(base)} - {""})

    def remove(self, keys: list[str]) -> None:
        """Delete objects (full keys); already absent is fine."""
        if not keys:
            return
        with self.errors("deleting objects"):
            try:
                self.fs.rm(list(keys))
            except FileNotFoundError as e:
                if _bucket_missing(e):
                    raise

    def remove_tree(self, rel: str) -> None:
        self.remove(list(self.find(rel)))

    def copy(self, src: list[str], dst: list[str]) -> None:
        """Copy objects (full keys) within the store; server-side where the object store can."""
        if not src:
            return
        with self.errors("copying objects"):
            self.fs.copy(list(src), list(dst))

    def zarr_store(self, read_only: bool):
        """A zarr ``FsspecStore`` on the store root."""
        from zarr.storage import FsspecStore

        with self.errors("opening the store"):
            return FsspecStore.from_url(self.url, storage_options=dict(self._opts), read_only=read_only)

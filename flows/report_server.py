"""Cohort reports over HTTP, so the link artifact in the Prefect UI opens them (browsers refuse
``file://`` links from a web page).

``hlss serve`` starts a :class:`ReportServer` beside the deployments and sets ``HLSS_REPORT_URL`` for
the flow runs it starts, which then link ``<HLSS_REPORT_URL>/report/<run folder>/report.html``
(:func:`report_url`). The server is read-only (GET and HEAD) and serves only cohort reports: a file
named ``report.html`` written by :func:`pipeline.report.write_report` (its ``generator`` meta tag) or
beside a training run's ``run.json``, and the pictures under the ``report_files/`` folder next to
such a report. Paths are resolved (symlinks, ``..``) before that check; folders are never listed.
It binds to loopback unless told otherwise: a team exposes it through a reverse proxy or an SSH
tunnel and sets ``report_url`` to the address people use.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from pipeline.report import GENERATOR
from pipeline.run_folder import is_run_folder

__all__ = ["ReportServer", "report_url", "servable", "REPORT_URL_ENV", "PREFIX"]

log = logging.getLogger(__name__)

REPORT_URL_ENV = "HLSS_REPORT_URL"
PREFIX = "/report"
_REPORT, _FILES = "report.html", "report_files"


def report_url(report: Path, base: str | None = None) -> str:
    """The address of ``report`` for people: under ``base`` (default ``$HLSS_REPORT_URL``) when a report
    server is running, else its ``file://`` URI."""
    base = base if base is not None else os.environ.get(REPORT_URL_ENV)
    path = Path(report).expanduser().resolve()
    if not base:
        return path.as_uri()
    return base.rstrip("/") + PREFIX + quote(path.as_posix())


def _is_report(path: Path) -> bool:
    if path.name != _REPORT or not path.is_file():
        return False
    if is_run_folder(path.parent):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return f"<meta name=generator content={GENERATOR}>".encode() in head


def servable(path: Path) -> bool:
    """Whether the resolved ``path`` is a cohort report or a file of its ``report_files/`` folder."""
    if _is_report(path):
        return True
    if not path.is_file():
        return False
    for folder in path.parents:
        if folder.name == _FILES:
            return _is_report(folder.parent / _REPORT)
    return False


class _Handler(BaseHTTPRequestHandler):
    server_version = "hlss-reports"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(body=False)

    def _send(self, body: bool) -> None:
        url = urlsplit(self.path).path
        if not url.startswith(PREFIX + "/"):
            return self.send_error(HTTPStatus.NOT_FOUND, "reports are under /report/<run folder>/report.html")
        path = Path(os.path.realpath(unquote(url[len(PREFIX):])))
        if not servable(path):
            return self.send_error(HTTPStatus.NOT_FOUND, "not a cohort report or one of its pictures")
        try:
            data = path.read_bytes()
        except OSError:
            return self.send_error(HTTPStatus.NOT_FOUND)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")  # a nightly run rewrites the report in place
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("report server: " + format, *args)


class ReportServer:
    """A read-only HTTP server of cohort reports in a background thread (see the module doc).

    ``port`` 0 picks a free one; :attr:`url` is the base address (``http://host:port``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            self._httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as e:
            raise OSError(f"report server: cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                          "report_port or stop what uses it") from None
        self._httpd.daemon_threads = True
        bound_host, bound_port = self._httpd.server_address[:2]
        self.url = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '') else bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="report-server", daemon=True)

    def start(self) -> "ReportServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "ReportServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

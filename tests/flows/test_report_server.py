"""The report server of ``hlss serve``: cohort reports (and only they) over HTTP, read-only."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from browser import Browser, chromium
from flows.report_server import REPORT_URL_ENV, ReportServer, report_url
from pipeline.report import write_report


@pytest.fixture(scope="module")
def report(train_store, tmp_path_factory) -> Path:
    """A real cohort report with its pictures as files, in a folder of its own."""
    out = tmp_path_factory.mktemp("reports") / "nightly" / "report.html"
    write_report(train_store, out, pictures="files", max_px=128)
    return out


@pytest.fixture
def server():
    with ReportServer("127.0.0.1", 0) as srv:
        yield srv


def _get(srv: ReportServer, path: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, srv.url + path, timeout=10)


def test_report_and_its_pictures_are_served(report, server):
    page = httpx.get(report_url(report, server.url), timeout=10)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html"
    assert "<title>Cohort report" in page.text and page.headers["cache-control"] == "no-cache"
    pictures = sorted((report.parent / "report_files").rglob("*.png"))
    assert pictures
    img = httpx.get(report_url(pictures[0], server.url), timeout=10)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == pictures[0].read_bytes()
    head = _get(server, "/report" + quote(report.as_posix()), "HEAD")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


def test_only_reports_are_served(report, server, train_store, tmp_path):
    own = "/report" + quote(report.as_posix())
    foreign = tmp_path / "report.html"  # a page of the same name that hlss did not write
    foreign.write_text("<html><body>secret</body></html>")
    (tmp_path / "report_files").mkdir()
    (tmp_path / "report_files" / "notes.txt").write_text("secret")
    link = report.parent / "report_files" / "escape.txt"
    link.symlink_to(train_store / "zarr.json")
    try:
        for path in (
            "/",  # no listing
            "/report" + quote(str(train_store / "zarr.json")),  # store files
            # .. out of the folder (escaped, so the client sends it as it is and the server must resolve it)
            own.replace("report.html", "%2E%2E/%2E%2E/" + quote(Path(train_store).name) + "/zarr.json"),
            "/report" + quote(str(report.parent)),  # a folder
            "/report" + quote(str(report.parent / "report_files")),
            "/report" + quote(str(link)),  # a symlink from report_files to elsewhere
            "/report" + quote(str(foreign)),
            "/report" + quote(str(tmp_path / "report_files" / "notes.txt")),
            "/report/etc/passwd",
            own + ".bak",
        ):
            r = _get(server, path)
            assert r.status_code == 404, (path, r.status_code)
            assert "secret" not in r.text and '"zarr_format"' not in r.text
    finally:
        link.unlink()
    for method in ("POST", "PUT", "DELETE"):
        assert _get(server, own, method).status_code == 501  # read-only
    assert report.is_file()


def test_a_report_beside_a_run_is_served_without_the_marker(tmp_path, server):
    (tmp_path / "run.json").write_text("{}")  # a training run folder
    old = tmp_path / "report.html"  # a report written before the generator tag existed
    old.write_text("<!DOCTYPE html><title>Cohort report: old</title>")
    assert httpx.get(report_url(old, server.url), timeout=10).text.endswith("old</title>")


def test_report_url_is_a_file_uri_without_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv(REPORT_URL_ENV, raising=False)
    assert report_url(tmp_path / "report.html") == (tmp_path / "report.html").resolve().as_uri()
    monkeypatch.setenv(REPORT_URL_ENV, "https://hlss.example.org/")
    assert report_url(Path("/data/runs/a b/report.html")) == "https://hlss.example.org/report/data/runs/a%20b/report.html"


def test_a_busy_port_is_a_clear_error():
    with ReportServer("127.0.0.1", 0) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=rf"report server: cannot listen on 127.0.0.1:{port} .*report_port"):
            ReportServer("127.0.0.1", port)


def test_a_browser_shows_the_served_report_with_its_pictures(report, server):
    browser = Browser(chromium())
    try:
        session = browser.open(report_url(report, server.url))
        shown = browser.evaluate(session, """(async () => {
          const imgs = [...document.images];
          await Promise.all(imgs.map(i => i.decode().catch(() => null)));
          return {title: document.title, n: imgs.length,
                  decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
        })()""")
    finally:
        browser.close()
    assert shown["title"].startswith("Cohort report") and shown["n"] > 0 and shown["decoded"] == shown["n"]

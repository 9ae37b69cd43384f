"""Every output channel escapes: the terminal shows control characters instead of executing them, and
markdown (the Prefect artifacts) shows user strings as text instead of links, images, HTML or cells.

Slide and patient ids are constrained (pipeline/ids.py), but labels, errors and paths are free text:
a manifest label here carries ANSI codes, a carriage return, a bidi override and markdown/HTML.
"""

from __future__ import annotations

import csv
import html
import re
import unicodedata

import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from hlss.cli import main
from pipeline.escape import markdown, terminal

LABEL = ("red\x1b[31m\x1b]8;;http://evil\x07\r\x08\u202e [click](javascript:alert(1)) ![i](http://e/i.png) "
         "<b>x</b> | a |")
BAD_NAME = "bad\x1b[2J\u202e<img src=x onerror=alert(1)>|[x](javascript:alert(2)).svs"
EXECUTED = "\x1b\x07\r\x08\u202e"  # what a terminal would act on
MD = MarkdownIt("commonmark", {"html": True}).enable("table")  # html on: raw HTML would pass through


def _unsafe(text: str, keep: str = "") -> list[str]:
    return [ch for ch in text if ch not in keep and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]


def _cells(markdown_text: str) -> list[list[str]]:
    """The text of every body row's cells of the rendered markdown (html-unescaped)."""
    out = MD.render(markdown_text)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", out.split("<tbody>", 1)[-1], re.S)]


def _no_injection(rendered: str) -> None:
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", rendered))
    assert tags <= {"p", "h1", "h2", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "strong", "code"}, tags


# -- the escapers ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_terminal_leaves_no_control_or_format_character(text):
    assert not _unsafe(terminal(text))
    assert not _unsafe(terminal(text, newlines=True), keep="\n")
    assert terminal(text, newlines=True).count("\n") == text.count("\n")


def test_terminal_shows_what_it_replaced():
    assert terminal("a\x1b[2Jb\rc\td\x07\u202e\u2028\x9b\U000e0001") == \
        "a\\x1b[2Jb\\rc\\td\\x07\\u202e\\u2028\\x9b\\U000e0001"
    assert terminal("plain ünïcode ✓ text") == "plain ünïcode ✓ text"
    assert terminal("two\nlines", newlines=True) == "two\nlines" and terminal("two\nlines") == "two\\nlines"


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x3000)))
def test_markdown_cell_renders_as_the_literal_text(text):
    rows = _cells(f"| a | b |\n|---|---|\n| {markdown(text)} | z |\n")
    assert len(rows) == 1 and len(rows[0]) == 2 and rows[0][1] == "z"
    assert rows[0][0].strip() == terminal(text).strip()  # cells are trimmed of (unicode) whitespace
    _no_injection(MD.render(f"| a | b |\n|---|---|\n| {markdown(text)} | z |\n"))


def test_markdown_breaks_autolinks_and_block_starts_but_keeps_paths_readable():
    assert markdown("www.evil.com http://evil.com a@evil.com") == "www\\.evil.com http\\://evil.com a\\@evil.com"
    assert [markdown(t) for t in ("- x", "+ x", "12. x", "= x", "# x")] == \
        ["\\- x", "\\+ x", "12\\. x", "\\= x", "\\# x"]
    assert markdown("/data/run-1/report.html, TCGA-02-0001") == "/data/run-1/report.html, TCGA-02-0001"
    for text in ("- x", "12. x", "= x", "# x", "> x", "    code"):  # rendered alone: one paragraph of the text
        assert MD.render(markdown(text)) == f"<p>{html.escape(text, quote=False)}</p>\n"


def test_markdown_defuses_links_images_html_and_cells():
    rendered = MD.render(f"Store {markdown(LABEL)}; done.")
    _no_injection(rendered)
    assert "href" not in rendered and "src=" not in rendered and "<b>" not in rendered
    assert html.unescape(re.sub("<[^>]+>", "", rendered)).strip() == f"Store {terminal(LABEL)}; done."


# -- the flows' markdown and table artifacts ------------------------------------------------------


def test_flow_summary_markdown_escapes_user_strings():
    from flows.summary import run_summary, summary_markdown

    rows = [{"patient": "P1", "slide": "S1", "status": "failed", "tiles": 0, "reason": LABEL,
             "error": f"cannot open {BAD_NAME}:\nline two | <script>alert(1)</script>", "seconds": 0.1},
            {"patient": "P2", "slide": "S2", "status": "complete", "tiles": 5, "reason": "new", "error": "",
             "seconds": 0.2}]
    summary = run_summary("tile-and-train", f"/data/{BAD_NAME}", rows, 1.0,
                          training={"status": "trained", "steps": 2, "final_loss": 0.5, "run_dir": f"/r/{LABEL}"},
                          knn={"skipped": LABEL})
    summary["report"], summary["artifacts_error"] = f"/r/{BAD_NAME}", f"OSError: {LABEL}"
    text = summary_markdown(summary)
    rendered = MD.render(text)
    _no_injection(rendered)
    assert "href" not in rendered and "<img" not in rendered and "<script" not in rendered
    table = _cells(text.split("## Slides tiled, moved, relabelled or failed", 1)[1].split("\n\n", 2)[1])
    assert [len(r) for r in table] == [6, 6]  # no cell added by a '|' in a reason or error
    assert table[0][4] == terminal(LABEL).strip() and table[0][5].startswith(f"cannot open {terminal(BAD_NAME)}")
    assert not _unsafe(text, keep="\n")


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """A store tiled from a manifest whose label is hostile, with one slide that fails under a hostile file
    name (its error quotes the path): ``(store, tiling report)``."""
    from pipeline.config import TilingParams
    from pipeline.runner import tile_cohort
    from pipeline.synthetic import HETissueRenderer, write_slide

    root = tmp_path_factory.mktemp("hostile")
    renderer = HETissueRenderer(1024, 768, tissue_class=0, stain_seed=0, seed=1)
    good = write_slide(root / "good.svs", 1024, 768, renderer, mpp=0.5)
    bad = root / BAD_NAME
    bad.write_bytes(b"II*\x00 not really a tiff")
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_path", "patient_id", "slide_id", "label"])
        w.writerows([[str(good), "P1", "S1", "tumour"], [str(bad), "P2", "S2", "tumour"]])
    report = tile_cohort(manifest, root / "store.zarr", TilingParams(target_mpp=1.0, tile_size=64))
    assert [r.status for r in sorted(report.results, key=lambda r: r.slide_id)] == ["complete", "failed"]
    # manifests now refuse control characters in labels; a store written before they did (or through
    # the Python API) can still hold one, so the label is put in as such a store has it
    zarr.open_group(root / "store.zarr" / "patients" / "P1", mode="r+").attrs["label"] = LABEL
    return root / "store.zarr", report


def test_table_artifact_rows_escape_labels_and_errors(hostile_store):
    from flows.artifacts import table_artifact_rows
    from pipeline.report import slide_table
    from pipeline.store import SlideStore

    table = slide_table(SlideStore(hostile_store[0]))
    label = table[0]["label"]  # as stored (the manifest reader reads CR LF as a line end)
    assert "\x1b[31m" in label and "\u202e" in label
    rows = table_artifact_rows(table)
    assert [r["slide"] for r in rows] == ["S1", "S2"] and rows[0]["n_tiles"] > 0  # numbers stay numbers
    for row in rows:
        for value in row.values():
            if isinstance(value, str):  # the UI renders each string cell as markdown
                rendered = MD.render(value)
                _no_injection(rendered)
                assert "href" not in rendered and "<img" not in rendered and not _unsafe(value)
    assert html.unescape(re.sub("<[^>]+>", "", MD.render(rows[0]["label"]))).strip() == terminal(label).strip()
    assert terminal(BAD_NAME) in html.unescape(MD.render(rows[1]["error"]))


# -- the terminal -------------------------------------------------------------------------------


def test_info_and_the_tiling_table_show_control_characters(hostile_store, capsys):
    from store_snapshot import assert_unchanged, snapshot

    from pipeline.store import SlideStore

    store, report = hostile_store
    before = snapshot(store)
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    label = SlideStore(store).summary()["slides"][0]["label"]
    assert terminal(label) in out and "FAILED S2: " in out and terminal(BAD_NAME) in out
    assert not any(ch in out for ch in EXECUTED)
    table = report.table()
    assert "FAILED S2 (patient P2): " in table and terminal(BAD_NAME) in table
    assert not any(ch in table for ch in EXECUTED)
    assert_unchanged(before, snapshot(store))

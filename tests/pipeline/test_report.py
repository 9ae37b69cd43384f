"""The HTML cohort report (``hlss report``), rendered in a real headless Chromium.

The browser is driven over the Chrome DevTools Protocol on ``--remote-debugging-pipe`` (stdlib only,
``tests/browser.py``): the page is loaded from ``file://``, then the live DOM is queried after the
load event, so "no broken images" is the browser's own verdict (``img.complete && img.naturalWidth > 0``)
and the curve's points are counted from the parsed SVG.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess

import numpy as np
import pytest

from browser import INSTALL, Browser, chromium
from tiny_training import tiny_config
from hlss.cli import build_parser, main
from hlss.commands import outputs as commands
from pipeline.report import write_report
from pipeline.store import SlideStore, StoreWriter

_PAGE_STATE = """(async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const rows = [...document.querySelectorAll('#slides tbody tr')].map(tr => ({
    patient: tr.dataset.patient, slide: tr.dataset.slide, cls: tr.className,
    cells: [...tr.cells].map(c => c.innerText.trim())}));
  const images = [...document.images].map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
    shown: i.getBoundingClientRect().width, alt: i.alt, source: i.dataset.source, slide: i.dataset.slide,
    level: i.dataset.level,
    data: i.src.startsWith('data:image/png;base64,')}));
  const curves = [...document.querySelectorAll('svg polyline.curve')].map(p => ({
    run: p.dataset.run, n: p.points.numberOfItems}));
  const knn = [...document.querySelectorAll('table.knn')].map(t => ({name: t.dataset.name,
    rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.innerText.trim()))}));
  const attributes = Object.fromEntries([...document.querySelectorAll('table.attributes')].map(t => [
    t.dataset.slide ? 'slide:' + t.dataset.slide : 'patient:' + t.dataset.patient,
    {run: t.dataset.run, rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.innerText.trim()))}]));
  const anchors = [...document.querySelectorAll('#slides a[href^="#"]')];
  const links = {n: anchors.length,
    broken: anchors.filter(a => !document.getElementById(decodeURIComponent(a.hash.slice(1)))).map(a => a.hash)};
  const external = [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('data:') && !u.startsWith('#'));
  return {title: document.title, rows, images, curves, knn, attributes, links, external, scripts: document.scripts.length,
          text: document.body.innerText};
})()"""


# -- the cohort: a tiled store with a failed slide, an older-style slide, features, kNN and a run ----


@pytest.fixture(scope="module")
def cohort(train_store, tmp_path_factory, tiny_text_model):
    from hlss_model.evaluate import knn_from_store
    from hlss_model.train import train
    from pipeline.config import TilingParams
    from hlss_model.encoders import timm_encoder
    from pipeline.runner import tile_cohort

    tmp = tmp_path_factory.mktemp("report")
    store = tmp / "store.zarr"
    shutil.copytree(train_store, store)
    # a failed slide: an unreadable file tiled into the same store
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "broken.svs").write_text("nope")
    tile_cohort(broken, store, TilingParams(target_mpp=1.0, tile_size=64))
    st = SlideStore(store)
    assert any(r.status == "failed" for r in st.records())
    # a slide as an older store has it: no QC picture (the report falls back to the outlined thumbnail)
    first = next(st.records(status="complete"))
    qc_dir = store / "patients" / first.patient_id / "slides" / first.slide_id / "qc"
    if qc_dir.exists():
        shutil.rmtree(qc_dir)

    run_dir = tmp / "run"
    cfg = tiny_config(tiny_text_model, steps=3, checkpoint_every=3)
    train(train_store, run_dir, cfg, progress=False)
    # encoding a few tiles per slide on the fly is much cheaper than extracting every tile's features
    report = knn_from_store(store, encoder=timm_encoder("resnet10t", name="r10"), k=5, max_tiles_per_slide=8,
                            batch_size=64, device="cpu")
    doc = {**report.to_dict(), "feature": "r10", "run_dir": str(run_dir)}
    StoreWriter(store).write_evaluation("knn-r10", doc)
    (run_dir / "knn-r10.json").write_text(json.dumps(doc))
    # attribute maps of one patient's slides
    from hlss_model.explain import explain_patient

    explained = next(r.patient_id for r in st.records(status="complete") if r.patient_id != first.patient_id)
    maps, _ = explain_patient(store, run_dir, explained, batch_size=64, device="cpu")
    return {"store": store, "run": run_dir, "knn": doc, "fallback": (first.patient_id, first.slide_id),
            "explained": (explained, maps)}


def test_report_renders_in_headless_chromium(cohort, tmp_path):
    exe = chromium()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0, f"`{exe} --version` failed: {version.stderr}; reinstall: {INSTALL}"
    out = write_report(cohort["store"], tmp_path / "report.html", [cohort["run"]], title="test <cohort> & co")
    html_text = out.read_text()
    assert "<script" not in html_text.lower()
    assert "test &lt;cohort&gt; &amp; co" in html_text

    files = write_report(cohort["store"], tmp_path / "files" / "report.html", [cohort["run"]], pictures="files")
    browser = Browser(exe)
    try:
        session = browser.open(out.resolve().as_uri())
        page = browser.evaluate(session, _PAGE_STATE)
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
        linked = browser.evaluate(browser.open(files.resolve().as_uri()), _PAGE_STATE)
    finally:
        browser.close()

    # with the pictures as files next to the report: the same pictures, loaded from there
    assert len(linked["images"]) == len(page["images"]) > 0 and linked["external"]
    for img, same in zip(linked["images"], page["images"]):
        assert not img["data"] and img["complete"] and (img["w"], img["h"]) == (same["w"], same["h"]), img
    assert all(u.startswith("report_files/") for u in linked["external"])

    store = SlideStore(cohort["store"])
    records = list(store.records())
    assert page["title"] == "test <cohort> & co"
    assert page["scripts"] == 0 and page["external"] == []
    # every slide in the table, with its tile count; failed slides show their error
    by_slide = {(r["patient"], r["slide"]): r for r in page["rows"]}
    assert set(by_slide) == {(r.patient_id, r.slide_id) for r in records}
    for rec in records:
        cells = by_slide[rec.patient_id, rec.slide_id]["cells"]
        assert cells[0] == rec.patient_id and cells[1] == rec.slide_id and cells[4] == rec.status
        assert cells[5] == str(rec.n_tiles)
        if rec.status == "failed":
            assert rec.attrs["error"] and cells[8] == rec.attrs["error"].strip()
            assert "failed" in by_slide[rec.patient_id, rec.slide_id]["cls"]
        else:
            assert float(cells[6]) == pytest.approx(float(np.mean(store.tissue(rec.patient_id, rec.slide_id))), abs=1e-3)

    # each slide's name in the table links to its QC figure
    assert page["links"] == {"n": len(records), "broken": []}

    # every picture loaded and decoded by the browser (no broken image); one QC picture per tiled slide
    for img in page["images"]:
        assert img["data"] and img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
        assert max(img["w"], img["h"]) <= 1024
    complete = [r for r in records if r.status == "complete"]
    slide_pictures = [img for img in page["images"] if img["source"] in ("qc", "thumbnail")]
    assert len(slide_pictures) == len(complete)
    sources = {img["alt"]: img["source"] for img in slide_pictures}
    p, s = cohort["fallback"]
    assert sources[f"{p} / {s}"] == "thumbnail"
    if any(store.has_qc(r.patient_id, r.slide_id) for r in complete):
        assert "qc" in sources.values()

    # attribute maps: for the explained patient, per slide the stored top attributes and one heatmap per level
    from pipeline.attribute_maps import top_attributes

    patient, maps = cohort["explained"]
    heatmaps = [img for img in page["images"] if img["source"] == "attributes"]
    assert {img["slide"] for img in heatmaps} == {m.slide for m in maps}
    for m in maps:
        top = top_attributes(m.scores, m.names, m.levels, 3)
        table = page["attributes"][f"slide:{m.slide}"]
        assert table["run"] == m.run and table["rows"] == [
            [level, str(rank), name, f"{score:+.4f}"] for level, items in top.items()
            for rank, (name, score) in enumerate(items, 1)]
        assert sorted(img["level"] for img in heatmaps if img["slide"] == m.slide) == sorted(top)
    pooled = top_attributes(np.concatenate([m.scores for m in maps]), maps[0].names, maps[0].levels, 3)
    assert page["attributes"][f"patient:{patient}"]["rows"][0][2] == next(iter(pooled.values()))[0][0]
    assert len(page["attributes"]) == len(maps) + 1  # no other patient was explained

    # the training curve: one point per metrics.jsonl row
    n_rows = len((cohort["run"] / "metrics.jsonl").read_text().splitlines())
    assert page["curves"] == [{"run": cohort["run"].name, "n": n_rows}] and n_rows == 3

    # the kNN table with the evaluation's numbers (the run folder's identical copy is not repeated)
    assert [t["name"] for t in page["knn"]] == ["knn-r10"]
    for table in page["knn"]:
        for level, row in zip(cohort["knn"]["levels"], table["rows"]):
            r = cohort["knn"]["levels"][level]
            assert row == [level, str(r["n"]), f"{100 * r['accuracy']:.1f}%", f"{100 * r['mean_class_accuracy']:.1f}%"]

    # the screenshot is not blank: the page really painted the table and the pictures
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"))
    assert pixels.size > 0 and (pixels < 128).mean() > 0.005 and pixels.std() > 10


def test_picture_files_are_redrawn_only_when_their_slide_changed(cohort, tmp_path, monkeypatch):
    import pipeline.report as report

    out = tmp_path / "r.html"
    write_report(cohort["store"], out, [cohort["run"]], max_px=128, pictures="files")
    folder = tmp_path / "r_files"
    index = json.loads((folder / "index.json").read_text())
    pngs = sorted(folder.rglob("*.png"))
    shown = {k for k, v in index.items() if not v.get("none")}  # the failed slide has no picture
    assert len(pngs) == len(shown) == len(index) - 1 and {k.split("/")[0] for k in shown} == {"slides", "attributes"}
    html_text = out.read_text()
    assert "data:image/png" not in html_text and all(f'src="r_files/{k}.png"' in html_text for k in shown)

    calls = []
    drawn = report.slide_picture
    monkeypatch.setattr(report, "slide_picture", lambda *a, **k: calls.append(a[1:3]) or drawn(*a, **k))
    before = {p: p.stat().st_mtime_ns for p in pngs}
    write_report(cohort["store"], out, [cohort["run"]], max_px=128, pictures="files")
    assert calls == [] and {p: p.stat().st_mtime_ns for p in pngs} == before  # nothing changed: nothing redrawn

    # a slide whose attributes change (as a retile does) is redrawn, and only that one
    p, s = cohort["fallback"]
    pngs[0].unlink()  # and a lost file comes back
    slide_json = cohort["store"] / "patients" / p / "slides" / s / "zarr.json"
    doc = json.loads(slide_json.read_text())
    saved = json.dumps(doc)
    doc["attributes"]["committed_note"] = "changed"
    slide_json.write_text(json.dumps(doc))
    try:
        write_report(cohort["store"], out, [cohort["run"]], max_px=128, pictures="files")
    finally:
        slide_json.write_text(saved)
    lost = str(pngs[0].relative_to(folder).with_suffix(""))
    assert sorted(calls) == sorted({(p, s)} | ({tuple(lost.split("/")[1:3])} if lost.startswith("slides/") else set()))
    assert pngs[0].is_file()

    # a slide gone from the store takes its picture with it
    (folder / "slides" / "gone").mkdir()
    (folder / "slides" / "gone" / "x.png").write_bytes(b"")
    index["slides/gone/x"] = {"version": "v", "w": 1, "h": 1, "source": "qc"}
    (folder / "index.json").write_text(json.dumps(index))
    write_report(cohort["store"], out, [cohort["run"]], max_px=128, pictures="files")
    assert not (folder / "slides" / "gone" / "x.png").exists()
    assert "slides/gone/x" not in json.loads((folder / "index.json").read_text())


def test_report_command(cohort, tmp_path, capsys):
    out = tmp_path / "r.html"
    args = ["report", str(cohort["store"]), "--out", str(out), "--run", str(cohort["run"]), "--max-px", "128"]
    assert main(args) == 0 and out.is_file() and "wrote" in capsys.readouterr().out
    assert build_parser().parse_args(args).func is commands.report

    # without --run, the run folder named by the store's kNN evaluation gives the training curve
    default = ["report", str(cohort["store"]), "--out", str(tmp_path / "d.html"), "--max-px", "64"]
    assert main(default) == 0
    text = (tmp_path / "d.html").read_text()
    assert "<h2>Training</h2>" in text and f'data-run="{cohort["run"].name}"' in text
    capsys.readouterr()

    assert main(["report", str(tmp_path / "missing.zarr"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("hlss report: error: ")
    assert main(["report", str(cohort["store"]), "--out", str(out), "--run", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_without_runs_escapes_and_skips_sections(train_store, tmp_path):
    html_text = write_report(SlideStore(train_store), tmp_path / "r.html", max_px=64).read_text()
    assert "<h2>Training</h2>" not in html_text and "kNN evaluation" not in html_text
    assert 'id="slides"' in html_text and "http://" not in html_text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_cli_has_report():
    assert build_parser().parse_args(["report", "s.zarr", "--out", "r.html"]).func is commands.report

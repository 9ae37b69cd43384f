"""``hlss report STORE --out report.html``: one static, self-contained HTML cohort report.

The report holds a summary header (counts, store path, schema), a table of patients and slides
(label, split, status, tiles, mean tissue fraction, mpp0, error), one QC figure per slide, the
training curves of the given run folders (inline SVG, loss vs step), the language-attribute maps
``hlss explain`` stored (top attributes per slide and patient, a heatmap of each level's top
attribute) and the kNN tables recorded in the store and in the run folders (``knn-*.json``; a run
folder's copy of a table the store holds is shown once). Images are embedded as ``data:image/png;base64``
URIs and there is no script and no external resource, so the file opens offline in any browser,
with no server.

Size: each slide's picture is downscaled to at most 1024 px on its longer side before it is
embedded; a PNG of a 1024 x 768 H&E thumbnail is typically 0.5-1.5 MB, about 0.7-2 MB once base64
encoded, so a report grows by roughly 1-2 MB per slide (``max_px`` lowers this).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .files import OutsideOwnerError, atomic_write_bytes, owned_path, remove_owned, utc_now
from .location import StoreError
from .png import encode_png
from .run_folder import RunFolder, read_metrics, run_split

__all__ = ["Pictures", "write_report", "render_report", "slide_table", "run_split", "recorded_runs", "report_cohort",
           "slide_picture", "read_metrics", "GENERATOR"]

log = logging.getLogger(__name__)

MAX_PX = 1024
GENERATOR = "hlss-pipeline"  # <meta name=generator>: how the flows' report server knows a report it may serve
_CURVE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecea} td.error{color:#a00;max-width:40em;word-break:break-word}
.meta{color:#555;font-size:.9em} figure{display:inline-block;margin:.6em;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #bbb}
figcaption{font-size:.8em;color:#333;max-width:1024px;white-space:pre-wrap}
svg text{font-size:11px;font-family:inherit}
"""


# -- pictures -------------------------------------------------------------------------------------


def _png(image: np.ndarray, max_px: int) -> bytes:
    """PNG bytes of an RGB or grey image, downscaled to at most ``max_px`` on its longer side."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(np.asarray(image, np.uint8)))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if max(img.size) > max_px:
        img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return encode_png(np.asarray(img))


def _outlined_thumbnail(thumbnail: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The thumbnail with the tissue mask's outline drawn in green (for slides without a QC picture)."""
    from PIL import Image, ImageFilter

    rgb = np.array(Image.fromarray(np.asarray(thumbnail, np.uint8)).convert("RGB"))
    if mask is None or np.asarray(mask).ndim != 2:
        return rgb
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    if m.size != (rgb.shape[1], rgb.shape[0]):
        m = m.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)
    width = max(3, 2 * (max(rgb.shape[:2]) // 400) + 1)
    grown = np.asarray(m.filter(ImageFilter.MaxFilter(width))) > 0
    shrunk = np.asarray(m.filter(ImageFilter.MinFilter(width))) > 0
    rgb[grown & ~shrunk] = (0, 200, 0)
    return rgb


def slide_picture(store, patient_id: str, slide_id: str, max_px: int = MAX_PX) -> tuple[bytes, str] | None:
    """PNG bytes of a slide's QC picture (or, for stores without one, its thumbnail with the tissue
    outline) at most ``max_px`` on its longer side, and where it came from; None without either."""
    try:
        if store.has_qc(patient_id, slide_id):
            return _png(store.qc_image(patient_id, slide_id), max_px), "qc"
    except (KeyError, OSError, ValueError, StoreError):  # StoreDamageError: the table row says so
        pass
    try:
        thumb = store.thumbnail(patient_id, slide_id)
    except (KeyError, OSError, ValueError, StoreError):
        return None
    try:
        mask = store.tissue_mask(patient_id, slide_id)
    except (KeyError, OSError, ValueError, StoreError):
        mask = None
    return _png(_outlined_thumbnail(thumb, mask), max_px), "thumbnail"


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Pictures:
    """Where the report's pictures go: embedded as data URIs (``folder`` None), or PNG files in
    ``folder`` (next to the report, linked by relative paths), each re-encoded only when its
    ``version`` changed since the last report, so a nightly report of a big cohort redraws only the
    slides that changed. ``finish`` records the versions and removes pictures no longer shown."""

    INDEX = "index.json"

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.index: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if folder is not None:
            try:
                self.index = json.loads((folder / self.INDEX).read_text())
            except (OSError, json.JSONDecodeError):
                self.index = {}

    def get(self, key: str, version: str, make) -> tuple[str, int, int, str] | None:
        """``(src, width, height, source)`` of picture ``key`` (a relative path without suffix);
        ``make()`` returns ``(png bytes, source)`` or None when there is no picture."""
        if self.folder is None:
            made = make()
            if made is None:
                return None
            w, h = _png_size(made[0])
            return _data_uri(made[0]), w, h, made[1]
        path = owned_path(self.folder, f"{key}.png")  # keys name store nodes; still never outside the folder
        entry = self.index.get(key)
        self.used.add(key)
        fresh = entry is not None and entry.get("version") == version
        if fresh and entry.get("none"):
            return None  # known to have no picture
        if not (fresh and path.is_file()):
            made = make()
            if made is None:
                self.index[key] = {"version": version, "none": True}
                remove_owned(self.folder, path)
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, made[0])
            w, h = _png_size(made[0])
            entry = self.index[key] = {"version": version, "w": w, "h": h, "source": made[1]}
        src = urllib.parse.quote(f"{self.folder.name}/{key}.png")
        return src, int(entry["w"]), int(entry["h"]), str(entry["source"])

    def finish(self) -> None:
        if self.folder is None:
            return
        for key in set(self.index) - self.used:
            del self.index[key]
            try:  # the index is read back from disk: it names what to remove, never where
                remove_owned(self.folder, f"{key}.png")
            except OutsideOwnerError as e:
                log.warning("report picture index %s: %s", self.folder / self.INDEX, e)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / self.INDEX, json.dumps(self.index, indent=1, sort_keys=True).encode())


def _anchor(kind: str, *ids: str) -> str:
    """An element id for a slide's section (ids are store keys: no spaces, '/' cannot occur in one)."""
    return kind + ":" + "/".join(ids)


def _version(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


# -- run folders ----------------------------------------------------------------------------------


def _curve_points(records: Sequence[dict[str, Any]], key: str = "loss") -> list[tuple[float, float]]:
    pts = []
    for r in records:
        try:
            x, y = float(r["step"]), float(r[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((x, y))
    return pts


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def curves_svg(curves: Sequence[tuple[str, Sequence[tuple[float, float]]]], width: int = 720, height: int = 320,
               y_label: str = "loss") -> str:
    """An inline SVG with one polyline per ``(name, [(step, value), ...])`` curve, axes and a legend."""
    curves = [(n, list(p)) for n, p in curves if p]
    if not curves:
        return ""
    left, right, top, bottom = 60, 20, 15, 40
    xs = [x for _, p in curves for x, _ in p]
    ys = [y for _, p in curves for _, y in p]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="curves" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(y_label)} vs step">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#888"/>']
    for i in range(5):
        fy = y0 + (y1 - y0) * i / 4
        fx = x0 + (x1 - x0) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(fy):.1f}" y2="{sy(fy):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 5}" y="{sy(fy) + 4:.1f}" text-anchor="end">{html.escape(_fmt(fy))}</text>')
        parts.append(f'<text x="{sx(fx):.1f}" y="{top + ph + 15}" text-anchor="middle">{html.escape(_fmt(fx))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 5}" text-anchor="middle">step</text>')
    parts.append(f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{html.escape(y_label)}</text>')
    for i, (name, pts) in enumerate(curves):
        color = _CURVE_COLORS[i % len(_CURVE_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="curve" data-run="{html.escape(name)}" data-points="{len(pts)}" '
                     f'fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        ly = top + 14 + 14 * i
        parts.append(f'<line x1="{left + pw - 150}" x2="{left + pw - 130}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + pw - 125}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- HTML pieces ----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(v: Any) -> str:
    try:
        return f"{100 * float(v):.1f}%"
    except (TypeError, ValueError):
        return "-"


def _knn_table(name: str, doc: dict[str, Any], source: str) -> str:
    if not isinstance(doc, dict):
        return ""
    if "skipped" in doc and "levels" not in doc:
        return f"<h3>{_e(name)} <span class=meta>({_e(source)})</span></h3><p>skipped: {_e(doc['skipped'])}</p>"
    levels = doc.get("levels") or {}
    meta = [f"feature {doc['feature']}" if doc.get("feature") else None,
            f"k {doc['k']}" if doc.get("k") is not None else None,
            f"run {doc['run_dir']}" if doc.get("run_dir") else None,
            f"evaluated {doc['evaluated']}" if doc.get("evaluated") else None]
    rows = []
    for level, r in levels.items():
        r = r if isinstance(r, dict) else {}
        rows.append(f"<tr><td>{_e(level)}</td><td class=num>{_e(r.get('n', '-'))}</td>"
                    f"<td class=num>{_pct(r.get('accuracy'))}</td><td class=num>{_pct(r.get('mean_class_accuracy'))}"
                    "</td></tr>")
    return (f'<h3>{_e(name)} <span class=meta>({_e(source)})</span></h3>'
            f'<p class=meta>{_e("; ".join(m for m in meta if m))}</p>'
            f'<table class="knn" data-name="{_e(name)}"><thead><tr><th>level</th><th>n</th><th>accuracy</th>'
            f'<th>MCA</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _top_table(top: dict[str, list[tuple[str, float]]], kind: str, key: str, run: str) -> str:
    rows = "".join(f"<tr><td>{_e(level)}</td><td class=num>{rank}</td><td>{_e(name)}</td>"
                   f"<td class=num>{score:+.4f}</td></tr>"
                   for level, items in top.items() for rank, (name, score) in enumerate(items, 1))
    return (f'<table class="attributes" data-{kind}="{_e(key)}" data-run="{_e(run)}"><thead><tr><th>level</th>'
            f"<th>rank</th><th>attribute</th><th>mean cosine</th></tr></thead><tbody>{rows}</tbody></table>")


def _attribute_sections(store, slides: Sequence[dict[str, Any]], max_px: int, pictures: Pictures,
                        k: int = 3) -> list[str]:
    """Per patient and per slide with stored attribute scores: top-``k`` tables and one heatmap per level."""
    from .attribute_maps import render_heatmap, top_attributes

    by_patient: dict[str, list[str]] = {}
    n_tiles: dict[tuple[str, str], int] = {}
    for row in slides:
        if row["status"] == "complete":
            by_patient.setdefault(row["patient"], []).append(row["slide"])
            n_tiles[row["patient"], row["slide"]] = row["n_tiles"]
    out = []
    for p, slide_ids in by_patient.items():
        pooled: dict[str, list] = {}
        parts = []
        for s in slide_ids:
            for run_name in store.attribute_runs(p, s):
                arr = store.attribute_scores(p, s, run_name)
                try:
                    scores, names, levels = arr[:], list(arr.attrs["names"]), list(arr.attrs["levels"])
                except StoreError as e:  # StoreDamageError: named here, the rest of the report goes on
                    parts.append(f"<p class=meta>slide {_e(s)}, run {_e(run_name)}: {_e(e)}</p>")
                    continue
                if len(scores) != n_tiles[p, s]:  # written for an earlier tiling of the slide
                    parts.append(f"<p class=meta>slide {_e(s)}, run {_e(run_name)}: {len(scores)} scores for "
                                 f"{n_tiles[p, s]} tiles; rerun <code>hlss explain</code></p>")
                    continue
                pooled.setdefault(run_name, [names, levels, []])[2].append(scores)
                top = top_attributes(scores, names, levels, k)
                figs = []
                for level, items in top.items():
                    if not items:
                        continue
                    col = next(j for j, (lv, n) in enumerate(zip(levels, names)) if lv == level and n == items[0][0])
                    title = f"{s} - {level}: {items[0][0]} (run {run_name})"

                    def heatmap(col=col, title=title):
                        img = render_heatmap(store, p, s, scores[:, col], title)
                        return _png(np.asarray(img), max(16, max_px // 2)), "attributes"

                    version = _version(dict(arr.attrs), title, max_px)
                    src, w, h, _ = pictures.get(f"attributes/{run_name}/{p}/{s}/{level}", version, heatmap)
                    figs.append(f'<figure><img src="{src}" width="{w}" height="{h}" '
                                f'alt="{_e(s)} {_e(level)} {_e(items[0][0])}" data-source="attributes" '
                                f'data-slide="{_e(s)}" data-level="{_e(level)}"><figcaption>{_e(level)}: '
                                f"{_e(items[0][0])}</figcaption></figure>")
                parts.append(f'<h4 id="{_e(_anchor("maps", p, s, run_name))}">slide {_e(s)}, run {_e(run_name)}</h4>'
                             + _top_table(top, "slide", s, run_name) + "".join(figs))
        if not parts:
            continue
        head = [f"<h3>patient {_e(p)}</h3>"]
        for run_name, (names, levels, blocks) in pooled.items():
            head.append(f"<p class=meta>over all {sum(len(b) for b in blocks)} tiles of the patient's slides, "
                        f"run {_e(run_name)}</p>"
                        + _top_table(top_attributes(np.concatenate(blocks), names, levels, k), "patient", p, run_name))
        out.append("".join(head + parts))
    return out


def recorded_runs(store) -> list[Path]:
    """The training run folders named by the store's evaluations (``run_dir``) that exist here."""
    out: list[Path] = []
    for doc in store.evaluations().values():
        d = doc.get("run_dir") if isinstance(doc, dict) else None
        if isinstance(d, str) and Path(d).is_dir() and Path(d) not in out:
            out.append(Path(d))
    return out


def slide_table(store, summary: dict[str, Any] | None = None,
                split: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per slide of the store: the rows of ``store.summary()`` plus ``split`` (the patient's,
    else from ``split``: patient -> split) and ``tissue_fraction`` (mean over the kept tiles; None when
    the slide has no tiles). A slide whose tissue fractions cannot be read becomes ``status``
    "damaged" with the damage as its ``error``."""
    summary = summary if summary is not None else store.summary()
    splits: dict[str, Any] = {}
    out = []
    for row in summary["slides"]:
        p, s = row["patient"], row["slide"]
        tissue = None
        if row["status"] == "complete" and row["n_tiles"]:
            try:
                tissue = float(np.mean(store.tissue(p, s)))
            except (KeyError, OSError, ValueError):
                pass
            except StoreError as e:  # StoreDamageError
                row = {**row, "status": "damaged", "error": str(e)}
        if p not in splits:
            try:
                splits[p] = store.patient_attrs(p).get("split") or (split or {}).get(p)
            except StoreError:  # damaged patient metadata: its rows say so
                splits[p] = (split or {}).get(p)
        out.append({**row, "split": splits[p], "tissue_fraction": tissue})
    return out


def render_report(store, run_dirs: Iterable[Path] = (), title: str | None = None, max_px: int = MAX_PX,
                  pictures: Pictures | None = None, summary: dict[str, Any] | None = None,
                  table: list[dict[str, Any]] | None = None) -> str:
    """The report's HTML text (see :func:`write_report`); pictures embedded unless ``pictures`` says.
    ``summary`` (``store.summary()``) and ``table`` (:func:`slide_table` with the runs' split) are
    computed here unless the caller already has them."""
    pictures = pictures or Pictures()
    run_dirs = [Path(d) for d in run_dirs]
    summary = summary if summary is not None else store.summary()
    info = summary.get("store") or {}
    title = title or f"Cohort report: {store.path}"
    if table is None:
        table = slide_table(store, summary, run_split(run_dirs))

    rows, figures = [], []
    for row in table:
        p, s, split = row["patient"], row["slide"], row["split"]
        tissue = "-" if row["tissue_fraction"] is None else f"{row['tissue_fraction']:.3f}"
        mpp0 = f"{row['mpp0']:.4g}" if isinstance(row.get("mpp0"), (int, float)) else "-"
        cls = ' class="failed"' if row["status"] in ("failed", "damaged") else ""
        rows.append(f'<tr{cls} data-patient="{_e(p)}" data-slide="{_e(s)}"><td>{_e(p)}</td>'
                    f'<td><a href="#{_e(_anchor("qc", p, s))}">{_e(s)}</a></td>'
                    f'<td>{_e(row.get("label") or "")}</td><td>{_e(split or "")}</td><td>{_e(row["status"])}</td>'
                    f'<td class="num tiles">{row["n_tiles"]}</td><td class=num>{tissue}</td>'
                    f'<td class=num>{mpp0}</td><td class=error>{_e(row.get("error") or "")}</td></tr>')
        pic = None if row["status"] == "damaged" else pictures.get(
            f"slides/{p}/{s}", _version(store.slide_attrs(p, s), max_px),
            lambda p=p, s=s: slide_picture(store, p, s, max_px=max_px))
        caption = [f"{p} / {s}: {row['status']}, {row['n_tiles']} tiles, mean tissue fraction {tissue}, mpp0 {mpp0}"]
        if pic is None:
            caption.append("no picture (the slide is damaged)" if row["status"] == "damaged"
                           else "no picture (the slide was not tiled)")
        elif pic[3] == "qc":
            caption.append("QC picture: green tissue mask outline, magenta kept tiles")
        else:
            caption.append("thumbnail with the tissue mask outline in green (no QC picture in this store)")
        if row.get("error"):
            caption.append(f"error: {row['error']}")
        img = ""
        if pic is not None:
            src, w, h, source = pic
            zoom = max(1.0, min(480 / max(w, 1), 900 / max(h, 1)))  # small pictures shown bigger, pixelated
            style = f' style="width:{round(w * zoom)}px;image-rendering:pixelated"' if zoom > 1 else ""
            img = (f'<img src="{src}" width="{w}" height="{h}"{style} alt="{_e(p)} / {_e(s)}" '
                   f'data-source="{source}">')
        figures.append(f'<figure id="{_e(_anchor("qc", p, s))}">{img}<figcaption>{_e(chr(10).join(caption))}'
                       f'</figcaption></figure>')

    params = _parameters_table(summary.get("parameters", []))
    several = " (one column per set the store's slides were tiled with)" if len(summary.get("parameters", [])) > 1 else ""
    header = (f"<p class=meta>store <code>{_e(store.path)}</code>; schema {_e(info.get('schema_version'))}; "
              f"hlss-pipeline {_e(info.get('package_version'))}; created {_e(info.get('created'))}; "
              f"report written {_e(utc_now())}</p>"
              f'<p class="counts">{summary["n_patients"]} patients, {summary["n_slides"]} slides '
              f'({summary["n_complete"]} complete, {summary["n_failed"]} failed, '
              f'{sum(r["status"] == "damaged" for r in table)} damaged), {summary["n_tiles"]} tiles</p>'
              + (f"<p>tiling parameters{several}:</p>{params}" if params else ""))

    table = ('<table id="slides"><thead><tr><th>patient</th><th>slide</th><th>label</th><th>split</th>'
             '<th>status</th><th>tiles</th><th>mean tissue fraction</th><th>mpp0 (µm/px)</th><th>error</th></tr>'
             f'</thead><tbody>{"".join(rows)}</tbody></table>')

    sections = [f"<h1>{_e(title)}</h1>", header, "<h2>Patients and slides</h2>", table,
                "<h2>Slide QC</h2>", "".join(figures) or "<p>no slides</p>"]

    if run_dirs:
        curves, notes = [], []
        for d in run_dirs:
            pts = _curve_points(read_metrics(d))
            if pts:
                curves.append((d.name or str(d), pts))
            else:
                notes.append(f"{d}: no metrics.jsonl with loss values")
        sections.append("<h2>Training</h2>")
        svg = curves_svg(curves)
        if svg:
            sections.append(f"<figure>{svg}<figcaption>training loss vs step, one line per run: "
                            f"{_e(', '.join(str(d) for d in run_dirs))}</figcaption></figure>")
        sections.extend(f"<p class=meta>{_e(n)}</p>" for n in notes)

    maps = _attribute_sections(store, summary["slides"], max_px, pictures)
    if maps:
        sections += ["<h2>Language-attribute maps</h2>",
                     "<p class=meta>Per tile, the cosine between its HLSS embedding and each attribute's text "
                     "embedding (<code>hlss explain</code>); the top attributes of each level by mean over the "
                     "tiles, and a heatmap of the top attribute of each level over the thumbnail.</p>", *maps]

    knn = [_knn_table(n, doc, "store") for n, doc in sorted(store.evaluations().items()) if n.startswith("knn")]
    in_store = list(store.evaluations().values())
    for d in run_dirs:
        knn.extend(_knn_table(n, doc, f"run {d}") for n, doc in RunFolder(d).knn_results().items() if doc not in in_store)
    if any(knn):
        sections += ["<h2>kNN evaluation</h2>", *knn]

    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<meta name=generator content={GENERATOR}>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``section.key`` -> value (``tissue_params`` -> ``tissue.*``)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = prefix + k.removesuffix("_params")
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "; ".join(_value(x) if not isinstance(x, (list, tuple)) else ", ".join(map(_value, x)) for x in v)
    return "-" if v is None else str(v)


def _parameters_table(param_sets: list[dict[str, Any]]) -> str:
    """The distinct tiling parameter sets of the store as one table: a row per parameter, a column per set."""
    if not param_sets:
        return ""
    flat = [_flat(p) for p in param_sets]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    head = "<th>parameter</th>" + ("".join(f"<th>set {i + 1}</th>" for i in range(len(flat))) if len(flat) > 1
                                   else "<th>value</th>")
    rows = "".join(f"<tr><td><code>{_e(k)}</code></td>" + "".join(f"<td>{_e(_value(f.get(k)))}</td>" for f in flat)
                   + "</tr>" for k in keys)
    return f'<table class="parameters"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def write_report(store, out: Path, run_dirs: Iterable[Path] = (), title: str | None = None,
                 max_px: int = MAX_PX, pictures: Literal["embed", "files"] = "embed",
                 summary: dict[str, Any] | None = None, table: list[dict[str, Any]] | None = None) -> Path:
    """Write the HTML report of ``store`` (a :class:`~pipeline.store.SlideStore` or its path/URL) to
    ``out`` and return ``out``.

    Every slide's QC picture (the thumbnail with the tissue outline for stores without QC pictures)
    is a PNG at most ``max_px`` (1024) px on its longer side, about 1-2 MB per slide. ``pictures``:

    * ``"embed"``: in the HTML file as base64 data URIs: one self-contained file (a 100-slide cohort
      makes 100-200 MB; lower ``max_px`` for big cohorts);
    * ``"files"``: PNG files in ``<out stem>_files/`` next to it, redrawn only for slides (and
      attribute maps) that changed since the last report there: for big cohorts and nightly reruns.

    Training curves (``run_dirs``' metrics.jsonl) are inline SVG; there is no script. ``summary``
    and ``table``: as in :func:`render_report`.
    """
    from .store import SlideStore

    if pictures not in ("embed", "files"):
        raise ValueError(f"pictures must be 'embed' or 'files', not {pictures!r}")
    if not hasattr(store, "summary"):
        store = SlideStore(store)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = Pictures(out.with_name(out.stem + "_files") if pictures == "files" else None)
    text = render_report(store, run_dirs, title=title, max_px=max_px, pictures=sink, summary=summary, table=table)
    sink.finish()
    atomic_write_bytes(out, text.encode("utf-8"))
    return out


def report_cohort(store, out: Path, run_dirs: Sequence[Path] = (), title: str | None = None, max_px: int = MAX_PX,
                  pictures: Literal["embed", "files"] = "embed") -> tuple[Path, list[str]]:
    """:func:`write_report` of ``store`` (a :class:`~pipeline.store.SlideStore` or its path/URL) with
    the patients' split of ``run_dirs`` (default: the runs the store's kNN evaluations name,
    :func:`recorded_runs`); returns the report's path and the errors of the slides found damaged on
    the way (each also a "damaged" row of the report).

    Raises :class:`~pipeline.location.StoreError` for an unusable store, ValueError for a ``run_dirs``
    entry that is not a folder, OSError when ``out`` cannot be written.
    """
    from .store import SlideStore

    if not hasattr(store, "summary"):
        store = SlideStore(store)
    for d in run_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d}: not a run folder")
    runs = list(run_dirs) or recorded_runs(store)
    summary = store.summary()
    table = slide_table(store, summary, run_split(runs))
    path = write_report(store, out, runs, title=title, max_px=max_px, pictures=pictures, summary=summary, table=table)
    return path, [row["error"] for row in table if row["status"] == "damaged"]

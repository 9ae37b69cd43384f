"""The cohort report of a flow run, and the Prefect artifacts that show it in the UI.

Each tiling flow run attaches, next to its markdown summary (:mod:`flows.summary`):

* ``<flow>-slides``: a table artifact, one row per slide of the store (patient, slide, label, split,
  status, tiles, mean tissue fraction, mpp0, error), the table of the HTML report;
* ``<flow>-qc``: a markdown artifact with the QC pictures of the slides tiled or failed in this run
  (at most :data:`MAX_PICTURES`, :data:`PICTURE_PX` px JPEGs embedded as data URIs, so the UI needs no
  file access), each with its status, tiles, tissue fraction and mpp as text, or a line saying that none was;
* ``<flow>-report``: a link artifact to the HTML report written into the run folder, served over HTTP by
  ``hlss serve``'s report server when the run was started by it (:func:`flows.report_server.report_url`)
  (:func:`pipeline.report.write_report`, pictures as files in ``report_files/`` beside it, redrawn
  only for slides that changed: a nightly rerun redraws what it retiled), when the flow has one.

The report and the artifacts are a view of the store: failing to draw them is logged as an error and
noted in the run's summary, and never fails a run whose slides were tiled and saved. Strings from the
store (ids, labels, errors) are markdown-escaped in both artifacts: the UI renders table cells as
markdown too.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline.escape import markdown
from pipeline.report import slide_table, write_report
from pipeline.run_folder import RunFolder, run_split
from pipeline.store import SlideStore

from .report_server import report_url
from .summary import summary_markdown

__all__ = ["MAX_PICTURES", "PICTURE_PX", "REPORT_PX", "attach_cohort_artifacts", "publish", "qc_markdown",
           "table_artifact_rows"]

MAX_PICTURES = 24
PICTURE_PX = 512  # the stored QC picture's size: its caption readable in the UI (256 px was not)
REPORT_PX = 512  # pictures in the flows' HTML report: ~0.1-0.3 MB per slide, as files


def _jpeg_uri(image: np.ndarray, max_px: int) -> str:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(np.asarray(image, np.uint8))).convert("RGB")
    img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_ROUNDING = {"tissue_fraction": 3, "mpp0": 4}  # decimals people read (the store keeps full precision)


def table_artifact_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the ``<flow>-slides`` table artifact from :func:`pipeline.report.slide_table`'s rows:
    strings escaped as markdown (the UI renders each cell as markdown), fractions and µm/px rounded
    for people, other numbers and None as they are."""
    keys = ("patient", "slide", "label", "split", "status", "n_tiles", "tissue_fraction", "mpp0", "error")
    return [{k: _cell(k, r.get(k)) for k in keys} for r in table]


def _cell(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return markdown(value)
    if isinstance(value, float) and key in _ROUNDING:
        return round(value, _ROUNDING[key])
    return value


def _caption(row: dict[str, Any] | None) -> str:
    """The facts of a QC picture as text beside it (the picture's own caption is small print)."""
    if row is None:
        return ""
    parts = [markdown(row["status"]), f"{row.get('n_tiles') or 0} tiles"]
    if isinstance(row.get("tissue_fraction"), float):
        parts.append(f"mean tissue fraction {row['tissue_fraction']:.2f}")
    if isinstance(row.get("mpp0"), (int, float)):
        parts.append(f"{row['mpp0']:.3g} µm/px at level 0")
    if row.get("error"):
        parts.append(f"error: {markdown(row['error'])}")
    return ": " + ", ".join(parts)


def qc_markdown(store: SlideStore, slides: list[tuple[str, str]], max_pictures: int = MAX_PICTURES,
                max_px: int = PICTURE_PX, rows: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    """Markdown with the QC pictures of ``slides`` (patient, slide), at most ``max_pictures``, each under
    its name and, from its slide-table row in ``rows``, status, tiles, tissue fraction and mpp as text."""
    lines = ["# QC pictures", ""]
    if not slides:
        return "\n".join(lines + ["No slide was tiled in this run; the report shows every slide.", ""])
    lines += ["Green: tissue mask outline; magenta: kept tiles.", ""]
    shown = 0
    for p, s in slides:
        if shown == max_pictures:
            lines += [f"{len(slides) - shown} more slides are in the report.", ""]
            break
        name = f"{markdown(p)} / {markdown(s)}"
        facts = _caption((rows or {}).get((p, s)))
        if not store.has_qc(p, s):
            lines += [f"**{name}**{facts}; no QC picture.", ""]
            continue
        lines += [f"**{name}**{facts}", "", f"![{name}]({_jpeg_uri(store.qc_image(p, s), max_px)})", ""]
        shown += 1
    return "\n".join(lines)


def attach_cohort_artifacts(flow: str, store: str, summary: dict[str, Any], report: Path | None) -> Path | None:
    """Write the HTML report to ``report`` (when given) and attach the slide table, the QC pictures of
    the slides this run tiled or failed, and a link to the report. Returns the report's path, or None
    when there is none; records any failure in ``summary["artifacts_error"]`` instead of raising."""
    logger = get_run_logger()
    try:
        reader = SlideStore(store)
        run_dirs = [report.parent] if report is not None and RunFolder(report.parent).metrics.is_file() else []
        cohort = reader.summary()
        table = slide_table(reader, cohort, run_split(run_dirs))  # the report's table, read once for both
        create_table_artifact(table_artifact_rows(table), key=f"{flow}-slides",
                              description=f"every slide of {markdown(store)}")
        touched = [(r["patient"], r["slide"]) for r in summary.get("slide_rows", [])
                   if r["status"] != "skipped" and r["patient"] and r["slide"]]
        by_slide = {(r["patient"], r["slide"]): r for r in table}
        create_markdown_artifact(qc_markdown(reader, [k for k in touched if k in by_slide], rows=by_slide),
                                 key=f"{flow}-qc", description="QC pictures of the slides tiled or failed in this run")
        if report is None:
            return None
        written = write_report(reader, report, run_dirs, max_px=REPORT_PX, pictures="files", summary=cohort,
                               table=table)
        # the UI shows link_text as it is (escapes would show as backslashes): plain words only, the
        # path goes in the description, which it renders as markdown
        summary["report_url"] = report_url(written)
        create_link_artifact(summary["report_url"], link_text="open the cohort report", key=f"{flow}-report",
                             description=f"cohort report {markdown(str(written))}: slides, QC pictures, "
                                         "training curves, kNN")
        logger.info("cohort report: %s", written)
        return written
    except Exception as e:  # a view of the store: never fails a run whose slides are saved
        logger.error("the cohort report or its artifacts failed: %s: %s", type(e).__name__, e)
        summary["artifacts_error"] = f"{type(e).__name__}: {e}"
        return None


def publish(flow: str, source: str, store: str, summary: dict[str, Any], report: Path | None) -> None:
    """Attach a flow run's artifacts (:func:`attach_cohort_artifacts`) and its markdown summary
    ``<flow>-summary``; also after a failed step (``summary["failed"]``), which heads the summary."""
    written = attach_cohort_artifacts(flow, store, summary, report)
    summary["report"] = str(written) if written else None
    create_markdown_artifact(summary_markdown(summary), key=f"{flow}-summary",
                             description=f"{flow} of {markdown(source)} into {markdown(store)}")

"""What a flow run did, as the plain data it returns and the markdown artifact shown in the Prefect UI.

Every string in the markdown that comes from the user or the store (ids, reasons, errors, paths, names)
goes through :func:`pipeline.escape.markdown`, so it reads as text and cannot add links, images, HTML
or table cells.
"""

from __future__ import annotations

from typing import Any

from hlss_model.extract import ExtractReport
from pipeline.escape import markdown as md
from pipeline.tiler import SlideResult

__all__ = ["slide_rows", "run_summary", "summary_markdown"]


def slide_rows(results: list[SlideResult], reasons: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """One row per slide: ids, status, tiles, why it was (re)tiled, and the error of a failed one."""
    rows = []
    for r in sorted(results, key=lambda r: (r.patient_id or "", r.slide_id or "", r.path)):
        rows.append({
            "patient": r.patient_id, "slide": r.slide_id, "status": r.status, "tiles": r.n_tiles,
            "reason": reasons.get((r.patient_id, r.slide_id), ""), "error": r.error or "",
            "seconds": round(r.seconds, 1),
        })
    return rows


def run_summary(flow: str, store: str, rows: list[dict[str, Any]], seconds: float,
                training: dict[str, Any] | None = None, extraction: ExtractReport | None = None,
                knn: dict[str, Any] | None = None, curve: list[tuple[int, float]] | None = None,
                dropped: list[dict[str, Any]] | None = None,
                failed: tuple[str, str] | None = None) -> dict[str, Any]:
    """The flow's return value: counts, per-slide rows, and each later step's outcome (JSON-ready).

    ``dropped``: the derived sets retiling dropped, ``{slide, set, remade}`` (see ``flows.steps.rederived``).
    ``failed``: ``(step, error)`` of the step that stopped the run; the steps after it are absent.
    """
    count = {s: sum(r["status"] == s for r in rows) for s in ("complete", "skipped", "failed")}
    out: dict[str, Any] = {
        "flow": flow, "store": store, "seconds": round(seconds, 1),
        "slides": {**count, "tiled_tiles": sum(r["tiles"] for r in rows if r["status"] == "complete")},
        "slide_rows": rows,
    }
    if training is not None:
        out["training"] = {**training, "curve": curve or []}
    if extraction is not None:
        out["extraction"] = {
            "extracted": [f"{p}/{s}" for p, s in extraction.extracted],
            "skipped": len(extraction.skipped),
            "failed": [{"slide": f"{p}/{s}", "error": e} for p, s, e in extraction.failed],
            "tiles": extraction.tiles, "tiles_per_s": round(extraction.tiles_per_s, 1),
        }
    if knn is not None:
        out["knn"] = knn
    if dropped:
        out["dropped"] = dropped
    if failed is not None:
        out["failed"] = {"step": failed[0], "error": failed[1]}
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """A readable report of :func:`run_summary`'s output (slides, tiles, training, kNN table)."""
    s = summary["slides"]
    lines = []
    if summary.get("failed"):
        f = summary["failed"]
        lines += [f"# {summary['flow']} FAILED at {md(f['step'])}", "", f"**Error:** {md(f['error'])}", "",
                  "What was done before the failure is kept and shown below; fix the cause and run again "
                  "(unchanged slides are not tiled again).", ""]
    lines += [
        f"{'##' if lines else '#'} {summary['flow']}: {s['complete']} tiled, {s['skipped']} unchanged, {s['failed']} failed",
        "",
        f"Store {md(summary['store'])}; {s['tiled_tiles']} tiles written; {summary['seconds']:.0f} s.",
        "",
    ]
    tiled_or_failed = [r for r in summary["slide_rows"] if r["status"] != "skipped" or r["reason"]]
    if tiled_or_failed:
        lines += ["## Slides tiled, moved, relabelled or failed", "",
                  "| patient | slide | status | tiles | why | error |", "|---|---|---|---:|---|---|"]
        for r in tiled_or_failed:
            lines.append(f"| {md(r['patient'] or '?')} | {md(r['slide'] or '?')} | {md(r['status'])} | {r['tiles']} | "
                         f"{md(r['reason'])} | {md(r['error'])} |")
        lines.append("")
    if s["skipped"]:
        lines += [f"{s['skipped']} slides unchanged since they were tiled (same content and parameters).", ""]
    if summary.get("dropped"):
        lines += ["## Derived data dropped by retiling", ""]
        lines += [f"- {md(d['slide'])}: {md(d['set'])} " + ("re-extracted by this run" if d["remade"] else
                  "not re-extracted (no encoder of this run makes it): make it again") for d in summary["dropped"]]
        lines.append("")
    if "training" in summary:
        t = summary["training"]
        loss = f"{t['final_loss']:.4f}" if isinstance(t.get("final_loss"), (int, float)) else "-"
        lines += ["## Training", "", f"Run {md(t.get('run_dir'))}: {md(t['status'])}, {t['steps']} steps, "
                  f"final loss {loss}.", ""]
        if t.get("curve"):
            lines += ["| step | loss |", "|---:|---:|"] + [f"| {step} | {loss:.4f} |" for step, loss in t["curve"]] + [""]
    if "extraction" in summary:
        e = summary["extraction"]
        lines += ["## Features", "", f"{len(e['extracted'])} slides extracted ({e['tiles']} tiles, "
                  f"{e['tiles_per_s']} tiles/s), {e['skipped']} already done, {len(e['failed'])} failed.", ""]
        lines += [f"- FAILED {md(f['slide'])}: {md(f['error'])}" for f in e["failed"]]
    if "knn" in summary:
        k = summary["knn"]
        lines += ["## kNN evaluation (held-out patients)", ""]
        if "skipped" in k:
            lines += [f"Not evaluated: {md(k['skipped'])}", ""]
        else:
            lines += [f"Features {md(k.get('feature'))}, k={k['k']}, T={k['temperature']}.", "",
                      "| level | n | accuracy | MCA |", "|---|---:|---:|---:|"]
            for level, r in k["levels"].items():
                lines.append(f"| {md(level)} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                             f"{100 * r['mean_class_accuracy']:.1f}% |")
            lines.append("")
    if summary.get("report"):
        shown = md(summary["report"])  # a link where the report is served (percent-encoded: no markdown in it)
        link = f"[{shown}]({summary['report_url']})" if summary.get("report_url") else shown
        lines += [f"Cohort report: {link} (slides, QC pictures, training curve, kNN).", ""]
    if summary.get("artifacts_error"):
        lines += [f"The cohort report could not be drawn: {md(summary['artifacts_error'])}", ""]
    return "\n".join(lines)

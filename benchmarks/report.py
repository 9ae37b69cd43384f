"""Time and size of the HTML cohort report (``hlss report``), embedded pictures against picture files.

    python benchmarks/report.py                     # 24 patients, 1-2 slides each
    python benchmarks/report.py --patients 48 --max-px 512

Prints from one run, on one synthetic cohort (``make_demo_cohort``, 8192 x 6144 px at 0.5 µm/px,
tiled at 0.5 µm/px, 256 px tiles, so QC thumbnails of about 1000 x 750 px):

1. ``--pictures embed``: one self-contained HTML file, every picture a base64 PNG in it.
2. ``--pictures files``, first report: PNGs in ``report_files/``.
3. ``--pictures files`` again with nothing changed (what a nightly rerun costs when no slide changed),
   and after one slide's attributes changed (one slide redrawn).

Each row: seconds, slides per second, and the bytes written (HTML plus picture files). The ratio
of the rerun to the first report is the point of the picture files; wall times are from one run on
a shared machine and move by 10-20 % between runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--max-px", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from pipeline.config import TilingParams
    from pipeline.report import write_report
    from pipeline.runner import tile_cohort
    from pipeline.store import SlideStore
    from pipeline.synthetic import make_demo_cohort

    with tempfile.TemporaryDirectory(prefix="hlss-bench-report-") as tmp:
        root = Path(tmp)
        manifest = make_demo_cohort(root / "slides", n_patients=args.patients, width=8192, height=6144, seed=3)
        t0 = time.perf_counter()
        tile_cohort(manifest, root / "store.zarr", TilingParams(target_mpp=0.5, tile_size=256),
                    workers=args.workers)
        store = SlideStore(root / "store.zarr")
        n = sum(1 for _ in store.records(status=None))
        print(f"{platform.node()} ({platform.processor() or platform.machine()}), {n} slides tiled in "
              f"{time.perf_counter() - t0:.1f} s; pictures at most {args.max_px} px")

        def timed(label: str, out: Path, mode: str) -> float:
            t = time.perf_counter()
            write_report(store, out, max_px=args.max_px, pictures=mode)
            dt = time.perf_counter() - t
            size = _size(out) + (_size(out.with_name(out.stem + "_files")) if mode == "files" else 0)
            print(f"{label:<44} {dt:7.2f} s  {n / dt:7.1f} slides/s  {size / 1e6:8.1f} MB")
            return dt

        timed("embed (one self-contained file)", root / "embed.html", "embed")
        first = timed("files, first report", root / "files.html", "files")
        again = timed("files, rerun, nothing changed", root / "files.html", "files")
        rec = next(store.records())
        meta = root / "store.zarr" / "patients" / rec.patient_id / "slides" / rec.slide_id / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["benchmark_note"] = "changed"
        meta.write_text(json.dumps(doc))
        changed = timed("files, rerun, one slide changed", root / "files.html", "files")
        print(f"rerun / first report: {again / first:.2f} (nothing changed), {changed / first:.2f} (one slide)")


if __name__ == "__main__":
    main()

"""Whole-slide images to a hierarchical Zarr cohort store: slide readers, tissue, tile grid,
tiling, the store, QC pictures, the HTML report, MIL export. No torch (tiling never pays for it).

The lowest package: it imports none of ``hlss_model``, ``flows`` or ``hlss`` (checked by
tests/hlss/test_structure.py). Its curated names below are imported lazily, on first use; importing the
package registers the ``hlss.jpeg`` zarr codec, so JPEG-compressed tile arrays open with plain
``zarr.open_group`` afterwards (installed packages also register it by entry point).
"""

from . import codecs as _codecs  # noqa: F401  (registers the zarr codec)
from .lazy import lazy_exports

_WHERE = {
    "SlideStore": ".store", "StoreWriter": ".store", "StoreDamageError": ".store", "StoreError": ".location",
    "TilingParams": ".config", "TileCompression": ".codecs", "TileFilter": ".qc",
    "discover_cohort": ".cohort", "tile_cohort": ".runner", "tile_slide": ".tiler",
    "verify_store": ".verify", "export_qc": ".qc", "write_report": ".report", "export_mil": ".export",
    "make_demo_cohort": ".synthetic",
}
__all__ = [*_WHERE, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

try:
    from importlib.metadata import version as _version

    __version__ = _version("hlss-pipeline")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"

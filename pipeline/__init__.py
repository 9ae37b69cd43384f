"""Whole-slide images to a hierarchical Zarr cohort store: readers, tissue, tile grid, store, CLI.

Importing the package registers the ``hlss.jpeg`` zarr codec, so JPEG-compressed tile arrays open
with plain ``zarr.open_group`` afterwards (installed packages also register it by entry point).
"""

from . import codecs as _codecs  # noqa: F401  (registers the zarr codec)
from .store import SlideStore

__all__ = ["SlideStore", "__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("hlss-pipeline")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"

"""The cohort store's layout: node names, key paths, array dtypes, shapes and units, schema versions
and the slide attributes other modules read. This docstring is the one full description; the
writer and reader (:mod:`pipeline.store`), the tiler, verification, extraction and the README use
the names defined here.

::

    <store>/                      attrs["hlss"]: schema_version, created, package_version
      patients/<patient_id>/      attrs: label, split (when known)
        slides/<slide_id>/        attrs: status (see below), error, source {path, bytes, mtime,
                                  fingerprint}, reader, vendor, dimensions, mpp0 [x, y], mpp_source,
                                  mpp_warning, target_mpp, tile_size, tile_um, footprint_px, level,
                                  downsample, level_mpp, resampled, tissue_params, min_tissue, mask_mpp,
                                  compression (as asked), stored_compression (what the tiles are:
                                  "auto" chroma subsampling settled), params_hash, grid_shape, n_grid,
                                  n_tiles, label, split, timings
          tiles       (N, T, T, 3) uint8   one tile per chunk, chunks grouped in shards
          coords      (N, 2) int64         level-0 (x, y) of each tile's top-left corner
          tissue      (N,) float32         tissue fraction of each tile
          thumbnail   (h, w, 3) uint8      attrs["scale"]: level-0 px per thumbnail px (x, y)
          tissue_mask (h, w) bool          same pixels as the thumbnail, attrs["scale"]
          qc          (H, W, 3) uint8      QC picture: thumbnail (longest side <= 2048 px), tissue mask
                                           outline (pure green), kept tiles (magenta rectangles), caption
                                           band below; attrs: scale (level-0 px per px), size, caption_px.
                                           Also on slides failed for content (no tissue, too small).
          tile_qc/<m> (N,) float32         per-tile QC measures aligned with coords, m in focus, pen,
                                           brightness, saturation (see pipeline.qc); group attrs: fields,
                                           version, ink_hues, dark_value; each array's attrs["units"].
                                           Nothing is deleted: filter with pipeline.qc.TileFilter.
          features/<name> (N, D) float32 or float16
                                           one row per tile, aligned with coords (NaN rows: tiles left out
                                           by a tile filter); attrs: model, weights_fingerprint,
                                           tiles_version (of the tiles it saw), complete (True only once
                                           every row is written), pooled {rows, mean, max}: the slide's
                                           vectors over its non-NaN rows (pipeline.pooling; absent in
                                           arrays committed before, then computed when read)
          attributes/<run> (N, A) float32  cosine of each tile's HLSS projection to each attribute text
                                           embedding of run <run> (all levels, columns concatenated);
                                           attrs: levels, names (per column), run, weights_fingerprint,
                                           tiles_version, complete (see hlss_model.explain)
      evaluations/<name>/         attrs["result"]: e.g. the flows' kNN report (knn-<feature>)
      _staging/                   slides being written (never read as results)

Every node is a Zarr 3 group or array with its own ``zarr.json``; ``N`` is the slide's ``n_tiles``
and ``T`` its ``tile_size``. :data:`SLIDE_ARRAYS` gives each array's dtype, shape and unit as data.

A slide's ``status`` is ``complete`` or ``failed`` once committed; on an object store ``writing``
or ``moving`` while a commit or a move is under way (see :mod:`pipeline.store` for the commit
protocols); readers report a slide whose metadata cannot be read as ``damaged``.
``features/<name>`` and ``attributes/<run>`` record the :func:`pipeline.store.tiles_version` of the
tiles they were made from (a hash of the slide's ``params_hash``, ``source.fingerprint`` and
``n_tiles``), so retiling a slide makes them stale.

Schema versions (``attrs["hlss"]["schema_version"]`` of the root):

* **2** (stores created now): every array is made by :func:`pipeline.store.create_array`, which puts
  zarr 3's ``crc32c`` codec last on every stored chunk (for sharded arrays: on every inner chunk, and
  the shard index keeps its own crc32c) and writes every chunk, even one equal to the fill value. A
  flipped byte is a :class:`pipeline.store.StoreDamageError` naming patient, slide, array and file,
  and a missing chunk file is found by ``hlss verify`` (:mod:`pipeline.verify`).
* **1** (stores made before): arrays without checksums (the shard index excepted), chunks equal to
  the fill value not written. Still read and still written to: the store keeps its label 1, and
  slides and feature arrays written into it from now on carry checksums like a schema-2 store's
  (each array's ``zarr.json`` names its codecs, so readers need not know). ``hlss verify`` lists
  the arrays without checksums; retiling (``hlss tile --force``) adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SCHEMA_VERSION", "READABLE_SCHEMAS", "ROOT_ATTR", "META", "PATIENTS", "SLIDES", "STAGING",
           "EVALUATIONS", "TILES", "COORDS", "TISSUE", "THUMBNAIL", "TISSUE_MASK", "QC", "TILE_QC",
           "FEATURES", "ATTRIBUTES", "DERIVED_GROUPS", "COMPLETE", "FAILED", "DAMAGED", "WRITING", "MOVING",
           "STATUS", "N_TILES", "TILE_SIZE", "PARAMS_HASH", "SOURCE", "FINGERPRINT", "TILES_VERSION",
           "ARRAY_COMPLETE", "UNITS", "SCALE", "ArraySpec", "SLIDE_ARRAYS", "TILE_QC_UNITS", "REQUIRED_DTYPES",
           "PER_TILE", "spec", "patient_key", "slides_key", "slide_key", "array_key", "evaluation_key"]

SCHEMA_VERSION = 2
"""Schema of the stores created now (see the module docstring)."""
READABLE_SCHEMAS = (1, 2)
"""Schemas this version reads and writes."""
ROOT_ATTR = "hlss"
"""The root group's attribute holding schema_version, created and package_version."""

# -- node names ----------------------------------------------------------------------------------
META = "zarr.json"
PATIENTS = "patients"
SLIDES = "slides"
STAGING = "_staging"
EVALUATIONS = "evaluations"
TILES = "tiles"
COORDS = "coords"
TISSUE = "tissue"
THUMBNAIL = "thumbnail"
TISSUE_MASK = "tissue_mask"
QC = "qc"
TILE_QC = "tile_qc"
FEATURES = "features"
ATTRIBUTES = "attributes"
DERIVED_GROUPS = (FEATURES, ATTRIBUTES)
"""Slide subgroups of arrays made from the tiles (written by ``StoreWriter.commit_features``; stale
once the slide is retiled)."""

# -- slide status values and the attribute names other modules read ----------------------------
COMPLETE, FAILED, DAMAGED, WRITING, MOVING = "complete", "failed", "damaged", "writing", "moving"
STATUS = "status"
N_TILES = "n_tiles"
TILE_SIZE = "tile_size"
PARAMS_HASH = "params_hash"
SOURCE = "source"
FINGERPRINT = "fingerprint"  # inside SOURCE
TILES_VERSION = "tiles_version"  # on features/attributes arrays: the tiles they were made from
ARRAY_COMPLETE = "complete"  # on features/attributes arrays: every row written
UNITS = "units"  # array attribute naming the unit of its values
SCALE = "scale"  # thumbnail, tissue_mask, qc: level-0 px per array px (x, y)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a slide: ``name`` (its key in the slide group; ``<m>`` marks one of a group),
    ``dtype``, ``shape_doc`` (``N`` tiles, ``T`` tile side), ``unit`` of its values (also written as
    ``attrs["units"]`` where the tiler records one), whether a complete slide must have it and whether
    its first axis is one row per tile."""

    name: str
    dtype: str
    shape_doc: str
    unit: str
    doc: str
    required: bool = False
    per_tile: bool = False


SLIDE_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec(TILES, "uint8", "(N, T, T, 3)", "RGB, 0-255", "one tile per chunk, chunks grouped in shards",
              required=True, per_tile=True),
    ArraySpec(COORDS, "int64", "(N, 2)", "level-0 px, tile top-left (x, y)",
              "level-0 (x, y) of each tile's top-left corner", required=True, per_tile=True),
    ArraySpec(TISSUE, "float32", "(N,)", "fraction of tile area", "tissue fraction of each tile",
              required=True, per_tile=True),
    ArraySpec(THUMBNAIL, "uint8", "(h, w, 3)", "RGB, 0-255", "attrs scale: level-0 px per thumbnail px (x, y)",
              required=True),
    ArraySpec(TISSUE_MASK, "bool", "(h, w)", "True: tissue", "same pixels as the thumbnail, attrs scale",
              required=True),
    ArraySpec(QC, "uint8", "(H, W, 3)", "RGB, 0-255", "QC picture (pipeline.qc); attrs scale, size, caption_px"),
    ArraySpec(f"{TILE_QC}/<m>", "float32", "(N,)", "see TILE_QC_UNITS", "per-tile QC measure m", per_tile=True),
    ArraySpec(f"{FEATURES}/<name>", "float32", "(N, D)", "encoder output",
              "features of one encoder (float16 when asked), row i for tile i"),
    ArraySpec(f"{ATTRIBUTES}/<run>", "float32", "(N, A)", "cosine similarity, -1 to 1",
              "attribute scores of one run, row i for tile i"),
)
"""Every array a slide may hold (see the module docstring)."""

TILE_QC_UNITS = {
    "focus": "variance of the 4-neighbour Laplacian of the green channel at half resolution (0-255 scale)",
    "pen": "fraction of pixels that look like marker ink (tissue.py hue rules) or are dark",
    "brightness": "mean of R, G, B / 255",
    "saturation": "mean HSV saturation",
}
"""``attrs["units"]`` of each ``tile_qc/<m>`` array."""

REQUIRED_DTYPES = {s.name: s.dtype for s in SLIDE_ARRAYS if s.required}
"""The arrays a complete slide must have, with their dtypes."""
PER_TILE = tuple(s.name for s in SLIDE_ARRAYS if s.per_tile and "/" not in s.name)
"""Plain arrays whose first axis is one row per tile (``tile_qc/<m>`` are too)."""


def spec(name: str) -> ArraySpec:
    """The :class:`ArraySpec` of array ``name`` of a slide (``tiles``, ``tile_qc/focus``, ``features/x``...)."""
    group, _, _ = name.partition("/")
    for s in SLIDE_ARRAYS:
        if s.name == name or ("/" in name and "/" in s.name and s.name.split("/")[0] == group):
            return s
    raise KeyError(f"{name!r} is not an array of the store layout")


# -- key builders (paths relative to the store root) ---------------------------------------------
def patient_key(patient_id: str) -> str:
    return f"{PATIENTS}/{patient_id}"


def slides_key(patient_id: str) -> str:
    """The group holding a patient's slides."""
    return f"{PATIENTS}/{patient_id}/{SLIDES}"


def slide_key(patient_id: str, slide_id: str) -> str:
    return f"{PATIENTS}/{patient_id}/{SLIDES}/{slide_id}"


def array_key(patient_id: str, slide_id: str, name: str) -> str:
    """Key of array (or subgroup) ``name`` of a slide, e.g. ``patients/P/slides/S/features/x``."""
    return f"{slide_key(patient_id, slide_id)}/{name}"


def evaluation_key(name: str) -> str:
    return f"{EVALUATIONS}/{name}"

"""``hlss``: the command line (:mod:`hlss.cli`) and the short import path of the curated API::

    from hlss import SlideStore, tile_cohort, TilingParams, extract_features, train

The top package: it may import ``pipeline``, ``hlss_model`` and ``flows``; nothing imports it.
Each name is imported from its module on first use, so ``import hlss`` and tiling never import torch.
"""

from pipeline.lazy import lazy_exports

_WHERE = {
    # the cohort store and tiling (pipeline: no torch)
    "SlideStore": "pipeline.store", "StoreWriter": "pipeline.store", "StoreError": "pipeline.location",
    "TilingParams": "pipeline.config", "TileCompression": "pipeline.codecs", "TileFilter": "pipeline.qc",
    "discover_cohort": "pipeline.cohort", "tile_cohort": "pipeline.runner", "tile_slide": "pipeline.tiler",
    "make_demo_cohort": "pipeline.synthetic", "verify_store": "pipeline.verify",
    # what a store gives out
    "export_qc": "pipeline.qc", "write_report": "pipeline.report", "export_mil": "pipeline.export",
    # the model side (hlss_model: torch, imported when used)
    "TrainConfig": "hlss_model.config", "train": "hlss_model.train", "run_encoder": "hlss_model.runs",
    "timm_encoder": "hlss_model.encoders", "extract_features": "hlss_model.extract",
    "knn_from_store": "hlss_model.evaluate", "explain_slide": "hlss_model.explain",
    "__version__": "pipeline",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

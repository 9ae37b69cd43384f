"""Prefect 3 flows and deployments over :mod:`pipeline` and :mod:`hlss_model`.

Imports ``pipeline`` and ``hlss_model`` (never ``hlss``; tests/hlss/test_structure.py checks it).

- ``tile-and-train`` (:func:`flows.tile_and_train.tile_and_train`): cohort -> tiles -> HLSS -> features -> kNN.
- ``extract-features`` (:func:`flows.extract.extract_features_flow`): feature bags for MIL.
- ``reprocess`` (:func:`flows.reprocess.reprocess`): tile and extract only what changed (cron).

``hlss serve`` serves them as deployments; ``hlss run`` runs ``tile-and-train`` in-process. The
curated names below are imported lazily (the flows whose names are also their modules' are left
to their modules).
"""

from pipeline.lazy import lazy_exports

_WHERE = {
    "FlowDefaults": ".settings", "FlowConfigError": ".settings", "load_defaults": ".settings",
    "extract_features_flow": ".extract", "build_deployments": ".serve", "deploy_to_pool": ".serve",
    "tile_and_train_parameters": ".run", "run_tile_and_train": ".run",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

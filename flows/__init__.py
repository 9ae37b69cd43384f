"""Prefect 3 flows and deployments over :mod:`pipeline` and :mod:`hlss_model`.

- ``tile-and-train`` (:func:`flows.tile_and_train.tile_and_train`): cohort -> tiles -> HLSS -> features -> kNN.
- ``extract-features`` (:func:`flows.extract.extract_features_flow`): feature bags for MIL.
- ``reprocess`` (:func:`flows.reprocess.reprocess`): tile and extract only what changed (cron).

``hlss serve`` serves them as deployments; ``hlss run`` runs ``tile-and-train`` in-process.
"""

"""Prefect 3 flows and deployments over :mod:`pipeline` and :mod:`hlss_model` (tile-and-train,
extract-features, reprocess). Not built yet: see the project's open issues."""
